"""Snakemake script: per-task tables (Table 9 results, Table 4 int8) stacked into one with a task column."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    # params.table: "int8" (Table 4) or "table9"; the rule's param avoids "results", a prefix of the output paths
    readers = {"int8": (figures.read_int8, "int8"), "table9": (figures.read_results, "results")}
    reader, what = readers[snakemake.params.table]
    frames = figures.read_per_task(reader, snakemake.params.tasks, snakemake.input.tables)
    frame, notes = figures.combined_table(frames, what)
    for note in notes:
        log.warning(note)
    out = snakemake.output
    figures.write_report_table(frame, notes, out.csv, out.md, out.html, snakemake.params.title)
