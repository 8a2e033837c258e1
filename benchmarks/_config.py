"""A finished workflow's config as the benchmarks read it: validated against the schema (defaults filled in)."""

from __future__ import annotations

from pathlib import Path

import yaml
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parent.parent


def task_config(path: Path, task: str) -> tuple[dict, Path]:
    """``(the task's config block, the results folder)`` of the config at ``path``."""
    config = yaml.safe_load(Path(path).read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config["tasks"][task], Path(config["results_dir"])
