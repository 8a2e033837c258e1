"""Merging a group of FF sublayers chosen by similarity instead of a window of adjacent ones.

The paper merges only adjacent layers and names non-adjacent merges as future work; its reviewers asked for
groups chosen by similarity. This method keeps everything of the merge (alignment to an anchor, permute,
average, tie, repair, the tied checkpoint) and changes only which layers are tied: per stack, the ``k`` layers
whose FF outputs are most alike by linear CKA on the cached calibration tokens (the same ``ff_out`` features
Figure 5 draws), where ``k`` is the window size of the fraction, so a group removes exactly the FF blocks a
window merge of that fraction removes.

The group is grown greedily: the most similar pair first, then repeatedly the layer whose mean CKA to the
members so far is highest (ties to the lower layer index). No window search runs: the choice comes from the
feature cache alone, so a group costs one merge, not one evaluation per candidate. Only one group per stack is
built; splitting a budget over several groups, and choosing by aligned correlation or by local merge error,
are not.
"""

from __future__ import annotations

import numpy as np

from .cka import cka_matrix
from .experiments import window_size
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


def similar_groups(store: FeatureStore, layers: dict[str, int], fraction: str) -> dict[str, list[int]]:
    """``{stack: members}``: per stack, the group of a window merge's size with the most alike FF outputs."""
    groups = {}
    for stack, n in layers.items():
        matrix, _ = cka_matrix(store, "ff_out", stacks=[stack])
        groups[stack] = similar_group(matrix, window_size("permute", n, fraction))
    return groups
