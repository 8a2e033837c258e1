"""A pre-imported interpreter that local job scripts fork from, so that no model job pays the imports again.

Every model job of the workflow is a fresh Python process that spends about 10 s importing torch and
transformers before its first useful line; the default run has 138 of them, 11-12 minutes of its wall time
on 2 cores. For a local run the Snakefile starts one server that imports the package once (``serve``).
Each job script calls ``delegate`` first: it hands its standard streams (over a Unix socket, as file
descriptors), working directory, arguments and environment to the server, which forks; the fork runs the
very same Snakemake script file, and the job process only waits, relays signals and exits with the fork's
status. Anything the hand-off cannot guarantee to be equivalent runs in-process as before:

- no server (a cluster run starts none; ``fork_server: false``; a server still importing or gone);
- another interpreter (a conda env of its own: ``--sdm conda``);
- an environment variable that libraries read at import time (``HF_*``, ``TORCH*``, ``CUDA_*``,
  ``PYTHON*``...) differing from the server's, since the server's imports saw its own values.

The fork must die with its job: a watchdog thread in the fork reads the job's socket, and when the job
process is gone (even by SIGKILL, the socket then closes) it kills the fork at once, exactly as a job killed
without the server would stop. The server itself exits when the Snakemake process that started it is gone.

Snakemake's ``benchmark:`` files measure the job process and its children, which the fork is not: their
wall time stays right, while CPU time and peak memory would only be the waiting client's. The client
therefore writes the fork's own figures (from ``wait4``) next to the job's log (``usage_path``), and
``ffmerge.report.tables.stage_times`` uses them in place of the benchmark's.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .atomic import remove_json_scratch, write_json
from .jobs import FORKED_ENV, die_with_snakemake, process_alive  # FORKED_ENV: delegate() runs in place

SOCKET_ENV = "FFMERGE_FORK_SERVER"  # the server's socket path; set for the jobs of a local run
DEFAULT_PRELOAD = ("ffmerge.workflow.pipeline", "snakemake.iocontainers", "snakemake.logging", "snakemake.script")
# Read by libraries while they are imported (huggingface_hub's offline flag, torch's allocator settings,
# the CUDA device list, Python's own flags): a job whose values differ cannot reuse the server's imports.
IMPORT_TIME_ENV_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TORCH", "PYTORCH", "CUDA_", "PYTHON", "LD_")
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def usage_path(log_path: str | Path) -> Path:
    """Where a forked job's CPU time and peak memory are recorded: beside its Snakemake log."""
    return Path(log_path).with_suffix(".usage.json")


def interpreter_identity() -> dict[str, str]:
    return {"executable": sys.executable, "prefix": sys.prefix, "version": sys.version}


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_ENV_PREFIXES)}


# --------------------------------------------------------------------------------------------- client side


def delegate(smk: Any = None) -> None:
    """Run the calling job script in a fork of the server and exit with its status; return (and let the
    script run here) when there is no usable server. Call it first thing, before the heavy imports.

    ``smk`` is the script's ``snakemake`` object; its log decides where the fork's usage is written.
    """
    if os.environ.get(FORKED_ENV):
        return
    die_with_snakemake()  # here, before waiting: the fork dies with this process, this process with Snakemake
    log = smk.log[0] if smk is not None and smk.log else None
    if log:
        with contextlib.suppress(FileNotFoundError):
            usage_path(log).unlink()  # a stale record of an earlier forked run of this job
        # and what a run killed while writing it left; this run may not write it again (no server: in-process)
        remove_json_scratch(usage_path(log))
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:  # not started yet, or gone: run here
        conn.close()
        return
    reader = conn.makefile("rb")
    # held back until the fork's pid is known (then relayed to it) or the job runs here (then as usual)
    signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED_SIGNALS)
    try:
        socket.send_fds(conn, [b"F"], [0, 1, 2])
        request = {
            "argv": sys.argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "interpreter": interpreter_identity(),
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(reader.readline() or b"{}")
    except OSError:
        reply = {}
    if not reply.get("accepted"):
        reason = reply.get("reason", "the server did not answer")
        print(f"ffmerge fork server: running in-process ({reason})", file=sys.stderr, flush=True)
        conn.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED_SIGNALS)
        return
    _wait_for_fork(conn, reader, int(reply["pid"]), log)


def _wait_for_fork(conn: socket.socket, reader: Any, pid: int, log: str | None) -> None:
    def relay(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in RELAYED_SIGNALS:
        signal.signal(signum, relay)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED_SIGNALS)
    line = reader.readline()  # the server answers once the fork has exited
    status = json.loads(line) if line else {"exit": 1, "error": "the fork server closed the connection"}
    if "error" in status:
        print(f"ffmerge fork server: {status['error']}", file=sys.stderr, flush=True)
    if log and "cpu_s" in status:
        # makes the log folder too, which a job that failed early never made
        write_json(usage_path(log), {"pid": pid, "cpu_s": status["cpu_s"], "max_rss_mb": status["max_rss_mb"]})
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    code = int(status["exit"])
    if code < 0:  # the fork died of a signal: so does this job, for Snakemake to see the same
        for signum in RELAYED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(5)  # signals that do not kill (SIGCHLD...) fall through to a plain exit
    os._exit(code if code >= 0 else 128 - code)


# --------------------------------------------------------------------------------------------- server side


