"""The sliding-window search in one process, reusing the base model's hidden states.

The paper scores every window start with a full validation pass of the merged candidate. A candidate
whose window starts at layer ``s`` leaves layers ``0 .. s-1`` untouched, so the hidden states entering
layer ``s`` are the base model's: record them once per start ("tapes", one tensor per scoring batch)
and run each candidate from layer ``s`` on. Scores are those of a full pass (the same float32 tensors
go through the same layers, batch by batch).

Optionally, candidates are first scored on a leading share of the validation batches ("screening") and
only the ``keep`` best are finished on the rest; every finished score is exact and the best window is
always chosen among finished scores. Screening can drop the window a full search would pick only when
that window ranks below ``keep`` others on the screening share; ``benchmarks/window_search.py``
measures whether the choice changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, set_submodule
from .tasks.base import Scorer, add_sums

# compress(model, start, plan) -> info with "windows" and "plan"; ``plan`` is a previous call's plan
# for the same start, so a screened candidate is rebuilt without aligning its layers again.
CompressFn = Callable[[nn.Module, int, dict | None], dict]


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_layer_inputs(model: nn.Module, stack: str, layers: Sequence[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect, per layer index, the hidden states entering that layer at each forward call."""
    tapes: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    modules = get_adapter(model).layers(model, stack)
    handles = []
    for index in layers:

        def hook(module: nn.Module, args: tuple, kwargs: dict, index: int = index) -> None:
            tapes[index].append(_hidden_states(args, kwargs).detach().to("cpu", copy=True))

        handles.append(modules[index].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield tapes
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def start_at(model: nn.Module, stack: str, start: int, tape: Sequence[torch.Tensor], first_call: int = 0):
    """Run ``model`` from layer ``start`` on, feeding the recorded states of call ``first_call``, ... .

    Layers before ``start`` are taken out of the stack for the duration (config, per-layer lists and
    ``layer_idx`` follow, as when dropping layers) and put back afterwards, so the model is unchanged.
    """
    if start == 0:  # nothing to skip: the embeddings already produce the recorded states
        yield
        return
    from .drop import drop_layers

    adapter = get_adapter(model)
    spec = adapter.stack(stack)
    base = adapter.base(model)
    layers = adapter.layers(model, stack)
    # everything dropping may rewrite (layer counts, per-layer lists, an adapter's own bookkeeping such as
    # DINOv2's stage names), restored as it was, without the config's validating setters
    saved_config = copy.deepcopy(vars(model.config))
    saved_idx = [(m, m.layer_idx) for m in layers.modules() if getattr(m, "layer_idx", None) is not None]
    calls = iter(range(first_call, len(tape)))

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        index = next(calls, None)
        incoming = _hidden_states(args, kwargs)
        if index is None or tape[index].shape != incoming.shape:
            raise RuntimeError(
                "recorded hidden states do not match this forward call (the scorer's batches changed between "
                "recording and replay)"
            )
        states = tape[index].to(device=incoming.device, dtype=incoming.dtype)
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    drop_layers(model, {stack: (0, start)})
    handle = adapter.layers(model, stack)[0].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        set_submodule(base, spec.layers, layers)
        vars(model.config).clear()
        vars(model.config).update(saved_config)
        for module, index in saved_idx:
            module.layer_idx = index


@dataclass
class CandidateScore:
    """One window start's validation score; ``batches`` < ``n_batches`` means it was screened out."""

    start: int
    info: dict
    sums: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def metric(self, scorer: Scorer) -> float:
        return scorer.metric(self.sums)


def reusable_stack(model: nn.Module) -> str | None:
    """The stack whose prefix can be reused: only single-stack models (in an encoder-decoder a window in
    the encoder changes every decoder layer's input, so the decoder's states cannot be reused)."""
    stacks = get_adapter(model).stacks
    return stacks[0].name if len(stacks) == 1 else None


def search_windows(
    base: nn.Module,
    scorer: Scorer,
    compress: CompressFn,
    starts: Sequence[int],
    *,
    higher_is_better: bool,
    reuse: bool = True,
    screen_share: float = 1.0,
    screen_keep: int = 3,
    max_tapes: int = 0,
    log: Callable[[str], Any] = print,
) -> list[CandidateScore]:
    """Score every start; with screening, only the ``screen_keep`` best on the first share are finished.

    ``max_tapes`` bounds memory: at most that many starts' states are held at once (0 = all), at the
    cost of one more base pass per group. A tape holds validation tokens x hidden size x 4 bytes.
    """
    stack = reusable_stack(base) if reuse else None
    n = scorer.n_batches
    first = n if screen_share >= 1 else max(1, math.ceil(screen_share * n))
    results = {s: CandidateScore(start=s, info={}) for s in starts}
    _score_range(base, scorer, compress, results, list(starts), range(0, first), stack, max_tapes, log)
    if first < n:
        sign = -1 if higher_is_better else 1

        def partial(c: CandidateScore) -> float:
            value = c.metric(scorer)
            return sign * value if math.isfinite(value) else math.inf

        kept = sorted(results.values(), key=lambda c: (partial(c), c.start))[:screen_keep]
        log(f"screened on {first}/{n} batches; finishing starts {sorted(c.start for c in kept)}")
        _score_range(
            base, scorer, compress, results, sorted(c.start for c in kept), range(first, n), stack, max_tapes, log
        )
    return [results[s] for s in starts]


def _score_range(
    base: nn.Module,
    scorer: Scorer,
    compress: CompressFn,
    results: dict[int, CandidateScore],
    starts: list[int],
    batches: range,
    stack: str | None,
    max_tapes: int,
    log: Callable[[str], Any],
) -> None:
    group = len(starts) if max_tapes <= 0 else max_tapes
    for g in range(0, len(starts), group):
        chunk = starts[g : g + group]
        tapes: dict[int, list[torch.Tensor]] = {}
        if stack is not None and any(s > 0 for s in chunk):
            with record_layer_inputs(base, stack, [s for s in chunk if s > 0]) as tapes:
                scorer.run(base, batches)
        for start in chunk:
            result = results[start]
            model = copy.deepcopy(base)
            result.info = compress(model, start, result.info.get("plan"))
            # a dropped window at the very end leaves no layer to feed: that candidate runs in full
            reusable = start in tapes and start < get_adapter(model).num_layers(model, stack)
            # the tape holds only ``batches``, so its call 0 is the range's first batch
            replay = start_at(model, stack, start, tapes[start]) if reusable else _nothing()
            with replay:
                sums = scorer.run(model, batches)
            result.sums = add_sums(result.sums, sums)
            result.batches += len(batches)
            log(f"start {start}: {scorer.metric(result.sums):.6g} after {result.batches}/{scorer.n_batches} batches")
            del model
        tapes.clear()


@contextmanager
def _nothing():
    yield
