"""Folders that appear complete or not at all: an interrupted job never leaves a half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically so an interrupted job never leaves a file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(data, f, indent=2)
    os.replace(f.name, path)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, marker: str) -> Iterator[Path]:
    """Yield a scratch folder that replaces ``out_dir`` only if the block completes.

    The scratch folder lives beside ``out_dir`` (same file system, so the final rename is atomic):
    an interrupted run leaves no half-written ``out_dir`` that a later step could mistake for a
    finished one. An existing ``out_dir`` is replaced only if it holds ``marker`` (i.e. it was
    written by us), so a mistyped path never deletes someone's folder.
    """
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not (out / marker).exists():
        raise FileExistsError(f"{out} exists and was not written by ffmerge (no {marker}); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise become the final folder's mode
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        new.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(out)
