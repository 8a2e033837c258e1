"""The paper's figures and tables from finished result files alone (no model in memory, no torch import).

Inputs are the files the workflow already writes: each task's ``tables/table9.csv`` (every evaluated model after
fine-tuning, with sizes), ``tables/window_scores.csv`` (every window's validation score before fine-tuning),
``tables/int8.csv``, ``tables/recovery_curves.csv`` (every fine-tune's validation curve) and
``cka/{ff_out,attn_out}.csv``; the paper's published numbers come from
``data/paper_results.yaml``. Each builder takes DataFrames keyed by task name (in config order) and returns the
figure or table together with ``notes``: one line per experiment the config did not run (no vanilla merge, no
random windows, int8 off, ...), whose series or rows are left out instead of failing.

- Figure 2  ``ff_removed_figure``: metric after fine-tuning vs FF sublayers removed, vanilla vs permute (and
  ffdrop, deleting the same FF sublayers, where configured).
- Figure 3  ``params_removed_figure``: metric after fine-tuning vs % of parameters removed, merging vs dropping
  layers vs deleting FF sublayers (ffdrop), and tie + random init (tie_random) where configured.
- Figure 5/6 ``cka_figure``: linear-CKA heatmap of FF outputs / attention outputs across layers.
- Figure 10 ``window_scores_figure``: validation metric of every window start before fine-tuning, chosen marked.
- ``recovery_curves_figure``: validation metric during recovery fine-tuning vs examples seen, per variant.
- Table 2  ``windows_table``: best pre-fine-tuning window vs random windows, after fine-tuning.
- Table 3  ``anchors_table``: merge anchor first / middle / last, after fine-tuning.
- Table 4 / 9 ``combined_table``: the per-task int8 / results tables stacked with a task column.
- ``paper_comparison``: each main result beside the paper's number for the same cell, where one exists.

Figures are plain ``matplotlib.figure.Figure`` objects drawn on the Agg canvas (no pyplot state, no global
style change); seaborn supplies the style context and the heatmaps.
"""

from __future__ import annotations

import html
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..experiments import split_variant
from .tables import VERBATIM_COLUMNS, verbatim_positions

# metric name in the result files -> (axis label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "ppl": ("perplexity", False),
    "accuracy": ("top-1 accuracy (%)", True),
    "bleu": ("BLEU", True),
    "wer": ("word error rate (%)", False),
}
ANCHORS = ("first", "middle", "last")
# every method of experiments.methods with a window search of its own, in the order figures list them
SEARCH_ORDER = ("permute", "vanilla", "drop", "ffdrop")
# controls built on another method's window (experiments.REUSED_SEARCH), listed after the searches; they are not in
# the default grid, so a figure draws them where present and says nothing where absent
CONTROL_ORDER = ("tie_random", "onewide", "group", "fips", "wide")
METHOD_ORDER = SEARCH_ORDER + CONTROL_ORDER
# each method its own colour (room for all nine)
PALETTE = dict(zip(METHOD_ORDER, sns.color_palette("colorblind", len(METHOD_ORDER)), strict=True))
# legend text where the method's name alone does not say what it removes
SHORT_LABELS = {
    "ffdrop": "delete FF",
    "tie_random": "tie + random init",
    "onewide": "One Wide FFN",
    "group": "merge (similar group)",
    "fips": "FiPS",
    "wide": "one wide FF",
}
LONG_LABELS = {
    "permute": "merge (permute)",
    "vanilla": "merge (vanilla)",
    "drop": "drop layers",
    "ffdrop": "delete FF sublayers",
    "tie_random": "tie + random init",
    "onewide": "One Wide FFN (shared encoder FF, no decoder FF)",
    "group": "merge of a similar group (not adjacent)",
    "fips": "FiPS (shared bases, sparse factors)",
    "wide": "One Wide FFN, wide form (one shared wide FF)",
}
# what a variant name in Table 9 means, where the name alone does not say it (a note under the table)
VARIANT_NOTES = {
    "tie_random": (
        "tie_random = tie + random init: the permute merge's chosen window, tied like the merge (the same parameters "
        "removed), its shared FF block freshly initialised as the model family initialises it (task seed), no "
        "repair; then the same recovery fine-tuning. It tells how much of the merge's result comes from the merged "
        "weights"
    ),
    "onewide": (
        "onewide = One Wide FFN after training (Pires et al. 2023): every encoder layer shares one FF block (the "
        "permute merge of the whole encoder, repaired like the merges) and the decoder has no FF sublayers; its own "
        "budget, listed under all-but-one, which it exceeds by the decoder's one remaining FF block"
    ),
    "group": (
        "group = the permute merge (repaired like it) of as many layers as the fraction's window, chosen by "
        "similarity instead of adjacency: the layers with the most alike FF outputs (linear CKA on the calibration "
        "tokens, grown greedily from the most similar pair); layers lists the members"
    ),
    "fips": (
        "fips = FiPS (Uyuk et al. 2026): every FF matrix written as a basis shared by a group of adjacent layers "
        "times its own sparse factor (SVD start, fitted to the layers' cached FF outputs while magnitude pruning "
        "sparsifies the factors), within the FF parameters the merge keeps at the fraction, the sparse index "
        "counted; repair_error is its local reconstruction error"
    ),
    "wide": (
        "wide = One Wide FFN's wide form: every layer of a stack shares one FF block with as many neurons as the "
        "blocks the merge keeps at the fraction (the stack cut into that many parts, each permute-merged, their "
        "neurons concatenated, output scaled to their mean; repaired like the merges); same parameters as the "
        "merge, but that many times the FF compute per token"
    ),
}
ANCHOR_STYLES = {"first": "-", "middle": ":", "last": "-."}
STYLE = "whitegrid"

