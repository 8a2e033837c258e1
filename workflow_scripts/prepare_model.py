"""Snakemake script: hub id, local folder or packaged offline model -> a plain transformers folder."""

from ffmerge.sources import prepare_model
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    prepare_model(dict(snakemake.params.source), snakemake.output[0])
