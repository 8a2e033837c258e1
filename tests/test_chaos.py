"""Crash anywhere and lose nothing: a run of a tiny model killed at seeded random moments ends exactly as an
uninterrupted one.

The whole process group (Snakemake, its jobs; the fork server runs in a session of its own) is killed with SIGKILL
at several moments, once only the Snakemake process, leaving its jobs and the fork server orphaned, and once with
Ctrl-C (SIGINT to the group). After each the run is restarted as the README tells users to: the same command with
``--rerun-incomplete``, after ``snakemake --unlock`` where a hard kill left Snakemake's lock behind. The test
checks that the result files equal an uninterrupted run's byte for byte, that no job recorded as finished before
a kill ran again, that no process of a killed run outlives it, and that fine-tunes killed after a checkpoint
resumed from it. The unit tests below cover the two pieces this needs: jobs that die with their Snakemake
process, and scratch copies of killed writers that are cleaned up.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from ffmerge.workflow.atomic import atomic_output_dir, write_json
from ffmerge.workflow.jobs import SNAKEMAKE_PID_ENV, process_alive
from tests.slurm.tiny import save_tiny_llama, tiny_config

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
MARKER_ENV = "FFMERGE_CHAOS_RUN"  # every process of a run inherits it: how orphans are found
SEED = 20261201
GROUP_KILLS = 5
# the result files that must equal an uninterrupted run's, relative to the task's folder
COMPARED = ("tables", "eval", "selection", "int8", "cka")
# records of how the run went, not results: how long a step took (the repair's seconds in eval/.../pre.json) and
# the step a fine-tune resumed from (post.json; it must differ: that is the point)
RUN_HISTORY_KEYS = {"seconds", "resumed_from"}
# folders of the results tree that are not results (logs and timings differ between runs by nature)
NOT_RESULTS = {"logs", "benchmarks", "work", "report"}


# --------------------------------------------------------------------------------------------------------------
# Jobs die with their Snakemake process; killed writers' scratch copies are removed by the next writer
# --------------------------------------------------------------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child_code, pid_env = sys.argv[1:]
    child = subprocess.Popen([sys.executable, "-c", child_code], env={**os.environ, pid_env: str(os.getpid())})
    print(child.pid, flush=True)
    time.sleep(600)
    """
)
CHILD = "from ffmerge.workflow.jobs import die_with_snakemake; import time; die_with_snakemake(0.1); time.sleep(600)"


def test_a_job_dies_when_its_snakemake_process_is_killed():
    command = [sys.executable, "-c", PARENT, CHILD, SNAKEMAKE_PID_ENV]
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has imported and started its watchdog
    assert process_alive(child)
    parent.kill()
    parent.wait()
    assert _gone_within([child], 10), "the job outlived the Snakemake process it belonged to"


def test_a_job_without_a_snakemake_process_to_watch_keeps_running(monkeypatch):
    """Cluster jobs (no pid recorded) and forks of the fork server never start the watchdog."""
    env = {k: v for k, v in os.environ.items() if k != SNAKEMAKE_PID_ENV}
    job = subprocess.Popen([sys.executable, "-c", CHILD], env=env)
    try:
        time.sleep(2.0)
        assert job.poll() is None
    finally:
        job.kill()
        job.wait()


def test_scratch_copies_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    out = tmp_path / "model"
    (tmp_path / ".model.tmp-dead1").mkdir()  # a save killed half-way
    (tmp_path / ".model.tmp-dead1" / "weights").write_bytes(b"x" * 1000)
    (tmp_path / ".model.old-dead2").mkdir()  # a replacement killed between its two renames
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not this writer's business
    (tmp_path / ".pre.json.abc.tmp").write_text("{")
    with atomic_output_dir(out, "done") as tmp:
        (tmp / "done").write_text("1")
    write_json(tmp_path / "pre.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-keep", "model", "pre.json"]


