"""Snakemake script: Table 3, merge anchor first / middle / last after fine-tuning."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    results = figures.read_per_task(figures.read_results, snakemake.params.tasks, snakemake.input.table9)
    frame, notes = figures.anchors_table(results, snakemake.params.first_fractions)
    for note in notes:
        log.warning(note)
    out = snakemake.output
    figures.write_report_table(frame, notes, out.csv, out.md, out.html, "Table 3: merge anchor")
