"""The device and numeric precision a job computes in, refused rather than silently changed, and recorded.

A cluster job that SLURM gave a GPU but whose torch cannot use it (a CPU-only wheel, a driver older than
torch's CUDA, every GPU hidden from the job) would otherwise run the whole fine-tune on the CPU with
``device: auto`` and look merely slow. Jobs therefore learn how many GPUs they were granted
(:func:`grant_gpus`, from the rule's ``gpu`` resource or SLURM's job environment) and :func:`resolve_device`
refuses ``auto`` and ``cuda`` when a granted GPU is unusable, naming the cause and the fix. ``device: cpu`` is
always honoured (on purpose, never a fallback).

Precisions are autocast dtypes: ``fp32`` (none), ``bf16`` and ``fp16`` (training also scales the loss). They
apply on CUDA only: on a CPU autocast rounds differently per CPU generation and speeds little on a laptop,
so a CPU job computes in fp32 and says so (:func:`effective_precision`), and records what it really used
(:func:`device_record`) in its log and result file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_RESOURCE = "gpu"
"""The Snakemake resource a rule's GPUs are requested with (profiles/slurm; the SLURM plugin's ``--gpus``)."""
SLURM_GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")

_granted: dict[str, Any] = {"count": 0, "source": ""}


class DeviceError(RuntimeError):
    """The configured device or precision cannot be used by this job; running anyway would change the result's
    meaning (a GPU run on the CPU, bf16 on a GPU without it)."""


def grant_gpus(resources: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Remember how many GPUs this job was given: the rule's ``gpu`` resource, else what SLURM put in the job's
    environment. Called by every job script (:func:`ffmerge.workflow.jobs.snakemake_job`)."""
    environ = os.environ if environ is None else environ
    count, source = 0, ""
    with contextlib.suppress(TypeError, ValueError):
        count = int((resources or {}).get(GPU_RESOURCE) or 0)
        source = f"resources {GPU_RESOURCE}={count}" if count else ""
    if not count:
        for key in SLURM_GPU_ENV:
            value = environ.get(key, "").strip()
            if not value or value == "N/A":
                continue
            # SLURM_GPUS_ON_NODE is a count; SLURM_JOB_GPUS and SLURM_STEP_GPUS list GPU indices ("0" is one GPU)
            count = int(value) if key == "SLURM_GPUS_ON_NODE" and value.isdigit() else len(value.split(","))
            if count:
                source = f"{key}={value}"
                break
    _granted.update(count=count, source=source)
    return count


def granted_gpus() -> tuple[int, str]:
    return _granted["count"], _granted["source"]


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU when CUDA is usable, else the CPU, unless this job was granted a GPU (then an unusable
    GPU is an error); ``cuda`` needs a usable GPU; ``cpu`` (or ``cuda:N``...) as given."""
    count, source = granted_gpus()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if count:
            raise DeviceError(
                f"this job was given {count} GPU(s) ({source}) but torch cannot use CUDA: {cuda_problem()} "
                "To run it on the CPU on purpose, set device: cpu in the config (or drop the rule's gpu resource)."
            )
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        granted = f"this job was given {count} GPU(s) ({source}); " if count else "no GPU is visible to this job; "
        raise DeviceError(
            f"config asks for device {device} but {granted}torch cannot use CUDA: {cuda_problem()} "
            "Use device: auto or cpu (auto: the GPU when there is one)."
        )
    return torch.device(device)


def cuda_problem(environ: Mapping[str, str] | None = None) -> str:
    """Why ``torch.cuda.is_available()`` is false here, with the fix, as far as torch and the environment tell."""
    environ = os.environ if environ is None else environ
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build. Install a CUDA build in the job's environment "
            "(e.g. pip install torch --index-url https://download.pytorch.org/whl/cu128, or the conda envs of envs/)."
        )
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return (
            f"CUDA_VISIBLE_DEVICES is {visible!r}, which hides every GPU from this job. Check the job's GPU request "
            "(the rule's gpu resource, the partition's gres) and do not unset it in the job's environment."
        )
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError / AssertionError with the driver's message
        return (
            f"CUDA failed to initialise ({type(err).__name__}: {err}). The NVIDIA driver may be older than torch's "
            f"CUDA {torch.version.cuda} (nvidia-smi shows the newest CUDA the driver supports): load a newer driver "
            "module or install a torch build for an older CUDA."
        )
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {torch.cuda.device_count()} GPU(s)."


def effective_precision(device: torch.device, precision: str, log: Callable[[str], Any] | None = None) -> str:
    """The precision a computation on ``device`` uses for the configured one: autocast on CUDA, fp32 on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return precision
    if device.type != "cuda":
        if log is not None:
            log(f"precision {precision} applies on CUDA only; computing in fp32 on {device.type}")
        return "fp32"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"precision bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; use precision fp16 "
            "(older GPUs) or fp32"
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (already effective, see :func:`effective_precision`); fp32 changes nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def device_record(device: torch.device, precision: str) -> dict[str, Any]:
    """What a result file records of where it was computed: device type, GPU name (none for a CPU, so that a
    CPU run's results stay the same on every host) and the precision used."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"type": device.type, "name": name, "precision": precision}
