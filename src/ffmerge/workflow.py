"""Glue between Snakemake and the package: config checks at start-up, job planning, and per-job logging."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from . import sources
from .adapters import get_adapter
from .experiments import window_starts


class ConfigError(ValueError):
    pass


def preflight(config: dict[str, Any]) -> None:
    """Checks the JSON schema cannot express, run before any job: packaged assets exist, local models fit."""
    for name, task in config["tasks"].items():
        for key in ("model", "data"):
            source = task[key]
            if source["kind"] in ("package", "wiki_offline"):
                try:
                    sources.locate_package_dir(source["package"])
                except sources.SourceError as err:
                    raise ConfigError(f"tasks.{name}.{key}.package: {err}") from None
            if key == "model" and source["kind"] == "local":
                path = Path(source["path"])
                if not (path / "config.json").is_file():
                    raise ConfigError(f"tasks.{name}.model.path: {path} has no config.json (not a transformers folder)")
                get_adapter(AutoConfig.from_pretrained(path))


def layer_counts(model_dir: str | Path) -> dict[str, int]:
    config = AutoConfig.from_pretrained(str(model_dir))
    return get_adapter(config).config_num_layers(config)


def candidate_starts(model_dir: str | Path, variant: str, fraction: str) -> list[int]:
    return window_starts(variant, layer_counts(model_dir), fraction)


@contextlib.contextmanager
def job_logging(log_path: str | Path | None) -> Iterator[logging.Logger]:
    """Send this job's logging, warnings, stdout and stderr (progress bars) to its Snakemake log file."""
    logger = logging.getLogger("ffmerge")
    if not log_path:
        yield logger
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_path, "a", buffering=1) as stream,
        contextlib.redirect_stdout(stream),
        contextlib.redirect_stderr(stream),
    ):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # transformers' logger does not propagate to the root logger, so it gets the handler too
        targets = [logging.getLogger(), logging.getLogger("transformers")]
        for target in targets:
            target.addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield logger
        except BaseException:
            logger.exception("job failed")
            raise
        finally:
            for target in targets:
                target.removeHandler(handler)
            sys.stderr.flush()


@contextlib.contextmanager
def snakemake_job(smk: Any) -> Iterator[logging.Logger]:
    """Everything a job script needs around its one call: its log file and the threads it was given.

    torch would otherwise start one thread per core in every job; with several jobs per machine the
    oversubscribed threads spin against each other and everything slows down.
    """
    import torch

    torch.set_num_threads(max(1, int(smk.threads)))
    with job_logging(smk.log[0] if smk.log else None) as logger:
        yield logger
