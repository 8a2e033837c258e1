"""Snakemake script: the neuron permutations of every (anchor, layer) pair the permute window searches need."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.align(snakemake.params.cfg, snakemake.input.features, snakemake.output[0])
