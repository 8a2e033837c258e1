"""Snakemake script: the baseline classifier of a bare backbone, a linear head fitted on frozen features."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.fit_head(
        snakemake.params.cfg, snakemake.input.model, snakemake.input.data, snakemake.output[0], snakemake.params.device
    )
