"""Test helper: evaluation files (pre/post.json) as the pipeline writes them, for the report's tables and figures."""

from __future__ import annotations

import torch

from ffmerge.size import size_report


def base_record(model: torch.nn.Module, test: float, before: float, metric: str = "ppl") -> dict:
    """The uncompressed model's evaluation file."""
    return {"metric": metric, "test": test, "test_before_ft": before, "size": size_report(model).as_dict()}


def eval_record(
    model: torch.nn.Module,
    variant: str,
    fraction: str,
    test: float,
    before: float,
    *,
    metric: str = "ppl",
    windows: dict | None = None,
    groups: dict | None = None,
) -> dict:
    """A compressed model's evaluation file (post.json with pre.json's test), best window, no repair recorded;
    ``windows`` as compress returns them (JSON turns their tuples into lists), ``groups`` for a similarity group."""
    record = {
        "metric": metric,
        "test": test,
        "test_before_ft": before,
        "size": size_report(model).as_dict(),
        "variant": variant,
        "fraction": fraction,
        "choice": "best",
        "windows": {s: list(w) for s, w in windows.items()} if windows else None,
        "repair": None,
    }
    return record | ({"groups": groups} if groups else {})
