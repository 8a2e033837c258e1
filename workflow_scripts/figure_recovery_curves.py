"""Snakemake script: recovery curves, validation metric during fine-tuning vs examples seen, per variant."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    curves = figures.read_per_task(figures.read_recovery_curves, snakemake.params.tasks, snakemake.input.curves)
    fig, notes = figures.recovery_curves_figure(
        curves, snakemake.params.first_fractions, titles=snakemake.params.titles
    )
    for note in notes:
        log.warning(note)
    figures.save_figure(fig, snakemake.output.png, snakemake.output.pdf)
