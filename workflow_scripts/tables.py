"""Snakemake script: result tables (CSV and Markdown) from the evaluation files alone."""

from ffmerge.report import tables as report
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    report.tables(snakemake.input, snakemake.output)
