"""Fixtures shared by test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test on one intra-op thread and restore the caller's setting afterwards.

    Tiny models gain nothing from threads, and on a busy 2-core machine each op then waits for its second
    thread (measured: the window-search test took 21 s instead of 0.7 s). One thread also makes an in-process
    reference run use the same kernels as the single-threaded subprocess workers it is compared with.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
