"""Snakemake script: deterministic calibration / validation / test / train splits."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.prepare_data(snakemake.params.cfg, snakemake.input.model, snakemake.output[0])
