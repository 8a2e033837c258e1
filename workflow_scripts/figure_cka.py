"""Snakemake script: Figures 5 and 6, the linear-CKA heatmap of FF outputs or attention outputs of one model."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    fig = figures.cka_figure(figures.read_cka(snakemake.input[0]), snakemake.params.title)
    figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
