"""Snakemake script: Table 2, the best pre-fine-tuning window vs random windows after fine-tuning."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    tasks = snakemake.params.tasks
    results = figures.read_per_task(figures.read_results, tasks, snakemake.input.table9)
    scores = figures.read_per_task(figures.read_window_scores, tasks, snakemake.input.windows)
    frame, notes = figures.windows_table(results, scores, snakemake.params.first_fractions)
    for note in notes:
        log.warning(note)
    out = snakemake.output
    figures.write_report_table(frame, notes, out.csv, out.md, out.html, "Table 2: best window vs random windows")
