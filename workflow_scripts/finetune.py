"""Snakemake script: recovery fine-tuning, resuming from the last checkpoint in the work folder."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.run_finetune(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.data,
        snakemake.params.work,
        snakemake.output[0],
        snakemake.params.device,
    )
