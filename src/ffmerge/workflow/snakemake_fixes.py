"""Workarounds for Snakemake scheduler behaviour that costs this workflow measurable compute.

Applied from the Snakefile, in the process that schedules the jobs. Each one checks that the code it replaces is
still there and does nothing otherwise, so a Snakemake release that changes it is never half-patched.
"""

from __future__ import annotations

import threading
import time

_LOCK = threading.Lock()


def coalesce_reevaluation_timers(scheduler_cls: type | None = None) -> bool:
    """Keep at most one pending wake-up timer in Snakemake's job scheduler; returns whether it was patched.

    Snakemake 9's ``JobScheduler.schedule`` loop ends every pass with ``_schedule_reevalutation(timespan)``: a new
    ``threading.Timer`` that wakes the loop after ``--max-jobs-per-timespan``'s timespan (1 s by default), so that
    jobs held back by the rate limit get another chance. Every pass starts one, including the passes woken by a
    finished job or by another timer, so each finished job adds a timer chain that never ends: after n jobs the
    loop runs about n times a second, and each pass resets the params and resources of every waiting job and
    stats their inputs. In the default run (158 jobs, 2 cores) the snakemake process had 131 threads and used 31 %
    of a core three quarters of the way in (565 s of CPU in 55 min), all of it taken from the jobs.

    Here a request is dropped when a pending timer already wakes the loop no later than it would, so the loop
    still wakes at least once per timespan and on every finished job, as before. The timers are daemon threads:
    a last pending one no longer holds up the exit.
    """
    if scheduler_cls is None:
        from snakemake.scheduling.job_scheduler import JobScheduler as scheduler_cls
    if getattr(scheduler_cls, "_ffmerge_coalesced", False):
        return True
    if not callable(getattr(scheduler_cls, "_schedule_reevalutation", None)):
        return False

    def schedule_reevaluation(self, delay: float) -> None:
        wake_at = time.monotonic() + delay
        with _LOCK:
            pending = getattr(self, "_ffmerge_wake_at", None)
            if pending is not None and pending <= wake_at:
                return
            self._ffmerge_wake_at = wake_at

        def wake() -> None:
            with _LOCK:
                if self._ffmerge_wake_at == wake_at:
                    self._ffmerge_wake_at = None
            self._open_jobs.release()

        timer = threading.Timer(delay, wake)
        timer.daemon = True
        timer.start()

    scheduler_cls._schedule_reevalutation = schedule_reevaluation
    scheduler_cls._ffmerge_coalesced = True
    return True
