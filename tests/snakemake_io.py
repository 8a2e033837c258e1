"""Test helper: build Snakemake's named input/output lists without running Snakemake."""

from __future__ import annotations

from snakemake.iocontainers import Namedlist


def named(**items) -> Namedlist:
    """Snakemake's named input/output list: a flat list whose names point at single items or slices."""
    result = Namedlist()
    for key, value in items.items():
        if isinstance(value, list):
            start = len(result)
            result.extend(value)
            result._set_name(key, start, len(result))
        else:
            result.append(value)
            result._add_name(key)
    return result
