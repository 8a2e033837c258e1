"""A throw-away single-node SLURM cluster on this machine, for tests only.

Debian's ``slurm-wlm`` and ``munge`` packages provide the daemons; this module writes a minimal configuration for
one node (``localhost``, this machine's CPUs and memory) into a temporary folder and runs munged, slurmctld and
slurmd as root in the foreground of processes we started, so that they are stopped by their process ids.

What a real cluster has and this one has not: an accounting database (``sacct`` answers "accounting storage is
disabled", so job states come from ``squeue``, which keeps finished jobs for ``MinJobAge`` seconds), cgroups
(``proctrack/linuxproc``, ``task/none``: memory and CPU limits are scheduling quantities only) and real GPUs.
The node advertises ``FAKE_GPUS`` GPUs backed by ``/dev/null``-like device files: SLURM schedules ``--gpus``
requests against them and sets ``CUDA_VISIBLE_DEVICES`` in the job, but there is no CUDA device behind them, so
``torch.cuda.is_available()`` stays false in the jobs and ``device: auto`` runs them on the CPU.

SLURM's client commands (sbatch, squeue, srun inside a job) find the configuration through ``SLURM_CONF``;
the SLURM executor plugin's job step removes every ``SLURM_*`` variable except the job's identity before it calls
``srun``, so the configuration must also be at the compiled-in default path, ``/etc/slurm/slurm.conf``. It is
written there only if that file is absent (or a previous run of this module left it), and removed again on stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from debian import apt_install

REQUIRED_COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "srun")
APT_PACKAGES = ("slurm-wlm", "munge")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by ffmerge tests/slurm/cluster.py"
FAKE_GPUS = 2
# a GPU "device file" must exist for slurmd; these always do and nothing opens them
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random")
NODE = "localhost"
PARTITION = "debug"
# one test cluster per machine at a time: they would share /etc/slurm/slurm.conf
LOCK = Path("/tmp/ffmerge-slurm-test.lock")


class SlurmSetupError(RuntimeError):
    """SLURM could not be installed or started here; the message says why."""


def setup_blocker() -> str | None:
    """Why this machine cannot host the test cluster (None if it can): root on Debian is required."""
    if platform.system() != "Linux":
        return f"needs Linux (this is {platform.system()})"
    if os.geteuid() != 0:
        return "needs root (it installs slurm-wlm and munge with apt-get and runs the SLURM daemons as root)"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "needs Debian (or a derivative) with apt-get to install slurm-wlm and munge"
    if _foreign_system_conf():
        return f"{SYSTEM_CONF} belongs to this machine's own SLURM set-up, which the test will not touch"
    return None


def _foreign_system_conf() -> bool:
    """Whether /etc/slurm/slurm.conf exists and was not written by this module (a dangling link is ours)."""
    if not (SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink()):
        return False
    if SYSTEM_CONF.is_symlink() and not SYSTEM_CONF.exists():
        return False  # left by a run that was killed
    return MARKER not in SYSTEM_CONF.read_text(errors="replace")


def ensure_installed(log) -> None:
    """Install slurm-wlm and munge from Debian if any command is missing; apt-get update only if needed."""
    if all(shutil.which(c) for c in REQUIRED_COMMANDS):
        return
    apt_install(APT_PACKAGES, log, SlurmSetupError)
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SlurmSetupError(f"after installing {' '.join(APT_PACKAGES)} these commands are still missing: {missing}")


def node_resources() -> dict[str, int]:
    """This machine as slurmd sees it (``slurmd -C``): CPUs, topology and RealMemory (MB); nproc / meminfo else."""
    node = {
        "CPUs": os.cpu_count() or 1,
        "RealMemory": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
        first = out.splitlines()[0] if out.strip() else ""
        for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"):
            if m := re.search(rf"\b{key}=(\d+)", first):
                node[key] = int(m.group(1))
    return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd for one node, all state under ``root``; use as a context manager."""

    def __init__(self, root: Path, log=print):
        self.root = Path(root)
        self.log = log
        self.procs: dict[str, subprocess.Popen] = {}
        self.wrote_system_conf = False
        self.conf = self.root / "etc" / "slurm.conf"
        self.node = node_resources()
        self.partition = PARTITION

    # ------------------------------------------------------------------ configuration

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (sbatch, squeue, Snakemake with --executor slurm)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_configs(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(0o755)
        self.munge_socket = self.root / "munge" / "munge.socket"
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        gpu_files = ",".join(FAKE_GPU_FILES[:FAKE_GPUS])
        r = self.root
        lines = [
            MARKER,
            "ClusterName=ffmergetest",
            f"SlurmctldHost={NODE}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            # finished jobs stay visible to squeue for an hour: the plugin's status source without sacct
            "MinJobAge=3600",
            "KillWait=5",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            "GresTypes=gpu",
            f"NodeName={NODE} NodeAddr=127.0.0.1 {' '.join(f'{k}={v}' for k, v in self.node.items())} "
            f"Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "etc" / "gres.conf").write_text(
            f"{MARKER}\nAutoDetect=off\nNodeName={NODE} Name=gpu File={gpu_files}\n"
        )
        # slurmd 22.05 initialises a cgroup plugin even with proctrack/linuxproc and task/none; without systemd
        # (containers, CI) the cgroup/v2 plugin must not ask systemd for a scope
        (self.root / "etc" / "cgroup.conf").write_text(
            f"{MARKER}\nCgroupPlugin=autodetect\nIgnoreSystemd=yes\nIgnoreSystemdOnFailure=yes\n"
        )
        self._install_system_conf()

    def _install_system_conf(self) -> None:
        """Make the configuration visible at /etc/slurm/slurm.conf (see the module docstring)."""
        if _foreign_system_conf():
            raise SlurmSetupError(
                f"{SYSTEM_CONF} exists and was not written by this test: this machine has its own SLURM set-up, "
                "which the test will not overwrite"
            )
        if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
            SYSTEM_CONF.unlink()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self.wrote_system_conf = True

    # ------------------------------------------------------------------ daemons

    def _spawn(self, name: str, command: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.log(f"starting {name}: {' '.join(command)}")
        self.procs[name] = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        out.close()
        time.sleep(0.5)
        if self.procs[name].poll() is not None:
            raise SlurmSetupError(f"{name} exited at once (rc {self.procs[name].returncode}):\n{self.daemon_logs()}")

    def _lock(self, timeout: float = 1800) -> None:
        self._lock_file = open(LOCK, "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmSetupError(f"another test cluster held {LOCK} for {timeout:.0f} s") from None
                time.sleep(2)

    def start(self, timeout: float = 90) -> SlurmCluster:
        self._lock()
        self._write_configs()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m}/munge.key",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld (scontrol ping)")
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE])
        self._wait(self._node_idle, timeout, f"node {NODE} idle")
        return self

    def _ok(self, command: list[str], expect: str) -> bool:
        run = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=30)
        return run.returncode == 0 and expect in run.stdout

    def _node_idle(self) -> bool:
        run = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return run.returncode == 0 and run.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmSetupError(
                        f"{name} died (rc {proc.returncode}) waiting for {what}:\n{self.daemon_logs()}"
                    )
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if ready():
                    return
            time.sleep(0.5)
        raise SlurmSetupError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.daemon_logs()}")

    def daemon_logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel our jobs, then stop the daemons we started (by pid) and remove the system config link."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["scancel", "--quiet", "--partition", PARTITION],
                    env=self.env,
                    timeout=30,
                    capture_output=True,
                )
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    q = subprocess.run(
                        ["squeue", "-h", "-t", "PD,R,CG", "-o", "%i"],
                        capture_output=True,
                        text=True,
                        env=self.env,
                        timeout=30,
                    )
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            self.log(f"stopping {name} (pid {proc.pid})")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if self.wrote_system_conf and SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf:
            SYSTEM_CONF.unlink()
            self.wrote_system_conf = False
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
