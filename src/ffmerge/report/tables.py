"""Result tables from finished result files alone (no model in memory), so they rebuild in seconds."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments import split_variant
from ..workflow.forkserver import usage_path


def _read(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def layers_text(windows: dict[str, list[int]] | None) -> str:
    """Merged (or dropped) layer indices as the paper prints them, e.g. "15-25"."""
    if not windows:
        return ""
    parts = []
    for stack, (start, size) in windows.items():
        span = f"{start}-{start + size - 1}" if size > 1 else f"{start}"
        parts.append(span if len(windows) == 1 else f"{stack} {span}")
    return "; ".join(parts)


def groups_text(groups: dict[str, list[list[int]] | list[int]]) -> str:
    """Similarity groups' members, runs of adjacent layers joined, groups split by " / ", e.g. "3, 7, 9-12" or
    "1-3 / 8, 10" (or per stack). A flat member list (files written before several groups existed) is one group."""
    parts = []
    for stack, entry in groups.items():
        sets = [entry] if entry and isinstance(entry[0], int) else entry
        texts = []
        for members in sets:
            runs: list[list[int]] = []
            for j in sorted(members):
                if runs and j == runs[-1][-1] + 1:
                    runs[-1].append(j)
                else:
                    runs.append([j])
            texts.append(", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs))
        text = " / ".join(texts)
        parts.append(text if len(groups) == 1 else f"{stack} {text}")
    return "; ".join(parts)


def fips_text(report: dict) -> str:
    """What a FiPS model factorised, e.g. "all 30 (groups of 2), rank 576, 57.5 % of V kept" (or per stack)."""
    parts = []
    stacks = report.get("stacks") or {}
    for stack, stats in stacks.items():
        n = sum(len(g) for g in stats["groups"])
        text = (
            f"all {n} (groups of {report['config']['group_size']}), rank {stats['rank']}, "
            f"{100 * stats['density']:.1f} % of V kept"
        )
        parts.append(text if len(stacks) == 1 else f"{stack} {text}")
    return "; ".join(parts)


def wide_text(layout: dict[str, dict]) -> str:
    """What the wide form shares, e.g. "all 30: one block of 20 parts, 30,720 neurons" (or per stack)."""
    parts = []
    for stack, entry in layout.items():
        n = sum(size for _, size in entry["parts"])
        text = f"all {n}: one block of {len(entry['parts'])} parts, {entry['width']:,} neurons"
        parts.append(text if len(layout) == 1 else f"{stack} {text}")
    return "; ".join(parts)


def layers_cell(record: dict) -> str:
    """Table 9's ``layers`` column: a window, a similarity group's members, what FiPS factorised, or the wide
    block's parts."""
    if record.get("groups"):
        return groups_text(record["groups"])
    if record.get("wide"):
        return wide_text(record["wide"])
    if (record.get("repair") or {}).get("method") == "fips":
        return fips_text(record["repair"])
    return layers_text(record["windows"])


def repair_text(repair: dict | None) -> str:
    """The local repair error of a merged model as Table 9 prints it: ``error_repaired`` (relative squared
    reconstruction error of the shared block over its window's members, 0 = exact) per stack, e.g. "0.52" or
    "encoder 0.41; decoder 0.52"; empty for models that were not repaired (repair off, layer dropping, files
    written before the repair existed), so the column reads the same for every method."""
    stacks = (repair or {}).get("stacks") or {}
    parts = [
        (stack, float(stats["error_repaired"]))
        for stack, stats in stacks.items()
        if isinstance(stats, dict) and stats.get("error_repaired") is not None
    ]
    if len(parts) == 1 and len(stacks) == 1:
        return f"{parts[0][1]:.3g}"
    return "; ".join(f"{stack} {error:.3g}" for stack, error in parts)


def budget_text(finetune: dict | None) -> str:
    """The recovery fine-tuning budget as Table 9 prints it, e.g. "2,560 tokens" (examples seen in the task's
    unit, ``finetune.budget``): methods are only comparable at equal budgets, so the table says what each got.
    Empty for evaluations without fine-tuning or written before budgets were recorded."""
    budget = (finetune or {}).get("budget") or {}
    if budget.get("total") is None:
        return ""
    return f"{int(budget['total']):,} {budget.get('unit', '')}".rstrip()