Notes = list[str]


# --------------------------------------------------------------------------------------------------------------
# Reading result files
# --------------------------------------------------------------------------------------------------------------


def read_results(path: str | Path) -> pd.DataFrame:
    """A task's ``tables/table9.csv`` (``ffmerge.report.tables.results_table``) with text columns kept as text."""
    text = {column: str for column in ("fraction", "variant", "choice", "layers", "metric", *VERBATIM_COLUMNS)}
    frame = pd.read_csv(path, dtype=text)
    for column in ("choice", "layers", *VERBATIM_COLUMNS):
        if column in frame:  # tables written before the repair and budget columns lack them
            frame[column] = frame[column].fillna("")
    return frame


def read_recovery_curves(path: str | Path) -> pd.DataFrame:
    """A task's ``tables/recovery_curves.csv`` (``ffmerge.report.tables.recovery_curves``); header only when no
    post.json recorded a curve."""
    text = {"variant": str, "fraction": str, "choice": str, "metric": str, "unit": str}
    frame = pd.read_csv(path, dtype=text)
    for column in ("choice", "unit"):
        frame[column] = frame[column].fillna("")
    return frame


def read_window_scores(path: str | Path) -> pd.DataFrame:
    """A task's ``tables/window_scores.csv`` (``ffmerge.report.tables.window_scores``)."""
    frame = pd.read_csv(path, dtype={"variant": str, "fraction": str, "metric": str})
    frame["selected"] = frame["selected"].astype(str).str.lower() == "true"
    return frame


def read_int8(path: str | Path) -> pd.DataFrame:
    """A task's ``tables/int8.csv`` (``ffmerge.report.tables.int8_table``); empty (header only) when int8 is off."""
    frame = pd.read_csv(path, dtype={"variant": str, "fraction": str, "metric": str})
    frame["int8"] = frame["int8"].astype(str).str.lower() == "true"
    return frame


def read_cka(path: str | Path) -> pd.DataFrame:
    """A ``cka/{kind}.csv`` matrix (``ffmerge.workflow.pipeline.cka``): rows and columns labelled ``stack.layer``."""
    frame = pd.read_csv(path, index_col=0)
    frame.index = frame.index.astype(str)
    frame.columns = frame.columns.astype(str)
    return frame


def read_per_task(reader: Callable[[Any], pd.DataFrame], tasks: Sequence[str], paths: Sequence[Any]) -> dict:
    """``{task: reader(path)}`` for Snakemake's parallel lists of task names and input files."""
    if len(tasks) != len(paths):
        raise ValueError(f"{len(tasks)} tasks but {len(paths)} input files")
    return {task: reader(path) for task, path in zip(tasks, paths, strict=True)}


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def metric_label(metric: str) -> str:
    name, higher = METRICS.get(metric, (metric, None))
    if higher is None:
        return name
    return f"{name} ({'higher' if higher else 'lower'} is better)"


def describe_source(source: Mapping[str, Any]) -> str:
    """A model or data source as one short line: hub id, local path or packaged file."""
    kind = source.get("kind")
    if kind == "hub":
        name = source.get("id") or source.get("path") or "?"
        return f"{name}:{source['name']}" if source.get("name") else str(name)
    if kind == "local":
        return f"local {source.get('path')}"
    return f"{kind} {source.get('package')}/{source.get('file')}"


def window_start(layers: str) -> int | None:
    """The first layer of a window as ``ffmerge.report.tables.layers_text`` prints it ("15-25", "encoder 1-3; decoder
    1-2"): every stack's window starts at the same index, so the first span's first number is the start."""
    match = re.match(r"\s*(?:[A-Za-z_][\w.]*\s+)?(\d+)", layers or "")
    return int(match.group(1)) if match else None


