"""Snakemake script: the best window of a search, with every window's validation score."""

from ffmerge import pipeline
from ffmerge.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.select(snakemake.input, snakemake.params.cfg, snakemake.output[0])
