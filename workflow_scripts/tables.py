"""Snakemake script: result tables (CSV and Markdown) from the evaluation files alone."""

from ffmerge import report
from ffmerge.workflow import job_logging

with job_logging(snakemake.log[0]):
    report.tables(snakemake.input, snakemake.output)
