"""Snakemake script: LLM.int8() on a fine-tuned model; test metric and bytes."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.int8(
        snakemake.params.cfg, snakemake.input.model, snakemake.input.data, snakemake.output[0], snakemake.params.device
    )
