"""The host's speed, printed beside every timing a benchmark reports: hosts differ up to ~3x, so absolute times
are comparable only within one run, and this figure says which kind of host a run was on."""

from __future__ import annotations

import math
import time

import torch


def matmul_gflops(threads: int = 1) -> float:
    """A 2048 x 2048 float32 matmul on ``threads`` torch threads, best of 5, in GFLOPS; torch's thread count is
    left as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(before)
    return 2 * 2048**3 / best / 1e9


def announce(threads: int) -> float:
    """Measure the host (one thread), set torch to ``threads`` threads and print both; returns the GFLOPS."""
    gflops = matmul_gflops(1)
    torch.set_num_threads(threads)
    print(f"host: 2048x2048 float32 matmul {gflops:.0f} GFLOPS on 1 thread; running with {threads} thread(s)")
    return gflops
