"""The scheduler wake-up workaround: one pending timer instead of one more chain per scheduling pass."""

from __future__ import annotations

import threading

from ffmerge.workflow.snakemake_fixes import coalesce_reevaluation_timers


def make_scheduler_class() -> type:
    class Scheduler:
        """Snakemake's JobScheduler as far as the workaround touches it (same method body upstream)."""

        def __init__(self) -> None:
            self._open_jobs = threading.Semaphore(0)

        def _schedule_reevalutation(self, delay: float) -> None:
            threading.Timer(delay, lambda: self._open_jobs.release()).start()

    return Scheduler


def wakes(scheduler, timeout: float) -> int:
    """How many times the scheduling loop would be woken within ``timeout`` seconds."""
    count = 0
    while scheduler._open_jobs.acquire(timeout=timeout):
        count += 1
    return count


def test_unpatched_passes_pile_up_timers_that_each_wake_the_loop():
    scheduler = make_scheduler_class()()
    for _ in range(5):
        scheduler._schedule_reevalutation(0.05)
    assert wakes(scheduler, 0.5) == 5


def test_repeated_requests_keep_one_pending_timer():
    cls = make_scheduler_class()
    assert coalesce_reevaluation_timers(cls)
    scheduler = cls()
    before = threading.active_count()
    for _ in range(20):
        scheduler._schedule_reevalutation(0.2)
    assert threading.active_count() - before == 1
    assert wakes(scheduler, 0.6) == 1


def test_the_loop_still_wakes_once_per_timespan():
    cls = make_scheduler_class()
    coalesce_reevaluation_timers(cls)
    scheduler = cls()
    for _ in range(3):
        scheduler._schedule_reevalutation(0.05)
        assert scheduler._open_jobs.acquire(timeout=2)
        scheduler._schedule_reevalutation(0.05)  # the pass woken by the timer asks for the next wake-up
        assert wakes(scheduler, 0.3) == 1


def test_a_sooner_request_is_not_held_back_by_a_later_pending_timer():
    cls = make_scheduler_class()
    coalesce_reevaluation_timers(cls)
    scheduler = cls()
    scheduler._schedule_reevalutation(5.0)  # e.g. the 10 s wait for queue input
    scheduler._schedule_reevalutation(0.05)
    assert scheduler._open_jobs.acquire(timeout=1)


def test_timers_do_not_hold_up_the_exit():
    cls = make_scheduler_class()
    coalesce_reevaluation_timers(cls)
    scheduler = cls()
    scheduler._schedule_reevalutation(5.0)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]
    assert timers and all(t.daemon for t in timers)


def test_patching_twice_wraps_once():
    cls = make_scheduler_class()
    assert coalesce_reevaluation_timers(cls)
    patched = cls._schedule_reevalutation
    assert coalesce_reevaluation_timers(cls)
    assert cls._schedule_reevalutation is patched


def test_a_scheduler_without_the_method_is_left_alone():
    class Other:
        pass

    assert not coalesce_reevaluation_timers(Other)
    assert not hasattr(Other, "_schedule_reevalutation")


def test_the_installed_snakemakes_scheduler_gets_the_workaround():
    # fails when Snakemake renames or removes the method: then check whether the workaround is still needed. The
    # Snakefile patches the same class, so workflow tests in this process may have patched it already.
    from snakemake.scheduling.job_scheduler import JobScheduler

    assert coalesce_reevaluation_timers(JobScheduler)
    scheduler = object.__new__(JobScheduler)  # only the semaphore the method releases
    scheduler._open_jobs = threading.Semaphore(0)
    for _ in range(10):
        scheduler._schedule_reevalutation(0.05)
    assert wakes(scheduler, 0.5) == 1
