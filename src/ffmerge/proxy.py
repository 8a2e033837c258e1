"""Proxy scores for the window search: every window ranked from the cached calibration features, no validation.

``search.mode: proxy`` scores every window start of a (method, fraction) here, then fully evaluates only the
``search.proxy_keep`` best with the in-process search (:func:`ffmerge.search.search_windows`, the same exact
validation scores as ``in_process``) and chooses the best of those. Lower is better for every proxy:

- merges (``permute``, ``vanilla``): the window's local merge error, the relative error
  ``sum_l ||FF_merged(x_l) - FF_l(x_l)||^2 / sum_l ||FF_l(x_l)||^2`` over its members ``l`` (the windows of all
  stacks pooled) on the cached FF inputs ``x_l`` (kind ``ff_in``) and outputs ``FF_l(x_l)`` (``ff_out``). The
  merged block is the search's own candidate: the ``compress`` callable the search uses builds it (same plan,
  same solved alignments), on a copy of the base model that shares every tensor except the window's FF blocks,
  and :func:`ffmerge.repair.relative_error` measures it (the repair's "error_merged", before any repair).
- deletions (``ffdrop``, ``drop``): what the deleted sublayers add to the residual stream, relative to that
  stream: ``sum_l sum_t ||c_{l,t}||^2 / sum_t ||r_{l,t}||^2`` over the deleted layers ``l`` (all stacks), where
  ``c_l`` is the FF output (``ffdrop``) or attention plus FF output (``drop``) as it enters the stream (times
  DINOv2's LayerScale) and ``r_l`` is the stream after layer ``l``, rebuilt as the sum of every attention and FF
  output of layers ``0..l``. Why this and not the raw output energy: the residual stream grows with depth and
  every later sublayer reads it through a norm, so a perturbation matters by its size relative to the stream
  it lands in; the raw energy would rank a late layer's large but relatively small update as the costliest.
  The cache has no embeddings, so ``r_l`` lacks them (early layers weigh more than they would with them);
  the sum is the stream only in pre-norm layers that add their sublayers' outputs (Llama, GPT-2, ViT, DINOv2,
  Whisper). Post-norm layers (BERT, Marian), Gemma's post-sublayer norms and decoder cross-attention (not
  cached) make it an approximation there.

Scores use ``tokens`` evenly spaced positions of the cache (all if it holds fewer), the same positions for every
layer and window.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .adapters import get_adapter, get_submodule
from .align import MergePlan
from .experiments import DELETE_METHODS, MERGE_METHODS, windows_at
from .features import FeatureStore
from .repair import MemberData, relative_error, store_data

PROXY_TOKENS = 512
"""Calibration positions the proxies use. Measured on the default run's merge searches (benchmarks/proxy_search.py,
2026-12-02): 512 of the cached positions rank the windows as all of them do with Spearman 0.92-1.00 (0.99 on
SmolLM2's 1/3 searches, 1.00 on DINOv2 and Whisper) at about a sixth of the time on SmolLM2, though SmolLM2's
permute 1/3 top 3 differs by one window. The proxy itself ranks far worse than that against validation (see
docs/pipeline.md, "Proxy search")."""

DESCRIPTIONS = {
    "merge": "local merge error: sum_l ||FF_merged(x_l) - FF_l(x_l)||^2 / sum_l ||FF_l(x_l)||^2 over the window's "
    "members (cached ff_in, ff_out)",
    "ffdrop": "deleted FF outputs relative to the residual stream: sum_l ||ff_out_l||^2 / ||r_l||^2, r_l = sum of "
    "the cached attention and FF outputs of layers 0..l",
    "drop": "deleted layers' outputs relative to the residual stream: sum_l ||attn_out_l + ff_out_l||^2 / "
    "||r_l||^2, r_l = sum of the cached attention and FF outputs of layers 0..l",
}

CompressFn = Callable[[nn.Module, int, dict | None], dict]


def describe(method: str) -> str:
    """What the proxy of ``method`` measures, for the selection record."""
    return DESCRIPTIONS["merge" if method in MERGE_METHODS else method]


def positions(n_cached: int, tokens: int) -> torch.Tensor:
    """``tokens`` evenly spaced indices into ``n_cached`` cached positions (all of them when ``tokens`` is 0 or
    at least ``n_cached``)."""
    if tokens <= 0 or tokens >= n_cached:
        return torch.arange(n_cached)
    return torch.arange(tokens) * n_cached // tokens


def proxy_scores(
    base: nn.Module,
    store: FeatureStore,
    method: str,
    fraction: str,
    starts: Sequence[int],
    compress: CompressFn,
    *,
    tokens: int = PROXY_TOKENS,
) -> dict[int, float]:
    """Every start's proxy score (lower is better); ``compress(model, start, plan)`` builds a merge candidate
    exactly as the search does (deletions need only the features). ``base`` is left as it was."""
    layers = {s.name: get_adapter(base).num_layers(base, s.name) for s in get_adapter(base).stacks}
    windows = {start: windows_at(method, layers, fraction, start) for start in starts}
    if method in MERGE_METHODS:
        return _merge_errors(base, store, windows, compress, tokens)
    if method in DELETE_METHODS:
        return _deleted_shares(base, store, method, windows, tokens)
    raise ValueError(f"no proxy for method {method!r}; proxy searches rank {MERGE_METHODS + DELETE_METHODS}")


def rank(scores: Mapping[int, float]) -> list[int]:
    """Starts from the best proxy score to the worst; NaN last, ties to the earliest start."""
    return sorted(scores, key=lambda s: (math.isnan(scores[s]), scores[s] if not math.isnan(scores[s]) else 0.0, s))


# ----------------------------------------------------------------------------------------------------------
# Merges
# ----------------------------------------------------------------------------------------------------------


def _merge_errors(
    base: nn.Module,
    store: FeatureStore,
    windows: Mapping[int, Mapping[str, tuple[int, int]]],
    compress: CompressFn,
    tokens: int,
) -> dict[int, float]:
    adapter = get_adapter(base)
    device = next(base.parameters()).device
    cached: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def member(stack: str, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (stack, j) not in cached:
            data = store_data(store, stack, [j])
            keep = positions(len(data.x[j]), tokens)
            cached[stack, j] = (data.x[j][keep].to(device), data.y[j][keep].to(device))
        return cached[stack, j]

    scores = {}
    for start, window in windows.items():
        model = _copy_window(base, window)
        info = compress(model, start, None)
        if info["windows"] != dict(window):
            raise AssertionError(f"start {start}: compress built {info['windows']}, the proxy expected {window}")
        error = energy = 0.0
        for alignment in MergePlan.from_dict(info["plan"]).stacks:
            stack = alignment.stack
            data = MemberData(stack, alignment.layers, {}, {})
            for j in alignment.layers:
                data.x[j], data.y[j] = member(stack, j)
            stack_energy = max(sum(float(y.pow(2).sum()) for y in data.y.values()), 1e-30)
            # relative_error divides by the same energy: pooled over stacks, each counts by its energy
            error += relative_error(adapter.ff_forward(model, stack, alignment.anchor), data) * stack_energy
            energy += stack_energy
        scores[start] = error / max(energy, 1e-30)
        del model
    return scores


def _copy_window(base: nn.Module, window: Mapping[str, tuple[int, int]]) -> nn.Module:
    """A copy of ``base`` whose window FF blocks are its own and every other tensor is the base's (shared):
    merging rewrites only those blocks, and copying the whole model per start would cost more than scoring."""
    adapter = get_adapter(base)
    own = {
        id(p)
        for stack, (start, size) in window.items()
        for j in range(start, start + size)
        for module in adapter.ff_modules(base, stack, j).values()
        for p in module.parameters()
    }
    memo = {id(t): t for t in (*base.parameters(), *base.buffers()) if id(t) not in own}
    return copy.deepcopy(base, memo)


# ----------------------------------------------------------------------------------------------------------
# Deletions
# ----------------------------------------------------------------------------------------------------------


def _deleted_shares(
    base: nn.Module,
    store: FeatureStore,
    method: str,
    windows: Mapping[int, Mapping[str, tuple[int, int]]],
    tokens: int,
) -> dict[int, float]:
    missing = {"ff_out", "attn_out"} - set(store.manifest.get("kinds", []))
    if missing:
        raise ValueError(
            f"the feature cache {store.root} has no {sorted(missing)} features, which the {method} proxy needs; "
            f"delete {store.root} and rerun the cache_features step"
        )
    shares = {stack: _layer_shares(base, store, stack, method, tokens) for stack in store.manifest["num_layers"]}
    return {
        start: sum(sum(shares[stack][first : first + size]) for stack, (first, size) in window.items())
        for start, window in windows.items()
    }


def _layer_shares(base: nn.Module, store: FeatureStore, stack: str, method: str, tokens: int) -> list[float]:
    """Per layer of ``stack``: sum_t ||c_{l,t}||^2 / sum_t ||r_{l,t}||^2 (see the module docstring)."""
    adapter = get_adapter(base)
    spec = adapter.stack(stack)
    keep = positions(store.n_tokens[stack], tokens)
    stream = None
    shares = []
    for j in range(store.num_layers(stack)):
        layer = adapter.layers(base, stack)[j]
        attn = _scaled(store.load(stack, "attn_out", j)[keep].double(), layer, spec.attn_scale)
        ff = _scaled(store.load(stack, "ff_out", j)[keep].double(), layer, spec.ff_scale)
        stream = attn + ff if stream is None else stream + attn + ff
        removed = ff if method == "ffdrop" else attn + ff
        shares.append(float(removed.pow(2).sum()) / max(float(stream.pow(2).sum()), 1e-30))
    return shares


def _scaled(outputs: torch.Tensor, layer: nn.Module, path: str | None) -> torch.Tensor:
    """A sublayer's cached output as it enters the residual stream: times its per-channel scale, if it has one."""
    if path is None:
        return outputs
    (_, scale), *_ = get_submodule(layer, path).named_parameters(recurse=False)
    return outputs * scale.detach().to("cpu", torch.float64)