def _base_row(frame: pd.DataFrame) -> pd.Series | None:
    rows = frame[frame["variant"] == "base"]
    return rows.iloc[0] if len(rows) else None


def _best_rows(frame: pd.DataFrame, variant: str) -> pd.DataFrame:
    return frame[(frame["variant"] == variant) & (frame["choice"] == "best")]


def _metric_of(frame: pd.DataFrame) -> str:
    metrics = [m for m in frame.get("metric", pd.Series(dtype=str)).dropna().unique() if m]
    return str(metrics[0]) if metrics else ""


def _random_index(choice: str) -> int | None:
    match = re.fullmatch(r"random(\d+)", choice)
    return int(match.group(1)) if match else None


def _panels(n: int, width: float = 4.6, height: float = 3.6, columns: int = 3) -> tuple[Figure, list[Axes]]:
    """A figure with one panel per task (wrapped after ``columns``); at least one panel."""
    n = max(n, 1)
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    FigureCanvasAgg(fig)
    with sns.axes_style(STYLE):
        axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _finish(fig: Figure, notes: Notes) -> None:
    """Tight layout, with the notes (left-out series) printed at the foot of the figure."""
    width, height = fig.get_size_inches()
    lines = [wrapped for note in notes for wrapped in textwrap.wrap(note, width=int(width * 15)) or [""]]
    foot = (0.16 * len(lines) + 0.1) / height if lines else 0.0
    fig.tight_layout(rect=(0, min(foot, 0.6), 1, 1))
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom", ha="left", color="dimgray", gid="notes")


def _log_scale_if_wide(ax: Axes, metric: str, values: Iterable[float]) -> None:
    finite = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if metric == "ppl" and finite and max(finite) / min(finite) > 10:
        ax.set_yscale("log")