def serve(path: str, parent_pid: int | None, preload: tuple[str, ...] = DEFAULT_PRELOAD) -> None:
    """Import ``preload``, then fork one child per job that connects, until ``parent_pid`` is gone.

    Single-threaded on purpose: a fork copies only the forking thread, so a server with threads could hand
    its forks a lock held forever. No torch computation ever runs here, so the forks start with no thread
    pool and no CUDA context.
    """
    env_before = dict(os.environ)
    for module in preload:
        importlib.import_module(module)
    identity = interpreter_identity()
    server_env = import_time_env(env_before)  # what the imports saw
    # set by the imports themselves (torch sets TORCHINDUCTOR_CACHE_DIR): a fresh job's imports would too
    set_by_imports = {key: value for key, value in os.environ.items() if key not in env_before}
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes the select below
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # fork pid -> its job's connection
    print(f"fork server {os.getpid()} listening on {path}", flush=True)

    def fork_job(conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            request = json.loads(conn.makefile("rb").readline())
            missing = {"argv", "cwd", "env", "interpreter"} - set(request)
            if missing:
                raise ValueError(f"the request lacks {sorted(missing)}")
        except (OSError, ValueError, TypeError) as error:
            print(f"dropped a job that sent no valid request: {error!r}", flush=True)
            conn.close()
            return
        conn.settimeout(None)
        reason = _refusal(request, identity, server_env)
        if reason or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _send(conn, {"accepted": False, "reason": reason or "the job did not pass its standard streams"})
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                listener.close()
                selector.close()
                for fd in (wake_r, wake_w):
                    os.close(fd)
                for other in jobs.values():  # the connections of the other running jobs
                    other.close()
                code = _run_forked(conn, fds, {**set_by_imports, **request["env"]}, request)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        jobs[pid] = conn
        print(f"job {pid}: {' '.join(request['argv'])}", flush=True)

    def reap() -> None:
        while jobs:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = jobs.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            cpu_s = round(usage.ru_utime + usage.ru_stime, 2)
            print(f"job {pid}: exit {code}, {cpu_s} s CPU", flush=True)  # logged before the job can end
            _send(conn, {"exit": code, "cpu_s": cpu_s, "max_rss_mb": round(usage.ru_maxrss / 1024, 1)})
            conn.close()

    while parent_pid is None or process_alive(parent_pid):
        for key, _ in selector.select(timeout=2.0):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                fork_job(conn)
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        reap()
    print(f"fork server {os.getpid()}: parent {parent_pid} is gone, exiting", flush=True)
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):  # the folder ForkServer made for the socket, if empty now
        os.rmdir(os.path.dirname(path))


def _refusal(request: dict[str, Any], identity: dict[str, str], server_env: dict[str, str]) -> str | None:
    """Why this job must not run in a fork of this server, or None when it may."""
    if request.get("interpreter") != identity:
        return f"the job runs {request.get('interpreter', {}).get('executable')}, the server {identity['executable']}"
    job_env = import_time_env(request["env"])
    differing = sorted(key for key in job_env.keys() | server_env.keys() if job_env.get(key) != server_env.get(key))
    if differing:
        return f"environment variables read at import time differ from the server's: {', '.join(differing)}"
    return None


def _run_forked(conn: socket.socket, fds: list[int], env: dict[str, str], request: dict[str, Any]) -> int:
    """In the fork: become the job (its streams, directory, environment, arguments) and run its script.

    The fork, not the server, tells the job that it was accepted: a job that hears nothing can then run
    in-process without any chance that a fork runs the script as well."""
    _send(conn, {"accepted": True, "pid": os.getpid()})
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    os.environ[FORKED_ENV] = "1"
    sys.argv = list(request["argv"])
    threading.Thread(target=_die_with_job, args=(conn,), daemon=True).start()
    code: int = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # what the end of a fresh interpreter runs (logging's flush...)
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _die_with_job(conn: socket.socket) -> None:
    """The job sends nothing after its request: end of stream means the job process is gone."""
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the job may be gone; its fork then dies by itself
        conn.sendall(json.dumps(message).encode() + b"\n")


# ------------------------------------------------------------------------------------ starting and stopping


class ForkServer:
    """A running server, started by the Snakefile's onstart handler for local runs."""

    def __init__(self, log_path: str | Path, preload: tuple[str, ...] = DEFAULT_PRELOAD) -> None:
        self.folder = tempfile.mkdtemp(prefix="ffmerge-fork-")  # short: socket paths have ~100 bytes
        self.path = os.path.join(self.folder, "server.sock")
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            command = [sys.executable, "-m", "ffmerge.workflow.forkserver", self.path, "--parent", str(os.getpid())]
            self.process = subprocess.Popen(
                [*command, "--preload", *preload],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the jobs, which relay it; not the server
            )
        os.environ[SOCKET_ENV] = self.path  # jobs inherit the environment of the Snakemake process

    def wait_ready(self, timeout: float) -> bool:
        """Whether the server listens within ``timeout`` seconds (tests; runs never wait for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if os.path.exists(self.path):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        os.environ.pop(SOCKET_ENV, None)
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("socket", help="path of the Unix socket to listen on")
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    parser.add_argument("--preload", nargs="*", default=list(DEFAULT_PRELOAD), help="modules to import once")
    args = parser.parse_args(argv)
    serve(args.socket, args.parent, tuple(args.preload))


if __name__ == "__main__":
    main()
