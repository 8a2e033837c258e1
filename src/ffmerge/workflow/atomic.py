"""Folders that appear complete or not at all: an interrupted job never leaves a half-written output."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DiskFullError(OSError):
    """A write ran out of disk space. Still an ``OSError`` with ``errno.ENOSPC``, so callers that handle
    ``OSError`` keep working, but the message says what was kept and how to go on instead of a bare errno."""


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is "no space left on device".

    Libraries wrap the OSError: torch.save raises a RuntimeError from its zip writer and safetensors its own
    error, so the chain and the text are both checked.
    """
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: str | Path, kept: str) -> DiskFullError:
    """The error to raise when writing ``path`` filled the disk; ``kept`` says what is still intact."""
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"the disk holding {folder} is full ({free}); {Path(path).name} could not be written. {kept} Free some "
        "space (e.g. delete work/ folders of finished fine-tunes or old results folders) or set results_dir to a "
        "larger disk, then rerun: Snakemake redoes only the unfinished steps",
        str(path),
    )


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically so an interrupted job never leaves a file that looks finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_json_scratch(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.", suffix=".tmp") as f:
        try:
            json.dump(data, f, indent=2)
            f.flush()
        except BaseException as err:
            f.close()
            os.unlink(f.name)  # a half-written temporary file would only take more of a full disk
            if is_disk_full(err):
                raise disk_full_error(path, _kept(path)) from err
            raise
    os.replace(f.name, path)


def _kept(path: Path) -> str:
    return f"The previous {path.name} is unchanged." if path.exists() else "Nothing was written in its place."


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
        raise FileExistsError(
            f"{out} exists and was not written by ffmerge (no {marker}); refusing to replace it. Move it away, or "
            "set results_dir to a folder of its own"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out.parent, f".{out.name}.tmp-")
    _remove_leftovers(out.parent, f".{out.name}.old-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise become the final folder's mode
    try:
        yield tmp
        _replace_dir(tmp, out)
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(out, f"The partial copy was removed; {_kept_dir(out)}") from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_json_scratch(path: str | Path) -> None:
    """Delete the scratch copies a killed :func:`write_json` of ``path`` left; for a job that may end without
    writing ``path`` again (the fork server's usage record), at its start."""
    path = Path(path)
    _remove_leftovers(path.parent, f".{path.name}.", ".tmp")


def _remove_leftovers(folder: Path, prefix: str, suffix: str = "") -> None:
    """Delete the scratch copies (``prefix*suffix``) of an output left by a writer that was killed (SIGKILL,
    power loss).

    Only the job that writes an output makes its scratch copies, and Snakemake runs one job per output at a
    time (a job of a dead run kills itself, ``ffmerge.workflow.jobs.die_with_snakemake``), so whatever matches
    when the next writer starts is garbage: up to a whole model per interrupted save.
    """
    for leftover in folder.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _kept_dir(out: Path) -> str:
    return f"the previous {out} is unchanged." if out.exists() else f"{out} was not created."


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        new.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(out)
