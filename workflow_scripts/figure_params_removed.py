"""Snakemake script: Figure 3, metric after fine-tuning vs % of parameters removed (merge vs drop), per task."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    results = figures.read_per_task(figures.read_results, snakemake.params.tasks, snakemake.input.table9)
    fig, notes = figures.params_removed_figure(results, titles=snakemake.params.titles)
    for note in notes:
        log.warning(note)
    figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
