"""Config keys added after results existed: left out of a rule's params at their default, read with it.

Snakemake reruns a finished job whose params changed. A new key that the schema fills in with a default would
change the params of every job that reads its block (``evaluation.precision`` reaches every search, model and
evaluation), and a user's finished run would be rebuilt by an upgrade although nothing it computes changed.
So a rule's params leave such a key out while it holds its default (:func:`params_view`, used by
``rules/common.smk``), and the package reads it through :func:`setting`, which supplies the same default. A
test checks these defaults against the schema's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "selection": {"precision": "fp32"},
    "search": {"repair": False},
    "repair": {"normalize": "total"},
    "group": {"count": 1},
    "evaluation": {"precision": "fp32"},
    "finetune": {
        "precision": "fp32",
        "grad_accum": 1,
        "gradient_checkpointing": False,
        "decay_steps": None,
        "loader_workers": 0,
    },
}


def params_view(block: str, value: Any) -> Any:
    """``value`` (the config block ``block``) without the later keys that hold their default."""
    later = LATER_DEFAULTS.get(block)
    if not later or not isinstance(value, Mapping):
        return value
    return {key: v for key, v in value.items() if key not in later or v != later[key]}


def setting(cfg: Mapping[str, Any], block: str, key: str) -> Any:
    """``cfg[block][key]``, or the key's default where the params left it out (or an older caller never had it)."""
    values = cfg.get(block) or {}
    if key in values:
        return values[key]
    if key in LATER_DEFAULTS.get(block, {}):
        return LATER_DEFAULTS[block][key]
    raise KeyError(f"{block}.{key} is neither in the config nor a key with a known default")
