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
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

from .features import FeatureStore

METHODS = ("permute", "vanilla")
ANCHORS = ("first", "middle", "last")
CORR_EPS = 1e-8
"""Floor on the product of standard deviations, so dead (constant) neurons give 0 instead of NaN."""

SolvedPairs = Mapping[tuple[str, int, int], list[int]]
"""Permutations already solved, by ``(stack, anchor layer, layer)``: see :func:`solve_pairs`."""


@dataclass
class StackAlignment:
    """One stack's window ``[start, start + size)`` and how each member maps onto the anchor.

    ``perms[j][i]`` is the neuron of layer ``j`` placed at position ``i``, i.e. matched to anchor neuron ``i``.
    A group of layers that need not be adjacent (:mod:`ffmerge.group`) lists them in ``members``; ``start`` and
    ``size`` then span them.
    """

    stack: str
    start: int
    size: int
    anchor: int
    perms: dict[int, list[int]] = field(default_factory=dict)
    members: list[int] | None = None

    @property
    def layers(self) -> list[int]:
        if self.members is not None:
            return list(self.members)
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
            if s["members"] is None:  # a window: the plan reads as it did before groups existed
                del s["members"]
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


def _match_to_anchor(store: FeatureStore, stack: str, anchor: int, layers: Iterable[int]) -> dict[int, list[int]]:
    """Each of ``layers`` matched to ``anchor``; the anchor's features are standardized once for all of them."""
    layers = list(layers)
    if not layers:
        return {}
    anchor_z = standardize(store.load(stack, "pre", anchor))
    return {j: match_neurons(_correlate(anchor_z, standardize(store.load(stack, "pre", j)))) for j in layers}


def align_window(
    store: FeatureStore,
    stack: str,
    start: int,
    size: int,
    *,
    anchor: str = "first",
    method: str = "permute",
    solved: SolvedPairs | None = None,
) -> StackAlignment:
    """Align every member of one stack's window to its anchor from the cached ``pre`` features.

    Pairs found in ``solved`` are taken from there instead of being solved again (same computation, same result).
    """
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")
    n_layers = store.num_layers(stack)
    if size < 2 or start < 0 or start + size > n_layers:
        raise ValueError(f"window start={start} size={size} does not fit {stack} with {n_layers} layers")
    alignment = StackAlignment(stack=stack, start=start, size=size, anchor=anchor_layer(start, size, anchor))
    return _align(store, alignment, method, solved)


def align_group(
    store: FeatureStore,
    stack: str,
    members: Iterable[int],
    *,
    anchor: str = "first",
    method: str = "permute",
    solved: SolvedPairs | None = None,
) -> StackAlignment:
    """Like :func:`align_window` for layers that need not be adjacent; the anchor is the first, middle or last
    member in layer order."""
    if method not in METHODS:
        raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")
    members = sorted(set(members))
    n_layers = store.num_layers(stack)
    if len(members) < 2 or members[0] < 0 or members[-1] >= n_layers:
        raise ValueError(f"group {members} does not fit {stack} with {n_layers} layers (it needs 2 or more members)")
    position = anchor_layer(0, len(members), anchor)
    alignment = StackAlignment(
        stack=stack,
        start=members[0],
        size=members[-1] - members[0] + 1,
        anchor=members[position],
        members=members,
    )
    return _align(store, alignment, method, solved)


def _align(store: FeatureStore, alignment: StackAlignment, method: str, solved: SolvedPairs | None) -> StackAlignment:
    """Fill in the permutation of every non-anchor member (none for vanilla)."""
    if method == "vanilla":
        return alignment
    solved = solved or {}
    stack, anchor_idx = alignment.stack, alignment.anchor
    members = [j for j in alignment.layers if j != anchor_idx]
    fresh = _match_to_anchor(store, stack, anchor_idx, [j for j in members if (stack, anchor_idx, j) not in solved])
    alignment.perms = {j: fresh[j] if j in fresh else list(solved[(stack, anchor_idx, j)]) for j in members}
    return alignment


def plan_merge(
    store: FeatureStore,
    windows: dict[str, tuple[int, int]],
    *,
    anchor: str = "first",
    method: str = "permute",
    solved: SolvedPairs | None = None,
) -> MergePlan:
    """A plan for ``windows`` (``{stack: (start, size)}``); encoder-decoder models pass both stacks."""
    stacks = [
        align_window(store, s, start, size, anchor=anchor, method=method, solved=solved)
        for s, (start, size) in windows.items()
    ]
    return MergePlan(method=method, feature=store.manifest["feature"], stacks=stacks)


def solve_pairs(store: FeatureStore, pairs: Iterable[tuple[str, int, int]]) -> dict[tuple[str, int, int], list[int]]:
    """The permutation of every ``(stack, anchor, layer)`` pair, each pair solved once.

    A pair's permutation depends only on the two layers' features, not on the window around them, and windows
    share most pairs: with the first layer as anchor, the window at start ``s`` of every fraction aligns layers
    ``s+1, s+2, ...`` to layer ``s``. For a 30-layer model the 1/3, 1/2 and all-but-one searches hold 454
    alignments but only 289 distinct pairs, and the compressed models rebuilt afterwards need no new ones.
    Each alignment costs one ``tokens x d x d`` product plus a ``d x d`` assignment (about 1 s for SmolLM2).
    """
    by_anchor: dict[tuple[str, int], list[int]] = {}
    for stack, a, j in sorted(set(pairs)):
        by_anchor.setdefault((stack, a), []).append(j)
    return {
        (stack, a, j): perm
        for (stack, a), layers in by_anchor.items()
        for j, perm in _match_to_anchor(store, stack, a, layers).items()
    }


def save_pairs(path: str | Path, solved: SolvedPairs, store: FeatureStore) -> None:
    """Write solved pairs with the identity of the features they came from; atomic (tmp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{s}/{a}/{j}": torch.tensor(perm, dtype=torch.int32) for (s, a, j), perm in solved.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=_features_identity(store))
    os.replace(tmp, path)


def load_pairs(path: str | Path, store: FeatureStore) -> dict[tuple[str, int, int], list[int]]:
    """Solved pairs from :func:`save_pairs`, refusing a file solved from other features than ``store``'s."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            solved = {(k.split("/")[0], *map(int, k.split("/")[1:])): f.get_tensor(k).tolist() for k in f.keys()}
    except Exception as err:
        raise RuntimeError(f"cannot read solved alignments {path}: {err}; delete it and rerun the align step") from err
    if meta != _features_identity(store):
        raise ValueError(
            f"{path} was solved from other features than {store.root} (manifests differ: "
            f"{meta.get('features_manifest')} vs {_features_identity(store)['features_manifest']}); delete it and "
            "rerun the align step"
        )
    return solved


def _features_identity(store: FeatureStore) -> dict[str, str]:
    """The feature cache's manifest (model type, feature mode, tokens, layers): a file solved from another model,
    feature or token count is refused. Features rewritten in place are Snakemake's to catch (it reruns align)."""
    return {"features_manifest": json.dumps(store.manifest, sort_keys=True)}
