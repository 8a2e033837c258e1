"""Snakemake script: FF features before the activation (and FF / attention outputs for CKA) on calibration tokens."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.cache(
        snakemake.params.cfg, snakemake.input.model, snakemake.input.data, snakemake.output[0], snakemake.params.device
    )