def device_text(record: dict | None) -> str:
    """A result file's device record (:func:`ffmerge.device.device_record`) as the tables print it, e.g.
    "cpu fp32" or "cuda (NVIDIA H100 80GB HBM3) bf16"."""
    if not record:
        return ""
    name = f" ({record['name']})" if record.get("name") else ""
    return f"{record['type']}{name} {record['precision']}"


def device_cell(record: dict) -> str:
    """Where a Table 9 row was computed: the test evaluation's device and precision, and the fine-tune's where it
    differs (e.g. "cuda (NVIDIA H100 80GB HBM3) bf16 train; ... fp32 test"). Empty for files written before
    devices were recorded."""
    test = record.get("device")
    train = (record.get("finetune") or {}).get("device")
    if train and train != test:
        return f"{device_text(train)} train; {device_text(test)} test".strip()
    return device_text(test)


def results_table(base: dict, rows: list[dict]) -> pd.DataFrame:
    """The paper's Table 9 layout: metric per fraction x method after fine-tuning, with sizes; then the local
    repair error (``repair_error``, from pre.json), the recovery budget (``ft_budget``, from post.json) and the
    device and precision (``device``), at the end so the paper's columns keep their places. Tasks whose result
    files carry a ``metric_signature`` (translation: sacrebleu's BLEU signature) get it as a last column."""
    base_params = base["size"]["parameters"]
    records = [
        {
            "fraction": "0",
            "variant": "base",
            "choice": "",
            "layers": "",
            "ffs_removed": 0,
            "metric": base["metric"],
            "test_before_ft": base.get("test_before_ft"),
            "test": base["test"],
            "parameters": base_params,
            "param_reduction_%": 0.0,
            "repair_error": "",
            "ft_budget": budget_text(base.get("finetune")),
            "device": device_cell(base),
        }
    ]
    for r in rows:
        method, _ = split_variant(r["variant"])
        # a dropped layer takes its FF with it; a merge removes the FF blocks that tying made redundant, and
        # ffdrop's deleted FF sublayers are counted by size_report (ff_blocks_removed) as well
        ffs = sum(size for _, size in r["windows"].values()) if method == "drop" else r["size"]["ff_blocks_removed"]
        records.append(
            {
                "fraction": r["fraction"],
                "variant": r["variant"],
                "choice": r["choice"],
                "layers": layers_cell(r),
                "ffs_removed": ffs,
                "metric": r["metric"],
                "test_before_ft": r.get("test_before_ft"),
                "test": r["test"],
                "parameters": r["size"]["parameters"],
                "param_reduction_%": round(100 * (1 - r["size"]["parameters"] / base_params), 2),
                "repair_error": repair_text(r.get("repair")),
                "ft_budget": budget_text(r.get("finetune")),
                "device": device_cell(r),
            }
        )
    frame = pd.DataFrame.from_records(records)
    signatures = [r.get("metric_signature") for r in (base, *rows)]
    if any(signatures):  # translation: which BLEU (sacrebleu's signature: tokenizer, version, ...), last column
        frame["metric_signature"] = [s or "" for s in signatures]
    return frame


RECOVERY_COLUMNS = ["variant", "fraction", "choice", "metric", "step", "seen", "unit", "valid", "train_loss"]


def recovery_curves(base: dict | None, rows: list[dict]) -> pd.DataFrame:
    """Every fine-tune's validation curve (``finetune.curve`` of post.json), one row per evaluation: how fast
    each compressed model recovers, against the examples it has seen, not only where it ends up.

    ``base`` is the fine-tuned baseline's evaluation (variant "base", fraction "0", choice "" as in Table 9),
    or the unfine-tuned one, which has no curve. Files written before curves were recorded add no rows."""
    records = []
    for r, identity in [
        *([(base, ("base", "0", ""))] if base is not None else []),
        *[(r, (r["variant"], r["fraction"], r["choice"])) for r in rows],
    ]:
        finetune = r.get("finetune") or {}
        unit = (finetune.get("budget") or {}).get("unit", "")
        for point in finetune.get("curve") or []:
            records.append(
                dict(
                    zip(("variant", "fraction", "choice"), identity, strict=True),
                    metric=r["metric"],
                    step=int(point["step"]),
                    seen=int(point["seen"]),
                    unit=unit,
                    valid=point["valid"],
                    train_loss=point.get("train_loss"),
                )
            )
    return pd.DataFrame.from_records(records, columns=RECOVERY_COLUMNS)


