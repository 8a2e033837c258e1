"""Tests for ffmerge.workflow.forkserver: a job handed to the server behaves as if it had run in its own process
(streams, directory, arguments, exit status, signals, death by SIGKILL, numbers), and runs in-process
whenever the hand-off could not be equivalent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from ffmerge.report.tables import stage_times
from ffmerge.workflow.forkserver import SOCKET_ENV, ForkServer, usage_path

JOB = textwrap.dedent(
    """
    import json, os, sys, time
    from types import SimpleNamespace
    from ffmerge.workflow.forkserver import delegate

    delegate(SimpleNamespace(log=[sys.argv[1]]))
    print(json.dumps({"pid": os.getpid(), "forked": os.environ.get("FFMERGE_FORKED"), "cwd": os.getcwd(),
                      "argv": sys.argv[1:], "job_var": os.environ.get("JOB_VAR")}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    action = sys.argv[2]
    if action == "sleep":
        time.sleep(60)
    elif action == "burn":
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
    elif action == "raise":
        raise RuntimeError("the job failed")
    sys.exit(int(sys.argv[3]))
    """
)


def _server(tmp_path: Path, preload: tuple[str, ...]) -> ForkServer:
    server = ForkServer(tmp_path / "server.log", preload=preload)
    if not server.wait_ready(timeout=120):
        server.stop()
        pytest.fail((tmp_path / "server.log").read_text())
    return server


@pytest.fixture
def server(tmp_path):
    server = _server(tmp_path, preload=("json",))
    yield server
    server.stop()


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(JOB)
    return path


def _job_env(server_path: str | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != SOCKET_ENV}
    if server_path:
        env[SOCKET_ENV] = server_path
    return {**env, **extra}


def _start(job: Path, env: dict[str, str], *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(job), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_delegated_job_runs_in_a_fork_with_its_own_streams_directory_arguments_and_exit_code(server, job, tmp_path):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    log = tmp_path / "job.log"
    run = _start(job, _job_env(server.path, JOB_VAR="from the job"), str(log), "exit", "3", cwd=workdir)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 3, err
    seen = json.loads(out)
    assert seen["pid"] != run.pid and seen["forked"] == "1"
    assert seen["cwd"] == str(workdir)
    assert seen["argv"] == [str(log), "exit", "3"]
    assert seen["job_var"] == "from the job"  # the job's environment, not the server's
    assert "to stderr" in err
    usage = json.loads(usage_path(log).read_text())
    assert usage["pid"] == seen["pid"] and usage["max_rss_mb"] > 0


def test_an_exception_in_the_fork_fails_the_job_with_its_traceback(server, job, tmp_path):
    run = _start(job, _job_env(server.path), str(tmp_path / "job.log"), "raise", "0", cwd=tmp_path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1
    assert json.loads(out)["forked"] == "1"
    assert "RuntimeError: the job failed" in err


def test_without_a_server_the_job_runs_in_process(job, tmp_path):
    run = _start(job, _job_env(str(tmp_path / "no-server.sock")), str(tmp_path / "job.log"), "exit", "0", cwd=tmp_path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    seen = json.loads(out)
    assert seen["pid"] == run.pid and seen["forked"] is None
    assert not usage_path(tmp_path / "job.log").exists()


def test_a_job_removes_the_usage_scratch_a_killed_run_left_even_when_it_runs_in_process(job, tmp_path):
    """A run killed while writing its usage record leaves a scratch copy; the next run of the job may not write the
    record at all (no server), so it removes the copy when it starts."""
    log = tmp_path / "job.log"
    left = usage_path(log).with_name(f".{usage_path(log).name}.k1ll3d.tmp")
    left.write_text('{"pid": 1')
    unrelated = tmp_path / ".other.usage.json.abc.tmp"
    unrelated.write_text("{")
    run = _start(job, _job_env(str(tmp_path / "no-server.sock")), str(log), "exit", "0", cwd=tmp_path)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert not left.exists() and unrelated.exists()


def test_a_job_whose_import_time_environment_differs_runs_in_process(server, job, tmp_path):
    env = _job_env(server.path, HF_HUB_OFFLINE="0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    run = _start(job, env, str(tmp_path / "job.log"), "exit", "0", cwd=tmp_path)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert json.loads(out)["pid"] == run.pid
    assert "running in-process" in err and "HF_HUB_OFFLINE" in err


def test_sigterm_to_the_job_reaches_its_fork(server, job, tmp_path):
    run = _start(job, _job_env(server.path), str(tmp_path / "job.log"), "sleep", "0", cwd=tmp_path)
    fork = json.loads(run.stdout.readline())["pid"]
    run.send_signal(signal.SIGTERM)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGTERM  # the job dies of the signal its fork died of
    assert _wait_gone(fork)
    assert f"job {fork}: exit -{signal.SIGTERM.value}," in (tmp_path / "server.log").read_text()  # not the watchdog


def test_a_job_killed_with_sigkill_takes_its_fork_with_it(server, job, tmp_path):
    run = _start(job, _job_env(server.path), str(tmp_path / "job.log"), "sleep", "0", cwd=tmp_path)
    fork = json.loads(run.stdout.readline())["pid"]
    assert _alive(fork)
    run.kill()
    run.wait(timeout=30)
    assert _wait_gone(fork), "the fork outlived its job"
    # the server goes on serving
    again = _start(job, _job_env(server.path), str(tmp_path / "job2.log"), "exit", "0", cwd=tmp_path)
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and json.loads(out)["forked"] == "1"


def test_stage_times_take_cpu_and_memory_of_a_forked_job_from_its_usage_file(server, job, tmp_path):
    logs, bench = tmp_path / "logs", tmp_path / "benchmarks"
    log = logs / "lm" / "finetune" / "permute" / "1of3" / "best.log"
    log.parent.mkdir(parents=True)
    run = _start(job, _job_env(server.path), str(log), "burn", "0", cwd=tmp_path)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    tsv = bench / "lm" / "finetune" / "permute" / "1of3" / "best.tsv"
    tsv.parent.mkdir(parents=True)
    # what Snakemake measured: the waiting job process, not its fork
    pd.DataFrame([{"s": 2.0, "cpu_time": 0.01, "max_rss": 20.0}]).to_csv(tsv, sep="\t", index=False)
    row = stage_times(bench, logs).iloc[0]
    assert row["rule"] == "finetune" and row["wall_s"] == 2.0
    assert row["cpu_s"] >= 0.45  # the fork burned 0.5 s of CPU
    assert row["max_rss_mb"] == json.loads(usage_path(log).read_text())["max_rss_mb"]
    assert stage_times(bench).iloc[0]["cpu_s"] == 0.01  # without the logs: the benchmark's own figure


def test_the_server_exits_when_its_parent_is_gone(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    path = tmp_path / "s.sock"
    command = [sys.executable, "-m", "ffmerge.workflow.forkserver", str(path), "--parent", str(parent.pid), "--preload"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent.wait()
    out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    assert "is gone, exiting" in out and not path.exists()


FORWARD = textwrap.dedent(
    """
    import sys
    from ffmerge.workflow.forkserver import delegate

    delegate()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32))
    ids = torch.randint(0, 97, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    print(repr(loss.item()), repr(model(ids).logits.double().sum().item()))
    """
)


@pytest.mark.slow
def test_a_torch_job_in_a_fork_computes_exactly_what_a_fresh_interpreter_does(tmp_path):
    script = tmp_path / "forward.py"
    script.write_text(FORWARD)
    fresh = subprocess.run([sys.executable, str(script)], env=_job_env(None), capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    server = _server(tmp_path, preload=("torch", "transformers.models.gpt2.modeling_gpt2"))
    try:
        forked = subprocess.run(
            [sys.executable, str(script)], env=_job_env(server.path), capture_output=True, text=True
        )
    finally:
        server.stop()
    assert forked.returncode == 0, forked.stderr
    assert forked.stdout == fresh.stdout
    assert f"{script}\n" in (tmp_path / "server.log").read_text(), forked.stderr  # it really ran in a fork
