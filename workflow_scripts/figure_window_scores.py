"""Snakemake script: Figure 10, every window's validation metric before fine-tuning (first fraction), per task."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    scores = figures.read_per_task(figures.read_window_scores, snakemake.params.tasks, snakemake.input.windows)
    fig, notes = figures.window_scores_figure(scores, snakemake.params.first_fractions, titles=snakemake.params.titles)
    for note in notes:
        log.warning(note)
    figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
