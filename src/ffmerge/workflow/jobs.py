"""Around every Snakemake job script: its log file and its thread budget. Imports no torch at module level,
so the report jobs (which never touch a model) start fast and run in the light report environment."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    torch = sys.modules.get("torch")  # scripts import the package (and torch, if they need it) first
    if torch is not None:
        torch.set_num_threads(max(1, int(smk.threads)))
    with job_logging(smk.log[0] if smk.log else None) as logger:
        yield logger
