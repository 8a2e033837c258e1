"""Snakemake script: build one candidate window and score it on validation data."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.candidate(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.data,
        snakemake.input.get("features"),
        snakemake.wildcards.search,
        snakemake.wildcards.fraction,
        int(snakemake.wildcards.start),
        snakemake.output[0],
        snakemake.params.device,
    )
