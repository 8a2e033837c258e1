"""Snakemake script: LLM.int8() on a fine-tuned model; test metric and bytes."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.int8(
        snakemake.params.cfg, snakemake.input.model, snakemake.input.data, snakemake.output[0], snakemake.params.device
    )
