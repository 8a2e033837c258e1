#!/usr/bin/env python
"""Would the window search choose better windows if it scored every candidate *after* repair?

The workflow's search scores each window start's plain merge on validation and repairs only the chosen one (a
repair costs several candidate evaluations, docs/recovery.md). If repair changes the order of the windows, the
search picks a window that is best before repair but not after. This benchmark measures that on a finished
workflow's results: for every start of ``--fraction`` it builds the plain merge and the repaired merge exactly
as the compress step does (the task's ``repair`` config) and scores both on the full validation split; then it
takes the start each ranking chooses and measures the repaired model of each on the test split.

Prints, per start, validation before and after repair with both ranks, the two choices with their test metric,
the Spearman correlation of the two rankings, and the seconds spent building and scoring. The host's float32
matmul speed comes first: compare times within one run only.

    python benchmarks/repaired_search.py --task vision --fraction 1/3 --out /tmp/vision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from _config import task_config
from _host import announce
from scipy.stats import spearmanr

from ffmerge.checkpoint import load_model
from ffmerge.experiments import window_starts
from ffmerge.features import FeatureStore
from ffmerge.repair import RepairConfig
from ffmerge.tasks import get_task
from ffmerge.workflow import pipeline

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="vision")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--fraction", default="1/3")
    p.add_argument("--variant", default="permute")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    gflops = announce(args.threads)
    cfg, results_dir = task_config(args.config, args.task)
    results = results_dir / args.task
    task = get_task(cfg)
    dev = torch.device("cpu")
    data = results / "data"
    base = load_model(results / "model" / "base", auto_class=task.auto_class)
    store = FeatureStore.open(results / "features")
    repair = RepairConfig.from_cfg({**cfg["repair"], "enabled": True}, cfg["seed"])
    precision = pipeline.scoring_precision(cfg, "selection", dev)
    starts = window_starts(args.variant, pipeline.stack_layers(base), args.fraction)
    rows, models = [], {}
    for start in starts:
        row = {"start": start}
        for label, fix in (("plain", None), ("repaired", repair)):
            started = time.perf_counter()
            model = copy.deepcopy(base)
            pipeline.compress(model, args.variant, args.fraction, start, store, repair=fix)
            row[f"{label}_build_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            row[f"{label}_valid"] = pipeline._score(task, model, data, "valid", "selection", dev, precision)
            row[f"{label}_score_s"] = round(time.perf_counter() - started, 1)
            if fix is not None:
                models[start] = model
        rows.append(row)
        print(json.dumps(row), flush=True)
        # keep only the repaired models that can still be a choice (memory: one SmolLM2 copy is 0.5 GB)
        best = {_best(rows, key, task.higher_is_better) for key in ("plain_valid", "repaired_valid")}
        models = {s: m for s, m in models.items() if s in best}
    choices = {key: _best(rows, key, task.higher_is_better) for key in ("plain_valid", "repaired_valid")}
    tests = {}
    for start in sorted(set(choices.values())):
        tests[start] = pipeline._score(task, models[start], data, "test", "evaluation", dev, precision)
    rho = spearmanr([r["plain_valid"] for r in rows], [r["repaired_valid"] for r in rows]).statistic
    summary = {
        "task": args.task,
        "fraction": args.fraction,
        "variant": args.variant,
        "metric": task.metric,
        "gflops_1_thread": round(gflops, 1),
        "choice_plain": choices["plain_valid"],
        "choice_repaired": choices["repaired_valid"],
        "test_repaired_at_plain_choice": tests[choices["plain_valid"]],
        "test_repaired_at_repaired_choice": tests[choices["repaired_valid"]],
        "spearman": rho,
        "seconds": {
            "plain_search": round(sum(r["plain_build_s"] + r["plain_score_s"] for r in rows), 1),
            "repaired_search": round(sum(r["repaired_build_s"] + r["repaired_score_s"] for r in rows), 1),
        },
    }
    print(json.dumps(summary))
    print(f"\n{args.task} {args.variant} at {args.fraction} ({task.metric}; validation, full split)")
    print("| start | plain | repaired |")
    print("|---:|---:|---:|")
    for r in rows:
        marks = ["(plain choice)"] * (r["start"] == choices["plain_valid"])
        marks += ["(repaired choice)"] * (r["start"] == choices["repaired_valid"])
        print(f"| {r['start']} | {r['plain_valid']:.2f} | {r['repaired_valid']:.2f} {' '.join(marks)} |")
    if args.out:
        args.out.write_text(json.dumps({**summary, "rows": rows}, indent=1))


def _best(rows: list[dict], key: str, higher_is_better: bool) -> int:
    """The start a search on ``key`` chooses, ranked as the workflow ranks (a non-finite score never wins; ties to
    the lower start)."""
    sign = -1 if higher_is_better else 1

    def rank(row: dict) -> tuple:
        finite = math.isfinite(row[key])
        return (not finite, sign * row[key] if finite else 0.0, row["start"])

    return min(rows, key=rank)["start"]


if __name__ == "__main__":
    main()
