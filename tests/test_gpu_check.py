"""benchmarks/gpu_check.py stays runnable where no GPU is: its throughput part on the CPU, and a clear refusal of
--device cuda without a usable GPU (its paper-type part is tests/test_paper_types.py's run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_throughput_on_the_cpu_is_measured_and_written(tmp_path):
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--skip-run", "--steps", "2", "--seq-len", "16", "--batch-size", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["throughput"]
    assert row["device"] == "cpu" and row["precision"] == "fp32" and row["tokens_per_s"] > 0
    assert report["host_gflops_1_thread"] > 0 and "GFLOPS on 1 thread" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_asking_for_cuda_without_a_gpu_says_why():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no usable GPU" in run.stderr and "--device cpu" in run.stderr
