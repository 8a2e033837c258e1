"""Snakemake script: test metric and sizes of one model."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.evaluate(
        snakemake.params.cfg, snakemake.input.model, snakemake.input.data, snakemake.output[0], snakemake.params.device
    )