def _empty_panel(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(task: str, titles: Mapping[str, str] | None) -> str:
    return (titles or {}).get(task, task)


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------


def ff_removed_figure(
    results: Mapping[str, pd.DataFrame], titles: Mapping[str, str] | None = None
) -> tuple[Figure, Notes]:
    """Figure 2: test metric after fine-tuning against the number of FF sublayers removed, one line per merge
    method (vanilla, permute; best window), one panel per task. Each line starts at the base model (0 removed).

    ffdrop deletes exactly the FF sublayers a merge of the same fraction removes, so its line sits at the same
    x and shows what the merge buys over plain deletion; it is drawn where the config ran it."""
    fig, axes = _panels(len(results))
    notes: Notes = []
    for ax, (task, frame) in zip(axes, results.items(), strict=False):
        base = _base_row(frame)
        if base is None:
            notes.append(f"{task}: no base row in Table 9; lines start at the first compressed model")
        ticks: dict[int, str] = {0: "0\nbase"} if base is not None else {}
        values: list[float] = []
        for method in ("vanilla", "permute", "ffdrop"):
            rows = _best_rows(frame, method).sort_values("ffs_removed", kind="stable")
            if rows.empty:
                notes.append(f"{task}: no {method} results (not in experiments.methods?); its line is left out")
                continue
            x = [int(v) for v in rows["ffs_removed"]]
            y = [float(v) for v in rows["test"]]
            if base is not None:
                x, y = [0, *x], [float(base["test"]), *y]
            label = SHORT_LABELS.get(method, method)
            ax.plot(x, y, marker="o", label=label, color=PALETTE[method], gid=f"{task}:{method}")
            values += y
            ticks.update({int(r.ffs_removed): f"{int(r.ffs_removed)}\n{r.fraction}" for r in rows.itertuples()})
        if not values:
            _empty_panel(ax, "no merge results")
        else:
            ax.set_xticks(sorted(ticks), [ticks[k] for k in sorted(ticks)])
            ax.legend(title="method", fontsize=8)
            _log_scale_if_wide(ax, _metric_of(frame), values)
        ax.set_title(_title(task, titles), fontsize=10)
        ax.set_xlabel("FF sublayers removed")
        ax.set_ylabel(f"test {metric_label(_metric_of(frame))}")
    _finish(fig, notes)
    return fig, notes


def params_removed_figure(
    results: Mapping[str, pd.DataFrame], titles: Mapping[str, str] | None = None
) -> tuple[Figure, Notes]:
    """Figure 3: test metric after fine-tuning against % of the model's parameters removed, merging (permute,
    best window) vs layer dropping vs deleting FF sublayers (ffdrop), each with its best window, one panel per
    task; every line starts at the base model (0 %).

    Dropping whole layers removes attention too, so it reaches a fraction with more parameters gone than the
    merge; ffdrop removes the merge's FF sublayers and nothing else, the same parameter budget. Where the config
    ran it, tie + random init (tie_random: the merge's window and ties, a freshly initialised shared block) is drawn
    too, at the merge's parameter reduction, and so are the similarity-group merge (group, same reduction), FiPS
    (fips, at most the merge's parameters, index included), One Wide FFN's wide form (wide, at most the merge's)
    and One Wide FFN (onewide, one point at its own budget); none is in the default grid, so their absence is not
    noted."""
    fig, axes = _panels(len(results))
    notes: Notes = []
    series = {method: LONG_LABELS[method] for method in ("permute", "drop", "ffdrop", *CONTROL_ORDER)}
    for ax, (task, frame) in zip(axes, results.items(), strict=False):
        base = _base_row(frame)
        if base is None:
            notes.append(f"{task}: no base row in Table 9; lines start at the first compressed model")
        values: list[float] = []
        for variant, label in series.items():
            rows = _best_rows(frame, variant).sort_values("param_reduction_%", kind="stable")
            if rows.empty:
                if variant not in CONTROL_ORDER:
                    notes.append(f"{task}: no {variant} results (not in experiments.methods?); its line is left out")
                continue
            x = [float(v) for v in rows["param_reduction_%"]]
            y = [float(v) for v in rows["test"]]
            if base is not None:
                x, y = [0.0, *x], [float(base["test"]), *y]
            ax.plot(x, y, marker="o", label=label, color=PALETTE[variant], gid=f"{task}:{variant}")
            values += y
        if not values:
            _empty_panel(ax, "no merge, drop or ffdrop results")
        else:
            ax.legend(fontsize=8)
            _log_scale_if_wide(ax, _metric_of(frame), values)
        ax.set_title(_title(task, titles), fontsize=10)
        ax.set_xlabel("% of total parameters removed")
        ax.set_ylabel(f"test {metric_label(_metric_of(frame))}")
    _finish(fig, notes)
    return fig, notes


def window_scores_figure(
    scores: Mapping[str, pd.DataFrame],
    first_fractions: Mapping[str, str],
    titles: Mapping[str, str] | None = None,
) -> tuple[Figure, Notes]:
    """Figure 10: validation metric before fine-tuning of every window start at the task's first fraction, one
    line per search (permute, vanilla, drop, ffdrop), the chosen (best) start marked with a star; one panel per
    task. Controls without a search of their own (tie_random: the permute window) have no line. A proxy search
    (``search.mode: proxy``) scored only its kept windows on validation: only those are drawn, with a note."""
    fig, axes = _panels(len(scores))
    notes: Notes = []
    for ax, (task, frame) in zip(axes, scores.items(), strict=False):
        fraction = first_fractions[task]
        at = frame[frame["fraction"] == fraction]
        if at.empty:
            notes.append(f"{task}: no window scores at fraction {fraction}; panel left empty")
            _empty_panel(ax, f"no windows at {fraction}")
        values: list[float] = []
        present = [s for s in SEARCH_ORDER if s in set(at["variant"])] + sorted(set(at["variant"]) - set(SEARCH_ORDER))
        for search in present:
            rows = at[at["variant"] == search].sort_values("start")
            color = PALETTE.get(search)
            share = rows["share"] if "share" in rows else pd.Series(1.0, index=rows.index)
            full, screened, unscored = rows[share >= 1.0], rows[(share > 0) & (share < 1.0)], rows[share <= 0]
            if not unscored.empty:  # a proxy search's windows that only its proxy ranked: no validation score
                notes.append(
                    f"{task}: {len(unscored)} of {len(rows)} {search} windows were ranked by the proxy search's "
                    "feature-cache score only, never scored on validation; not drawn"
                )
            rows = rows[share > 0]
            ax.plot(
                full["start"].tolist(),
                full["valid"].astype(float).tolist(),
                marker=".",
                label=SHORT_LABELS.get(search, search),
                color=color,
                gid=f"{task}:{search}",
            )
            if not screened.empty:  # scored on the screening share only: not comparable with the line
                ax.plot(
                    screened["start"].tolist(),
                    screened["valid"].astype(float).tolist(),
                    marker="o",
                    markerfacecolor="none",
                    linestyle="none",
                    color=color,
                    label=f"_screened {search}",
                    gid=f"{task}:{search}:screened",
                )
                notes.append(
                    f"{task}: {len(screened)} {search} windows were screened out on part of the validation data "
                    "(hollow markers; their scores are on that part only)"
                )
            values += rows["valid"].astype(float).tolist()
            chosen = rows[rows["selected"]]
            if len(chosen) != 1:
                notes.append(f"{task}: {search} at {fraction} has {len(chosen)} selected windows; none marked")
                continue
            start, valid = int(chosen["start"].iloc[0]), float(chosen["valid"].iloc[0])
            ax.plot(
                [start],
                [valid],
                marker="*",
                markersize=14,
                linestyle="none",
                color=color,
                markeredgecolor="black",
                label=f"_chosen {search}",
                gid=f"{task}:{search}:chosen",
            )
            ax.annotate(f"{start}", (start, valid), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        if present:
            ax.legend(title="search (★ chosen)", fontsize=8)
            _log_scale_if_wide(ax, _metric_of(at), values)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{_title(task, titles)}: windows at {fraction}", fontsize=10)
        ax.set_xlabel("window start (first layer)")
        ax.set_ylabel(f"validation {metric_label(_metric_of(at))}\nbefore fine-tuning")
    _finish(fig, notes)
    return fig, notes


def _curve_order(variants: Iterable[str]) -> list[str]:
    """Methods in :data:`METHOD_ORDER`, each followed by its anchor ablations, then anything else by name."""
    present = set(variants)

    def key(variant: str) -> tuple[int, int, str]:
        method, anchor = split_variant(variant)
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return rank, ANCHORS.index(anchor) if anchor in ANCHORS else len(ANCHORS), variant

    return sorted(present, key=key)


def _curve_label(variant: str) -> str:
    method, anchor = split_variant(variant)
    label = LONG_LABELS.get(method, method)
    return label if "@" not in variant else f"{label}, anchor {anchor}"


def recovery_curves_figure(
    curves: Mapping[str, pd.DataFrame],
    first_fractions: Mapping[str, str],
    titles: Mapping[str, str] | None = None,
) -> tuple[Figure, Notes]:
    """Recovery curves: validation metric during recovery fine-tuning against the examples seen (in the task's
    budget unit), at the task's first fraction with the best window, one line per variant (methods and anchor
    ablations) and the fine-tuned base model as a dashed reference; one panel per task.

    Figures 2 and 3 show where fine-tuning ends; this shows how fast each compressed model gets there (step 0 is
    the model before fine-tuning), which tells whether a longer budget would change the ranking."""
    fig, axes = _panels(len(curves))
    notes: Notes = []
    for ax, (task, frame) in zip(axes, curves.items(), strict=False):
        fraction = first_fractions[task]
        metric = _metric_of(frame)
        ax.set_title(f"{_title(task, titles)}: recovery at {fraction}", fontsize=10)
        if frame.empty:
            notes.append(
                f"{task}: no recovery curves (post.json files written before finetune.curve was recorded?); "
                "panel left empty"
            )
            _empty_panel(ax, "no recovery curves")
            continue
        at = frame[(frame["fraction"] == fraction) & (frame["choice"] == "best") & (frame["variant"] != "base")]
        variants = _curve_order(at["variant"])
        for method in SEARCH_ORDER:
            if method not in variants:
                notes.append(
                    f"{task}: no {method} recovery curve at {fraction} (not in experiments.methods, or its "
                    "post.json has no finetune.curve); its line is left out"
                )
        values: list[float] = []
        for variant in variants:
            rows = at[at["variant"] == variant].sort_values("step", kind="stable")
            method, anchor = split_variant(variant)
            y = rows["valid"].astype(float).tolist()
            ax.plot(
                rows["seen"].astype(float).tolist(),
                y,
                marker="o",
                markersize=3,
                linestyle=ANCHOR_STYLES.get(anchor, "-"),
                label=_curve_label(variant),
                color=PALETTE.get(method),
                gid=f"{task}:{variant}",
            )
            values += y
        base = frame[frame["variant"] == "base"].sort_values("step", kind="stable")
        if base.empty:
            notes.append(
                f"{task}: no fine-tuned base curve (finetune_baseline off, or eval/base/post.json has no "
                "finetune.curve); its reference line is left out"
            )
        else:
            y = base["valid"].astype(float).tolist()
            ax.plot(
                base["seen"].astype(float).tolist(),
                y,
                linestyle="--",
                color="dimgray",
                label="base (fine-tuned)",
                gid=f"{task}:base",
            )
            values += y
        if not values:
            _empty_panel(ax, f"no curves at {fraction}")
            continue
        ax.legend(fontsize=7)
        finite = [v for v in values if np.isfinite(v)]
        if metric == "ppl" and finite and min(finite) > 0:  # right after compression ppl can be 100x the end
            ax.set_yscale("log")
        units = sorted({u for u in pd.concat([at["unit"], base["unit"]]) if u})
        ax.set_xlabel(f"{' / '.join(units) or 'examples'} seen in fine-tuning")
        name, higher = METRICS.get(metric, (metric, None))
        better = "" if higher is None else f"\n({'higher' if higher else 'lower'} is better)"
        ax.set_ylabel(f"validation {name}{better}")
    _finish(fig, notes)
    return fig, notes


def cka_figure(matrix: pd.DataFrame, title: str) -> Figure:
    """Figures 5 and 6: the linear-CKA matrix as a heatmap (rows and columns = layers of every stack, indexed
    together; NaN cross-stack pairs stay blank), with a line between stacks."""
    labels = list(matrix.index)
    n = len(labels)
    size = min(4.0 + 0.12 * n, 11.0)
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    with sns.axes_style("white"):
        ax = fig.add_subplot()
    if n == 0:
        _empty_panel(ax, "empty CKA matrix")
    else:
        step = max(1, math.ceil(n / 24))
        sns.heatmap(
            matrix.astype(float),
            ax=ax,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            square=True,
            xticklabels=step,
            yticklabels=step,
            cbar_kws={"label": "linear CKA"},
        )
        stacks = [label.rsplit(".", 1)[0] for label in labels]
        for i in range(1, n):
            if stacks[i] != stacks[i - 1]:
                ax.axhline(i, color="white", linewidth=2)
                ax.axvline(i, color="white", linewidth=2)
        ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, png: str | Path, pdf: str | Path | None = None, dpi: int = 150) -> None:
    for path in (png, pdf):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=dpi)


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------

