"""Snakemake script: linear-CKA matrices of FF outputs and attention outputs across layers."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.cka(snakemake.input.features, {"ff_out": snakemake.output.ff_out, "attn_out": snakemake.output.attn_out})
