"""Snakemake script: hub id, local folder or packaged offline model -> a plain transformers folder."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.prepare_base_model(snakemake.params.cfg, snakemake.output[0])