WINDOWS_COLUMNS = [
    "task",
    "fraction",
    "window",
    "start",
    "layers",
    "metric",
    "valid_before_ft",
    "test_before_ft",
    "test",
]
ANCHORS_COLUMNS = ["task", "fraction", "anchor", "layers", "metric", "test_before_ft", "test"]


def windows_table(
    results: Mapping[str, pd.DataFrame],
    scores: Mapping[str, pd.DataFrame],
    first_fractions: Mapping[str, str],
) -> tuple[pd.DataFrame, Notes]:
    """Table 2: the window chosen on validation before fine-tuning vs the random windows (permute, first fraction),
    each with its pre-fine-tuning validation score and its test metric before and after fine-tuning; plus the
    random windows' mean."""
    records: list[dict] = []
    notes: Notes = []
    for task, frame in results.items():
        fraction = first_fractions[task]
        rows = frame[(frame["variant"] == "permute") & (frame["fraction"] == fraction)]
        best = rows[rows["choice"] == "best"]
        if best.empty:
            notes.append(
                f"{task}: no permute result at {fraction} (permute not in experiments.methods?); rows left out"
            )
            continue
        randoms = rows[rows["choice"].map(_random_index).notna()]
        randoms = randoms.iloc[np.argsort([_random_index(c) for c in randoms["choice"]], kind="stable")]
        if randoms.empty:
            notes.append(f"{task}: no random windows (experiments.random_windows is 0); only the best window is listed")
        task_scores = scores.get(task)
        valid = {}
        if task_scores is not None:
            at = task_scores[(task_scores["variant"] == "permute") & (task_scores["fraction"] == fraction)]
            valid = {int(s): float(v) for s, v in zip(at["start"], at["valid"], strict=True)}
        for row in [*best.itertuples(), *randoms.itertuples()]:
            start = window_start(row.layers)
            records.append(
                {
                    "task": task,
                    "fraction": fraction,
                    "window": row.choice,
                    "start": start,
                    "layers": row.layers,
                    "metric": row.metric,
                    "valid_before_ft": valid.get(start, math.nan) if start is not None else math.nan,
                    "test_before_ft": float(row.test_before_ft),
                    "test": float(row.test),
                }
            )
        if len(randoms):
            chunk = pd.DataFrame.from_records(records[-len(randoms) :])
            records.append(
                {
                    "task": task,
                    "fraction": fraction,
                    "window": f"random mean ({len(randoms)})",
                    "start": None,
                    "layers": "",
                    "metric": best["metric"].iloc[0],
                    # NaN when a random window has no validation score (a proxy search never scored it)
                    "valid_before_ft": chunk["valid_before_ft"].mean(skipna=False),
                    "test_before_ft": chunk["test_before_ft"].mean(),
                    "test": chunk["test"].mean(),
                }
            )
    frame = pd.DataFrame.from_records(records, columns=WINDOWS_COLUMNS)
    frame["start"] = frame["start"].astype("Int64")
    return frame, notes


