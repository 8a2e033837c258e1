"""Linear CKA (Kornblith et al. 2019) between layers' outputs, computed in feature space.

With centred ``X [n, p]`` and ``Y [n, q]``: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). The feature-space
form costs O(n d^2) instead of the O(n^2) Gram matrices, which matters at 10k tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from .features import FeatureStore


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centred(x), _centred(y)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def cka_matrix(store: FeatureStore, kind: str, stacks: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """CKA between every pair of layers of ``kind`` ("ff_out" or "attn_out"), stacks indexed together.

    Returns the symmetric matrix and its labels (``encoder.0``, ..., ``decoder.5``). Pairs from stacks with
    different token counts (an encoder's source tokens vs a decoder's target tokens) have no shared sample
    and are NaN.
    """
    stacks = stacks or list(store.manifest["num_layers"])
    keys = [(s, i) for s in stacks for i in range(store.num_layers(s))]
    grams = {}
    for key in keys:  # X^T X per layer once; each pair then needs only one cross product
        x = _centred(store.load(key[0], kind, key[1]))
        grams[key] = (x.float(), torch.linalg.matrix_norm(x.T @ x))  # float32 keeps all layers in RAM
    out = np.full((len(keys), len(keys)), np.nan)
    for a, ka in enumerate(keys):
        for b in range(a, len(keys)):
            kb = keys[b]
            (xa, na), (xb, nb) = grams[ka], grams[kb]
            if xa.shape[0] == xb.shape[0] and na > 0 and nb > 0:
                # float32 product (half the time of float64 on a CPU; the data are centred), float64 norm
                cross = torch.linalg.matrix_norm((xb.T @ xa).double())
                out[a, b] = out[b, a] = float(cross**2 / (na * nb))
    return out, [f"{s}.{i}" for s, i in keys]