# --------------------------------------------------------------------------------------------------------------
# The chaos run
# --------------------------------------------------------------------------------------------------------------


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(process_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _run_processes(marker: str) -> list[int]:
    """Every live process that inherited this run's marker (Snakemake, jobs, the fork server and its forks)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER_ENV}={marker}".encode() in environ.split(b"\0") and process_alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _checkpointed_since(results: Path, since: float) -> bool:
    """Whether a fine-tune has written its resume state (last.pt) since ``since`` (wall clock)."""
    for path in results.glob("*/work/finetune/**/last.pt"):
        try:
            if path.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # the fine-tune finished and deleted its work folder
            continue
    return False


def _resumed_finetunes(results: Path) -> set[str]:
    """The fine-tunes whose current job log says they resumed from a checkpoint (Snakemake deletes the log of an
    interrupted job when it runs it again, so each log holds one run), named as their work folders."""
    logs = results / "logs" / "tiny" / "finetune"
    return {
        log.relative_to(logs).with_suffix("").as_posix()
        for log in logs.glob("**/*.log")
        if "resumed from step" in log.read_text(errors="replace")
    }


def _chaos_config(model: Path, results: Path) -> dict:
    """The tiny Llama through every kind of job: features, in-process searches, merges with repair, layer drops,
    an anchor ablation, a random window, fine-tunes long enough to be killed between checkpoints, int8, CKA."""
    config = tiny_config(
        model,
        results,
        device="cpu",
        methods=["permute", "drop"],
        anchors=["first", "last"],
        random_windows=1,
        int8=True,
        finetune_baseline=True,
    )
    task = config["tasks"]["tiny"]
    task["repair"] = {"enabled": True, "steps": 20}
    task["finetune"] = {"max_steps": 200, "batch_size": 2, "seq_len": 32, "eval_every": 50, "checkpoint_every": 20}
    return config


def _incomplete(workdir: Path) -> set[Path]:
    """The outputs Snakemake has marked as being written (its record of a job that started and has not finished)."""
    folder = workdir / ".snakemake" / "incomplete"
    if not folder.is_dir():
        return set()
    paths = set()
    for record in folder.rglob("*"):
        if record.is_file() and record.name != "migration_underway":
            parts = record.relative_to(folder).parts  # long names are split into "@"-prefixed chunks
            encoded = "".join(part.removeprefix("@") for part in parts)
            paths.add(Path(base64.urlsafe_b64decode(encoded).decode()))
    return paths


def _finished_files(results: Path, workdir: Path) -> dict[Path, tuple[int, int]]:
    """Every result file whose job Snakemake recorded as finished, with its inode and mtime: a job that ran again
    would have written a new file (outputs are replaced by rename, never edited in place)."""
    incomplete = _incomplete(workdir)
    finished = {}
    for path in results.rglob("*"):
        relative = path.relative_to(results).parts
        if not path.is_file() or (len(relative) > 1 and relative[1] in NOT_RESULTS) or relative[0] in NOT_RESULTS:
            continue
        if any(parent in incomplete for parent in (path, *path.parents)):
            continue
        stat = path.stat()
        finished[path] = (stat.st_ino, stat.st_mtime_ns)
    return finished


def _without_run_history(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_run_history(v) for k, v in value.items() if k not in RUN_HISTORY_KEYS}
    if isinstance(value, list):
        return [_without_run_history(v) for v in value]
    return value


def _result_files(results: Path) -> dict[str, Any]:
    """The compared result files: JSON records parsed, less their run history (floats compared exactly); the rest
    (tables: CSV, Markdown, HTML) as bytes."""
    task = results / "tiny"
    files: dict[str, Any] = {}
    for folder in COMPARED:
        for path in sorted((task / folder).rglob("*")):
            if path.is_file():
                name = str(path.relative_to(results))
                is_json = path.suffix == ".json"
                files[name] = _without_run_history(json.loads(path.read_text())) if is_json else path.read_bytes()
    return files


class Run:
    """One Snakemake invocation after another on the same working directory, as a user at a terminal."""

    def __init__(self, config_path: Path, workdir: Path, marker: str, logs: Path) -> None:
        self.command = [*SNAKEMAKE, "--cores", "2", "--configfile", str(config_path), "-d", str(workdir)]
        self.env = {**os.environ, MARKER_ENV: marker}
        self.logs, self.attempt = logs, 0

    def start(self, *extra: str) -> subprocess.Popen:
        """Snakemake in a process group of its own, as a terminal starts it; its output goes to attemptN.log."""
        self.attempt += 1
        with open(self.logs / f"attempt{self.attempt}.log", "w") as log:
            return subprocess.Popen(
                [*self.command, *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def finish(self, *extra: str) -> None:
        process = self.start(*extra)
        assert process.wait() == 0, (self.logs / f"attempt{self.attempt}.log").read_text()[-4000:]

    def unlock(self) -> None:
        subprocess.run([*self.command, "--unlock"], env=self.env, capture_output=True, check=True)

    def _log(self) -> list[str]:
        return (self.logs / f"attempt{self.attempt}.log").read_text().splitlines()

    def finished_jobs(self) -> int:
        return sum("Finished jobid:" in line for line in self._log())

    def started_and_unfinished(self) -> int:
        """Jobs the last attempt started and did not see finish: they run again."""
        lines = self._log()
        started = {line.split(":")[1].strip() for line in lines if line.strip().startswith("jobid:")}
        finished = {line.split("Finished jobid:")[1].split()[0] for line in lines if "Finished jobid:" in line}
        return len(started - finished)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path):
    if not Path("/proc/self/environ").is_file():
        pytest.skip("finding a run's orphaned processes reads /proc (Linux)")
    model = save_tiny_llama(tmp_path / "model")
    results, workdir = tmp_path / "run" / "results", tmp_path / "run" / "wd"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_chaos_config(model, results)))
    logs = tmp_path / "logs"
    logs.mkdir()

    # the uninterrupted run: its results are the reference, its wall time the span the kills are drawn from
    marker = uuid.uuid4().hex
    (logs / "reference").mkdir()
    clock = time.monotonic()
    Run(config_path, workdir, marker, logs / "reference").finish()
    span = time.monotonic() - clock
    reference = _result_files(results)
    assert any(name.endswith("post.json") for name in reference) and any("tables" in n for n in reference)
    assert not _run_processes(marker), "the uninterrupted run left processes behind"
    for path in (tmp_path / "run").iterdir():
        subprocess.run(["rm", "-rf", str(path)], check=True)

    rng = random.Random(SEED)
    marker = uuid.uuid4().hex
    run = Run(config_path, workdir, marker, logs)
    finished: dict[Path, tuple[int, int]] = {}
    killed_with_checkpoint: set[tuple[str, int]] = set()  # (fine-tune, kill number): it had a last.pt then
    resumed_logs: list[tuple[int, set[str]]] = []  # after each kill and at the end: fine-tunes whose log says resumed
    redone = 0
    # The interruptions: GROUP_KILLS SIGKILLs of the whole group, one more right after a fine-tune's checkpoint,
    # one SIGKILL of Snakemake alone and one Ctrl-C. Each comes once its attempt has finished a random number of
    # jobs (so every attempt makes progress and they spread over the whole run), after a random further delay (so
    # they land anywhere inside a job).
    plan = [("group", rng.randint(1, 2), rng.uniform(0, 0.5)) for _ in range(GROUP_KILLS)]
    plan += [("snakemake", rng.randint(1, 2), rng.uniform(0, 0.5)), ("ctrl-c", rng.randint(1, 2), rng.uniform(0, 0.5))]
    rng.shuffle(plan)
    plan.insert(len(plan) // 2, ("group", "checkpoint", 0.0))  # mid-run: the fine-tunes come late in the DAG
    kills = []
    # the README: after an interruption, the same command with --rerun-incomplete; after a hard kill (which leaves
    # Snakemake's lock behind), --unlock first
    for kind, after, delay in plan:
        process = run.start("--rerun-incomplete") if kills else run.start()
        started, started_wall, ready = time.monotonic(), time.time(), None
        while process.poll() is None and (ready is None or time.monotonic() < ready):
            if ready is None and (
                _checkpointed_since(results, started_wall) if after == "checkpoint" else run.finished_jobs() >= after
            ):
                ready = time.monotonic() + delay
            time.sleep(0.02)
        if process.poll() is not None:  # the run ended before its kill moment: nothing left to interrupt
            assert process.returncode == 0, (logs / f"attempt{run.attempt}.log").read_text()[-4000:]
            break
        if kind == "ctrl-c":  # what a terminal sends to its foreground process group
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=120)
        else:
            os.kill(-process.pid if kind == "group" else process.pid, signal.SIGKILL)
            process.wait()
        kills.append((kind, round(time.monotonic() - started, 1)))
        # orphans (the fork server, jobs left by a killed Snakemake) must go by themselves, before the rerun
        assert _gone_within(_run_processes(marker), 15), f"orphans of kill {len(kills)}: {_run_processes(marker)}"
        work = results / "tiny" / "work" / "finetune"
        killed_with_checkpoint |= {(p.parent.relative_to(work).as_posix(), len(kills)) for p in work.glob("**/last.pt")}
        resumed_logs.append((len(kills), _resumed_finetunes(results)))
        redone += run.started_and_unfinished()
        now = _finished_files(results, workdir)
        for path, identity in finished.items():  # nothing recorded as finished was written again
            assert now.get(path, identity) == identity, f"{path} was finished before kill {len(kills)} and redone"
        finished.update(now)
        if kind != "ctrl-c":
            run.unlock()
    run.finish("--rerun-incomplete")
    resumed_logs.append((len(kills) + 1, _resumed_finetunes(results)))

    assert len(kills) == len(plan), f"the run ended after {len(kills)} of {len(plan)} kills: {kills}"
    assert not _run_processes(marker), "processes of the run outlived it"
    # equal to the uninterrupted run's, byte for byte (JSON records: value for value, run history aside)
    results_now = _result_files(results)
    assert sorted(results_now) == sorted(reference)
    assert [name for name in reference if results_now[name] != reference[name]] == []
    final = _finished_files(results, workdir)
    for path, identity in finished.items():
        assert final.get(path, identity) == identity, f"{path} was finished before a kill and redone"
    # killed fine-tunes went on from their last checkpoint: every later run of one starts from it, so the run that
    # finished it did (its post.json says so, unless that run too was killed after finishing, before Snakemake
    # recorded it: then the rerun starts afresh, the resume state being gone; the logs kept after each kill tell)
    assert killed_with_checkpoint, "no kill hit a fine-tune after its first checkpoint"
    for finetune, kill in sorted(killed_with_checkpoint):
        later = set().union(*(names for after, names in resumed_logs if after > kill))
        assert finetune in later, f"{finetune} had a checkpoint at kill {kill} of {kills} but never resumed from it"
    resumed = len({finetune for finetune, _ in killed_with_checkpoint})
    assert not list(results.rglob(".*.tmp*")) and not list(results.rglob(".*.old-*")), "scratch copies left"
    print(
        f"chaos: {len(kills)} interruptions ({sum(k == 'group' for k, _ in kills)} SIGKILLs of the process group, "
        f"{sum(k == 'snakemake' for k, _ in kills)} of Snakemake alone, {sum(k == 'ctrl-c' for k, _ in kills)} "
        f"Ctrl-C) at {[t for _, t in kills]} s into their attempts; "
        f"{redone} jobs redone, {resumed} fine-tunes resumed from a checkpoint; {len(reference)} result files "
        f"identical to the uninterrupted run's ({span:.0f} s)"
    )
