"""Snakemake script: hub id, local folder or packaged offline model -> a plain transformers folder."""

from ffmerge.jobs import snakemake_job
from ffmerge.sources import prepare_model

with snakemake_job(snakemake):
    prepare_model(dict(snakemake.params.source), snakemake.output[0])
