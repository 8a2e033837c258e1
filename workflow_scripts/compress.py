"""Snakemake script: the chosen (best or random) window as a tied checkpoint, and its test metric."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.build_compressed(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.get("features"),
        snakemake.input.selection,
        snakemake.wildcards.variant,
        snakemake.wildcards.choice,
        snakemake.output.model,
        data_dir=snakemake.input.data,
        eval_json=snakemake.output.eval,
        device=snakemake.params.device,
        alignments=snakemake.input.get("alignment"),
    )