def anchors_table(
    results: Mapping[str, pd.DataFrame], first_fractions: Mapping[str, str]
) -> tuple[pd.DataFrame, Notes]:
    """Table 3: permute merging with the first, middle or last layer of the window as anchor (best window chosen
    with the first anchor), first fraction, test metric before and after fine-tuning."""
    records: list[dict] = []
    notes: Notes = []
    for task, frame in results.items():
        fraction = first_fractions[task]
        for anchor in ANCHORS:
            variant = "permute" if anchor == "first" else f"permute@{anchor}"
            rows = frame[(frame["variant"] == variant) & (frame["fraction"] == fraction) & (frame["choice"] == "best")]
            if rows.empty:
                notes.append(
                    f"{task}: no result with anchor {anchor} at {fraction} (not in experiments.anchors, or "
                    "permute not in experiments.methods); row left out"
                )
                continue
            row = rows.iloc[0]
            records.append(
                {
                    "task": task,
                    "fraction": fraction,
                    "anchor": split_variant(variant)[1],
                    "layers": row["layers"],
                    "metric": row["metric"],
                    "test_before_ft": float(row["test_before_ft"]),
                    "test": float(row["test"]),
                }
            )
    return pd.DataFrame.from_records(records, columns=ANCHORS_COLUMNS), notes


