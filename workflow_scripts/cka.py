"""Snakemake script: linear-CKA matrices of FF outputs and attention outputs across layers."""

from ffmerge.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge import pipeline
from ffmerge.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.cka(snakemake.input.features, {"ff_out": snakemake.output.ff_out, "attn_out": snakemake.output.attn_out})
