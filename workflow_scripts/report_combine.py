"""Snakemake script: per-task tables (Table 9 results, Table 4 int8) stacked into one with a task column."""

from ffmerge import figures
from ffmerge.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    what = snakemake.params.what
    reader = {"int8": figures.read_int8, "results": figures.read_results}[what]
    frames = figures.read_per_task(reader, snakemake.params.tasks, snakemake.input.tables)
    frame, notes = figures.combined_table(frames, what)
    for note in notes:
        log.warning(note)
    out = snakemake.output
    figures.write_report_table(frame, notes, out.csv, out.md, out.html, snakemake.params.title)
