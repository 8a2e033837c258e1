"""Snakemake script: deterministic calibration / validation / test / train splits."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.prepare_data(snakemake.params.cfg, snakemake.input.model, snakemake.output[0])
