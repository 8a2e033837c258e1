"""Snakemake script: recovery fine-tuning, resuming from the last checkpoint in the work folder; then the
fine-tuned model's test metric."""

from ffmerge.workflow.forkserver import delegate

delegate(snakemake)  # a local run forks this job from a pre-imported interpreter

from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import snakemake_job

with snakemake_job(snakemake):
    pipeline.run_finetune(
        snakemake.params.cfg,
        snakemake.input.model,
        snakemake.input.data,
        snakemake.params.work,
        snakemake.output.model,
        snakemake.params.device,
        eval_json=snakemake.output.eval,
        teacher_dir=snakemake.input.teacher,
    )
