"""Merging a group of FF sublayers chosen by similarity instead of a window of adjacent ones.

The paper merges only adjacent layers and names non-adjacent merges as future work; its reviewers asked for
groups chosen by similarity. This method keeps everything of the merge (alignment to an anchor, permute,
average, tie, repair, the tied checkpoint) and changes only which layers are tied: per stack, the ``k`` layers
whose FF outputs are most alike by linear CKA on the cached calibration tokens (the same ``ff_out`` features
Figure 5 draws), where ``k`` is the window size of the fraction, so a group removes exactly the FF blocks a
window merge of that fraction removes.

The group is grown greedily: the most similar pair first, then repeatedly the layer whose mean CKA to the
members so far is highest (ties to the lower layer index). No window search runs: the choice comes from the
feature cache alone, so a group costs one merge, not one evaluation per candidate.

``group.count`` splits the budget over several disjoint groups per stack: the fraction's removal ``R`` is
divided as evenly as possible over ``min(count, R)`` groups (larger ones first, each removing at least one),
and the groups are grown one after another, each from the most similar pair among the layers no earlier group
took.
Choosing by aligned correlation or by local merge error instead of CKA is not built.
"""

from __future__ import annotations

import numpy as np

from .cka import cka_matrix
from .experiments import removed_count
from .features import FeatureStore

METHOD = "group"
SIMILARITY = "cka_ff_out"


def similar_group(similarity: np.ndarray, size: int) -> list[int]:
    """The ``size`` indices of a symmetric similarity matrix grown greedily from its most similar pair."""
    n = len(similarity)
    if not 2 <= size <= n:
        raise ValueError(f"a group of {size} layers does not fit a stack of {n}")
    scores = np.nan_to_num(np.asarray(similarity, dtype=float), nan=-np.inf)
    off_diagonal = scores.copy()
    np.fill_diagonal(off_diagonal, -np.inf)
    first, second = np.unravel_index(int(np.argmax(off_diagonal)), off_diagonal.shape)  # row-major: lowest pair
    group = sorted({int(first), int(second)})
    while len(group) < size:
        rest = [k for k in range(n) if k not in group]
        means = [float(np.mean(scores[k, group])) for k in rest]
        group = sorted([*group, rest[int(np.argmax(means))]])
    return group


def group_sizes(n_layers: int, fraction: str, count: int) -> list[int]:
    """Members of each of up to ``count`` groups that together remove the fraction's FF blocks, larger groups
    first. Every group removes at least one block, so a fraction that removes fewer blocks than ``count`` gets
    one group per removed block (Whisper's 4-layer stacks at 1/3: one group)."""
    if count < 1:
        raise ValueError(f"group.count {count}: at least one group is needed; set group.count to 1 or more")
    removed = removed_count(n_layers, fraction)
    count = min(count, removed)
    base, extra = divmod(removed, count)
    return [base + 2] * extra + [base + 1] * (count - extra)


def disjoint_groups(similarity: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Groups of ``sizes`` grown one after another (:func:`similar_group`) from the layers still free."""
    free = list(range(len(similarity)))
    groups = []
    for size in sizes:
        picked = similar_group(np.asarray(similarity)[np.ix_(free, free)], size)
        members = [free[k] for k in picked]
        groups.append(members)
        free = [k for k in free if k not in members]
    return sorted(groups)


def similar_groups(
    store: FeatureStore, layers: dict[str, int], fraction: str, count: int = 1
) -> dict[str, list[list[int]]]:
    """``{stack: [members, ...]}``: per stack, up to ``count`` disjoint groups with the most alike FF outputs that
    together remove what a window merge of ``fraction`` removes."""
    groups = {}
    for stack, n in layers.items():
        matrix, _ = cka_matrix(store, "ff_out", stacks=[stack])
        groups[stack] = disjoint_groups(matrix, group_sizes(n, fraction, count))
    return groups
