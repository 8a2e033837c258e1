"""Neuron alignment between FF sublayers: cross-correlation of cached features, then linear assignment.

Two FF blocks can compute the same function with their hidden neurons in a different order; averaging
them without first matching neurons mixes unrelated units. Following the paper, each non-anchor layer of a
window is matched to the anchor by maximising the total correlation of matched neurons
(``scipy.optimize.linear_sum_assignment``), and "vanilla" merging skips the matching (identity).

A ``MergePlan`` is everything needed to rebuild a merge exactly: method, feature mode, and for each stack
the window, the anchor and every permutation. It is saved as JSON next to the candidate's score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .features import FeatureStore

METHODS = ("permute", "vanilla")
ANCHORS = ("first", "middle", "last")
CORR_EPS = 1e-8
"""Floor on the product of standard deviations, so dead (constant) neurons give 0 instead of NaN."""


@dataclass
class StackAlignment:
    """One stack's window ``[start, start + size)`` and how each member maps onto the anchor.

    ``perms[j][i]`` is the neuron of layer ``j`` placed at position ``i``, i.e. matched to anchor neuron ``i``.
    """

    stack: str
    start: int
    size: int
    anchor: int
    perms: dict[int, list[int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.size))


@dataclass
class MergePlan:
    method: str
    feature: str
    stacks: list[StackAlignment]

    def to_dict(self) -> dict:
        """JSON-ready form (layer keys become strings)."""
        data = asdict(self)
        for s in data["stacks"]:
            s["perms"] = {str(k): v for k, v in s["perms"].items()}
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> MergePlan:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> MergePlan:
        stacks = [StackAlignment(**{**s, "perms": {int(k): v for k, v in s["perms"].items()}}) for s in data["stacks"]]
        return cls(method=data["method"], feature=data["feature"], stacks=stacks)


def anchor_layer(start: int, size: int, anchor: str) -> int:
    """The anchor's layer index; "middle" takes the lower middle for even window sizes."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    offset = {"first": 0, "middle": (size - 1) // 2, "last": size - 1}[anchor]
    return start + offset


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Columns centred and scaled to unit variance, in float32.

    Centring before any product avoids the cancellation that uncentred sums suffer with large offsets
    (torch's float32 reductions sum pairwise, so the means themselves are accurate); a dead neuron (zero
    variance) becomes all zeros, so it correlates 0 with everything instead of NaN.
    """
    x = x.float()
    centred = x - x.mean(0)
    std = centred.pow(2).mean(0).sqrt()
    return centred / std.clamp_min(CORR_EPS)


def cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every neuron of ``a`` and of ``b`` (both ``[tokens, neurons]``).

    The one O(n d^2) part, the product of the standardized features, runs at float32 speed.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"features cover different token counts: {a.shape[0]} vs {b.shape[0]}")
    return _correlate(standardize(a), standardize(b))


def _correlate(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    return (za.T @ zb).double() / za.shape[0]


def match_neurons(corr: torch.Tensor) -> list[int]:
    """The permutation of the second layer's neurons that maximises total correlation with the first's."""
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    if not np.array_equal(rows, np.arange(len(rows))):
        raise AssertionError("linear_sum_assignment returned rows out of order")
    return cols.tolist()


def align_window(
    store: FeatureStore,
    stack: str,
    start: int,
    size: int,
    *,
    anchor: str = "first",
    method: str = "permute",
) -> StackAlignment:
    """Align every member of one stack's window to its anchor from the cached ``pre`` features."""
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")
    n_layers = store.num_layers(stack)
    if size < 2 or start < 0 or start + size > n_layers:
        raise ValueError(f"window start={start} size={size} does not fit {stack} with {n_layers} layers")
    anchor_idx = anchor_layer(start, size, anchor)
    alignment = StackAlignment(stack=stack, start=start, size=size, anchor=anchor_idx)
    if method == "vanilla":
        return alignment
    anchor_z = standardize(store.load(stack, "pre", anchor_idx))  # once per window, not once per pair
    for j in alignment.layers:
        if j != anchor_idx:
            alignment.perms[j] = match_neurons(_correlate(anchor_z, standardize(store.load(stack, "pre", j))))
    return alignment


def plan_merge(
    store: FeatureStore,
    windows: dict[str, tuple[int, int]],
    *,
    anchor: str = "first",
    method: str = "permute",
) -> MergePlan:
    """A plan for ``windows`` (``{stack: (start, size)}``); encoder-decoder models pass both stacks."""
    stacks = [align_window(store, s, start, size, anchor=anchor, method=method) for s, (start, size) in windows.items()]
    return MergePlan(method=method, feature=store.manifest["feature"], stacks=stacks)
