"""Snakemake script: the chosen (best or random) window as a tied checkpoint."""

from ffmerge import pipeline
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    pipeline.build_compressed(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.get("features"),
        snakemake.input.selection,
        snakemake.wildcards.variant,
        snakemake.wildcards.choice,
        snakemake.output[0],
    )
