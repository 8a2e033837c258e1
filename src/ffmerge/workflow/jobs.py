"""Around every Snakemake job script: its log file and its thread budget. Imports no torch at module level,
so the report jobs (which never touch a model) start fast and run in the light report environment."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The pid of the Snakemake process of a local run (set by the Snakefile's onstart handler; absent on a cluster,
# where jobs outlive the driver by design and SLURM owns their lifetime)
SNAKEMAKE_PID_ENV = "FFMERGE_SNAKEMAKE_PID"
FORKED_ENV = "FFMERGE_FORKED"  # set inside a fork of the fork server (ffmerge.workflow.forkserver)
_watching: list[int] = []  # the pid this process already watches (one watchdog per process)


def die_with_snakemake(poll_s: float = 1.0) -> None:
    """Kill this job process as soon as the Snakemake process of its local run is gone.

    Snakemake killed on its own (SIGKILL, the OOM killer, a closed terminal) leaves its jobs running, and the
    rerun that follows would start the same jobs again: two processes writing one fine-tune's checkpoints. A job
    of a dead run can never be recorded as finished anyway, so it stops at once, as it would have if the whole
    process group had been killed. Forks of the fork server need no watchdog of their own: they die with the job
    process that waits for them (``ffmerge.workflow.forkserver``).
    """
    pid = os.environ.get(SNAKEMAKE_PID_ENV)
    if not pid or os.environ.get(FORKED_ENV) or _watching:
        return
    _watching.append(int(pid))
    threading.Thread(target=_watch, args=(int(pid), poll_s), daemon=True, name="die-with-snakemake").start()


def _watch(pid: int, poll_s: float) -> None:
    while process_alive(pid):
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): kill(0) is all there is
        return True
    return state not in ("Z", "X")


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
    """Everything a job script needs around its one call: its log file, the threads and the GPUs it was given.

    torch would otherwise start one thread per core in every job; with several jobs per machine the
    oversubscribed threads spin against each other and everything slows down.
    """
    die_with_snakemake()
    torch = sys.modules.get("torch")  # scripts import the package (and torch, if they need it) first
    if torch is not None:
        torch.set_num_threads(max(1, int(smk.threads)))
    with job_logging(smk.log[0] if smk.log else None) as logger:
        # a job given a GPU must not quietly fall back to the CPU (ffmerge.device.resolve_device)
        from ..device import grant_gpus

        grant_gpus(dict(smk.resources.items()) if smk.resources is not None else {})
        yield logger