# Text columns whose cells can look like numbers ("0.523"): Markdown shows them as written, not reformatted
# with the table's float format (which would print a repair error of 0.004 as 0.00).
VERBATIM_COLUMNS = ("repair_error", "ft_budget")


def verbatim_positions(columns: Iterable[str]) -> list[int]:
    """Positions of :data:`VERBATIM_COLUMNS` among ``columns``, for tabulate's ``disable_numparse``."""
    return [i for i, column in enumerate(columns) if column in VERBATIM_COLUMNS]


def write_table(frame: pd.DataFrame, csv_path: Path, md_path: Path) -> None:
    for path in (csv_path, md_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv_path, index=False)
    markdown = frame.to_markdown(index=False, floatfmt=".2f", disable_numparse=verbatim_positions(frame.columns))
    Path(md_path).write_text(markdown + "\n")


def int8_table(base: dict, rows: list[dict]) -> pd.DataFrame:
    """The paper's Table 4: metric and compression ratio (bytes / uncompressed float bytes) with and without int8."""
    reference = base["bytes_float"]
    records = []
    for r in [base, *rows]:
        label = r.get("variant") or "base"
        records.append(
            {
                "variant": label,
                "fraction": r.get("fraction") or "0",
                "int8": False,
                "metric": r["metric"],
                "test": r.get("test_float"),
                "ratio": r["bytes_float"] / reference,
            }
        )
        records.append(
            {
                "variant": label,
                "fraction": r.get("fraction") or "0",
                "int8": True,
                "metric": r["metric"],
                "test": r["test"],
                "ratio": r["bytes_int8"] / reference,
            }
        )
    return pd.DataFrame.from_records(records)


def window_scores(selections: list[dict]) -> pd.DataFrame:
    """Every candidate's validation score before fine-tuning (the paper's Figure 10 data).

    A proxy search's windows that only the proxy ranked have no validation score: NaN, share 0.
    """
    rows = [
        {
            "variant": s["variant"],
            "fraction": s["fraction"],
            "start": int(start),
            "metric": s["metric"],
            "valid": s["scores"].get(start, math.nan),
            "selected": int(start) == s["best_start"],
            # share of the validation data scored: < 1 for windows dropped by the search's screening, 0 for those
            # a proxy search ranked below its proxy_keep
            "share": s.get("screened", {}).get(start, 1.0) if start in s["scores"] else 0.0,
        }
        for s in selections
        for start in s.get("proxy_scores") or s["scores"]
    ]
    return pd.DataFrame.from_records(rows).sort_values(["variant", "fraction", "start"])


def tables(inputs: Any, outputs: Any) -> None:
    """Snakemake's named inputs/outputs -> every table of one task."""
    base = _read(inputs.base) | {"test_before_ft": _read(inputs.base_pre)["test"]}
    rows = []
    for pre_path, post_path in zip(inputs.pre, inputs.post, strict=True):
        pre = _read(pre_path)
        # the repair is measured when the model is built (pre.json); post.json's copy is not authoritative
        rows.append(_read(post_path) | {"test_before_ft": pre["test"], "repair": pre.get("repair")})
    write_table(results_table(base, rows), outputs.table9_csv, outputs.table9_md)
    recovery_curves(base, rows).to_csv(outputs.recovery_csv, index=False)
    window_scores([_read(p) for p in inputs.selections]).to_csv(outputs.windows_csv, index=False)
    int8_rows = [_read(p) for p in inputs.get("int8", [])]
    if int8_rows:
        evals = {(r["variant"], r["fraction"], r["choice"]): r for r in rows}
        for r in int8_rows:
            r["test_float"] = (evals.get((r.get("variant"), r.get("fraction"), r.get("choice"))) or base)["test"]
        *compressed, base_int8 = int8_rows
        frame = int8_table(base_int8, compressed)
    else:
        frame = pd.DataFrame(columns=["variant", "fraction", "int8", "metric", "test", "ratio"])
    write_table(frame, outputs.int8_csv, outputs.int8_md)


