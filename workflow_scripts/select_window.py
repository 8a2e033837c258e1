"""Snakemake script: the best window of a search, with every window's validation score."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.select(snakemake.input, snakemake.params.cfg, snakemake.output[0])