def combined_table(frames: Mapping[str, pd.DataFrame], what: str) -> tuple[pd.DataFrame, Notes]:
    """Per-task tables (Table 9, the int8 Table 4) stacked, with the task as the first column; variants whose
    name does not say what they are (:data:`VARIANT_NOTES`) are explained in a note where present."""
    notes: Notes = []
    parts = []
    columns: list[str] = []
    present: set[str] = set()
    for task, frame in frames.items():
        columns = columns or list(frame.columns)
        if frame.empty:
            notes.append(f"{task}: no {what} rows (experiment off in the config); left out")
            continue
        parts.append(frame.assign(task=task)[["task", *frame.columns]])
        present |= set(frame["variant"]) if "variant" in frame else set()
    notes += [text for variant, text in VARIANT_NOTES.items() if variant in present]
    if not parts:
        return pd.DataFrame(columns=["task", *columns]), notes
    return pd.concat(parts, ignore_index=True), notes


# --------------------------------------------------------------------------------------------------------------
# The paper's published numbers
# --------------------------------------------------------------------------------------------------------------

COMPARISON_COLUMNS = [
    "task",
    "model",
    "data",
    "variant",
    "fraction",
    "choice",
    "metric",
    "ours",
    "paper_model",
    "paper",
    "difference",
    "comparison",
    "note",
]