def stage_times(bench_dir: str | Path, logs_dir: str | Path | None = None) -> pd.DataFrame:
    """Per task and rule: job count, summed wall and CPU seconds and the largest peak RSS, from Snakemake's
    ``benchmark:`` files (``{results}/benchmarks/{task}/{rule}/...tsv``). Jobs overlap when run in parallel,
    so the sums say where the compute goes, not how long the run took.

    A job that ran in a fork of the fork server is not a child of the process Snakemake measured: its CPU
    time and peak RSS come from the usage file beside its log (``logs_dir`` mirrors ``bench_dir``)."""
    rows = []
    for path in sorted(Path(bench_dir).rglob("*.tsv")):
        relative = path.relative_to(bench_dir)
        parts = relative.parts
        task, rule = parts[0], (parts[1] if len(parts) > 2 else path.stem)
        last = pd.read_csv(path, sep="\t").iloc[-1]
        row = {"task": task, "rule": rule, "wall_s": last["s"], "cpu_s": last["cpu_time"], "rss_mb": last["max_rss"]}
        usage = usage_path(Path(logs_dir) / relative.with_suffix(".log")) if logs_dir else None
        if usage is not None and usage.is_file():
            forked = _read(usage)
            row.update(cpu_s=forked["cpu_s"], rss_mb=forked["max_rss_mb"])
        rows.append(row)
    frame = pd.DataFrame.from_records(rows, columns=["task", "rule", "wall_s", "cpu_s", "rss_mb"])
    grouped = frame.groupby(["task", "rule"], sort=False)
    return grouped.agg(
        jobs=("wall_s", "size"), wall_s=("wall_s", "sum"), cpu_s=("cpu_s", "sum"), max_rss_mb=("rss_mb", "max")
    ).reset_index()


def disk_footprint(results_dir: str | Path, tasks: Iterable[str]) -> pd.DataFrame:
    """Bytes on disk per task and top-level folder (``model``, ``models``, ``features``, ``work``...), largest
    first within each task, plus the rest of ``results_dir`` (logs, report) as task ``(shared)``.

    A laptop run's footprint is dominated by checkpoints; printing it at the end of every run makes a
    change in what is stored visible before the disk fills. Sizes are allocated blocks (``st_blocks``), what
    ``du`` reports, so sparse or hard-linked files are not counted at their apparent size."""
    root = Path(results_dir)
    tasks = list(tasks)
    rows: list[dict[str, Any]] = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name in tasks and entry.is_dir():
            rows += [{"task": entry.name, "folder": sub.name, "bytes": _allocated(sub)} for sub in entry.iterdir()]
        else:
            rows.append({"task": "(shared)", "folder": entry.name, "bytes": _allocated(entry)})
    frame = pd.DataFrame.from_records(rows, columns=["task", "folder", "bytes"])
    return frame.sort_values(["task", "bytes"], ascending=[True, False], kind="stable").reset_index(drop=True)


def footprint_text(frame: pd.DataFrame) -> str:
    """One line per task (total and its three largest folders) and the grand total, in GB (10^9 bytes)."""
    lines = []
    for task, group in frame.groupby("task", sort=True):
        top = ", ".join(f"{r.folder} {r.bytes / 1e9:.2f}" for r in group.head(3).itertuples())
        lines.append(f"  {task}: {group['bytes'].sum() / 1e9:.2f} GB ({top})")
    return f"disk footprint {frame['bytes'].sum() / 1e9:.2f} GB\n" + "\n".join(lines)


def _allocated(path: Path) -> int:
    """Allocated bytes of a file or a whole tree, without following symlinks."""
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
