"""Snakemake script: the best window of a search, with every window's validation score.

per_window mode: pick among the candidate jobs' scores; in_process mode: score every window here; proxy mode:
rank every window from the feature cache here and score the best few.
"""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    if "candidates" in snakemake.input.keys():
        pipeline.select(snakemake.input.candidates, snakemake.params.cfg, snakemake.output[0])
    else:
        pipeline.search(
            snakemake.params.cfg,
            snakemake.input.model,
            snakemake.input.data,
            snakemake.input.get("features"),
            snakemake.wildcards.search,
            snakemake.wildcards.fraction,
            snakemake.output[0],
            snakemake.params.device,
            alignments=snakemake.input.get("alignment"),
        )