def load_paper_results(path: str | Path) -> dict:
    """``data/paper_results.yaml``: the source and, per paper model, the published cells."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "source" not in data or not isinstance(data.get("results"), list):
        raise ValueError(f"{path}: expected a mapping with 'source' and a list 'results'")
    for entry in data["results"]:
        for key in ("name", "task_type", "metric", "model", "data", "values"):
            if key not in entry:
                raise ValueError(f"{path}: paper entry {entry.get('name', entry)!r} has no {key!r}")
        for cell in entry["values"]:
            if not {"variant", "fraction", "value"} <= set(cell):
                raise ValueError(f"{path}: {entry['name']}: cell {cell} needs variant, fraction and value")
            if not isinstance(cell["fraction"], str):
                raise ValueError(f"{path}: {entry['name']}: fraction {cell['fraction']!r} must be quoted text")
    return data


def _same_source(cfg: Mapping[str, Any], entry: Mapping[str, Any]) -> str | None:
    """None when the task ran the paper's model on the paper's data, else why not."""
    model, data = cfg["model"], cfg["data"]
    if model.get("kind") != "hub":
        return f"offline model ({describe_source(model)}), not the paper's {entry['name'].split(',')[0]}"
    if model.get("id") not in entry["model"].get("hub_ids", []):
        return f"model {describe_source(model)} is not the paper's ({', '.join(entry['model'].get('hub_ids', []))})"
    hub_data = [(d.get("path"), d.get("name")) for d in entry["data"].get("hub", [])]
    if data.get("kind") != "hub" or (data.get("path") or data.get("id"), data.get("name")) not in hub_data:
        return f"data {describe_source(data)} is not the paper's {entry['data'].get('description', '')}".rstrip()
    return None


def paper_comparison(
    results: Mapping[str, pd.DataFrame],
    task_configs: Mapping[str, Mapping[str, Any]],
    paper: Mapping[str, Any],
) -> tuple[pd.DataFrame, Notes]:
    """Each main result (base, and every method x fraction with the best window, after fine-tuning) beside the
    paper's published number for the same cell.

    ``comparison`` is "comparable" only where the task ran the paper's hub model on the paper's data and the paper
    publishes that cell; "not comparable" for any other model or data (offline packaged models above all: the
    paper's number is shown for reference); "not available" where the paper publishes no number for the cell.
    """
    records: list[dict] = []
    notes: Notes = []
    used: set[str] = set()
    for task, frame in results.items():
        cfg = task_configs[task]
        metric = _metric_of(frame)
        entries = [e for e in paper["results"] if e["task_type"] == cfg["type"] and e["metric"] == metric]
        entry = entries[0] if entries else None
        why_not = _same_source(cfg, entry) if entry else None
        if entry:
            used.add(entry["name"])
        else:
            notes.append(f"{task}: the paper publishes no {cfg['type']} result in {metric}; nothing to compare")
        cells = {(c["variant"], c["fraction"]): c["value"] for c in (entry or {}).get("values", [])}
        main = frame[(frame["variant"] == "base") | ((frame["choice"] == "best") & ~frame["variant"].str.contains("@"))]
        for row in main.itertuples():
            paper_value = cells.get((row.variant, row.fraction))
            if entry is None or (why_not is None and paper_value is None):
                comparison, note = "not available", "the paper publishes no number for this cell"
            elif why_not is not None:
                comparison, note = "not comparable", why_not
            else:
                comparison, note = "comparable", ""
            if row.variant == "base" and not cfg.get("experiments", {}).get("finetune_baseline", True):
                note = "; ".join(filter(None, [note, "our base is not fine-tuned (finetune_baseline: false)"]))
            records.append(
                {
                    "task": task,
                    "model": describe_source(cfg["model"]),
                    "data": describe_source(cfg["data"]),
                    "variant": row.variant,
                    "fraction": row.fraction,
                    "choice": row.choice,
                    "metric": row.metric,
                    "ours": float(row.test),
                    "paper_model": entry["name"] if entry else "",
                    "paper": math.nan if paper_value is None else float(paper_value),
                    "difference": float(row.test) - float(paper_value) if comparison == "comparable" else math.nan,
                    "comparison": comparison,
                    "note": note,
                }
            )
    for entry in paper["results"]:
        if entry["name"] not in used:
            notes.append(f"paper values for {entry['name']} ({entry['task_type']}) have no matching task here")
    return pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS), notes


def paper_values_markdown(paper: Mapping[str, Any]) -> str:
    """The stored paper numbers with their source, as a Markdown section."""
    source = paper["source"]
    lines = [
        f'Paper values: {source["authors"]} ({source["year"]}), "{source["title"]}", '
        f"arXiv:{source.get('arxiv', '?')}. {source.get('cells', '')}".rstrip(),
        "",
        "| paper model | metric | variant | fraction | value |",
        "|---|---|---|---|---:|",
    ]
    for entry in paper["results"]:
        for cell in entry["values"]:
            lines.append(
                f"| {entry['name']} | {entry['metric']} | {cell['variant']} | {cell['fraction']} | {cell['value']} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Writing tables: CSV (data), Markdown and HTML (for reading, with the notes)
# --------------------------------------------------------------------------------------------------------------


def _format_number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def write_report_table(
    frame: pd.DataFrame,
    notes: Notes,
    csv: str | Path,
    md: str | Path | None = None,
    html_path: str | Path | None = None,
    title: str = "",
    extra_md: str = "",
) -> None:
    """CSV with the rows only; Markdown and a small stand-alone HTML page with title, table and notes."""
    for path in (csv, md, html_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv, index=False)
    note_md = "".join(f"- {n}\n" for n in notes)
    if md:
        shown = frame.astype(object).where(frame.notna(), None)  # tabulate prints None, not NaN, as missingval
        floatfmt = tuple(".4f" if column == "ratio" else ".2f" for column in frame.columns)
        verbatim = verbatim_positions(frame.columns)
        table = (
            shown.to_markdown(index=False, floatfmt=floatfmt, missingval="", disable_numparse=verbatim)
            if len(frame)
            else "(no rows)"
        )
        parts = [
            f"## {title}\n\n" if title else "",
            table + "\n",
            f"\nNotes:\n\n{note_md}" if notes else "",
            f"\n{extra_md}" if extra_md else "",
        ]
        Path(md).write_text("".join(parts))
    if html_path:
        body = frame.to_html(index=False, na_rep="", float_format=_format_number, border=0, classes="table")
        note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        extra = f"<pre>{html.escape(extra_md)}</pre>" if extra_md else ""
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>{t}</title><style>"
            "body{{font-family:sans-serif;font-size:13px}} table{{border-collapse:collapse}}"
            "th,td{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}} th{{background:#f3f3f3}}"
            "</style></head><body><h3>{t}</h3>{body}{notes}{extra}</body></html>\n"
        ).format(
            t=html.escape(title),
            body=body if len(frame) else "<p>(no rows)</p>",
            notes=f"<p>Notes:</p><ul>{note_html}</ul>" if notes else "",
            extra=extra,
        )
        Path(html_path).write_text(page)
