"""Snakemake script: each main result beside the paper's published number for the same cell."""

from ffmerge.report import figures
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake) as log:
    results = figures.read_per_task(figures.read_results, snakemake.params.tasks, snakemake.input.table9)
    paper = figures.load_paper_results(snakemake.input.paper)
    frame, notes = figures.paper_comparison(results, snakemake.params.configs, paper)
    for note in notes:
        log.info(note)
    out = snakemake.output
    figures.write_report_table(
        frame,
        notes,
        out.csv,
        out.md,
        out.html,
        "Our results vs the paper's",
        extra_md=figures.paper_values_markdown(paper),
    )
