"""Fixtures shared by test modules."""

from __future__ import annotations

import logging
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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what ffmerge.workflow.jobs.job_logging does to the process (warnings captured into logging, the root
    level) after a test that enters it, and check it left no handler on the root logger."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    logging.captureWarnings(False)
    root.setLevel(level)
    assert root.handlers == handlers, "job_logging left a handler on the root logger"


@pytest.fixture(scope="module")
def family_stores(tmp_path_factory):
    """``get(name)``: a family's tiny model, its inputs and a feature cache of 120 calibration tokens (every kind,
    repair's included), built on first use and kept for the module."""
    from families import build, calibration_batches

    from ffmerge.features import cache_features

    cache = {}

    def get(name: str):
        if name not in cache:
            model, inputs = build(name)
            folder = tmp_path_factory.mktemp(f"feat-{name}")
            store = cache_features(model, calibration_batches(name, 40), folder, n_tokens=120, progress=False)
            cache[name] = model, inputs, store
        return cache[name]

    return get
