#!/usr/bin/env python
"""Ablation of recovery at one fraction: the paper's protocol, the exact-budget FF deletion control, each
repair option, and distillation, before and after the same fine-tuning budget, with the cost of each stage.

Runs on a finished (or partly finished) workflow: it reads a task's prepared model, data and feature cache
from ``results/{task}`` and the window each search chose (running the search into ``--work`` when the
workflow has not), then for every arm builds the compressed model through the pipeline's own functions
(``build_compressed`` and ``run_finetune``, so repair, budgets and distillation are exactly what the workflow
does), measures validation and test before fine-tuning, fine-tunes with the arm's recipe and measures again.

    python benchmarks/recovery_ablation.py --task lm --arms paper,ffdrop,drop,repair --steps 40 --lr 2e-4

Arms (``--arms``, comma-separated names from ARMS below; ``--list`` prints them; ``NAME@STEPS``, e.g.
``repair+fold@30``, is arm NAME with that many repair steps; ``NAME@STEPS:LR`` also sets the repair's learning
rate). Every arm of one run uses the
same fine-tuning budget (``--steps``, the task's batch) and learning rate; ``+kd`` arms add distillation.
Prints the host's float32 matmul speed first: compare times only within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from _config import task_config
from _host import announce

from ffmerge.experiments import fraction_label
from ffmerge.tasks import get_task
from ffmerge.workflow import pipeline

ROOT = Path(__file__).resolve().parent.parent

REPAIR = {"enabled": True, "steps": 100, "lr": 3e-3}
ARMS: dict[str, dict[str, Any]] = {
    "paper": {"variant": "permute"},
    "vanilla": {"variant": "vanilla"},
    "ffdrop": {"variant": "ffdrop"},
    "drop": {"variant": "drop"},
    "lstsq": {"variant": "permute", "repair": {"enabled": True, "lstsq": True, "steps": 0}},
    "repair": {"variant": "permute", "repair": REPAIR},
    "repair300": {"variant": "permute", "repair": {**REPAIR, "steps": 300}},
    "repair+lstsq": {"variant": "permute", "repair": {**REPAIR, "lstsq": True}},
    "repair+fold": {"variant": "permute", "repair": {**REPAIR, "fold": True}},
    "repair+merged": {"variant": "permute", "repair": {**REPAIR, "inputs": "merged"}},
    "vanilla+repair": {"variant": "vanilla", "repair": REPAIR},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--results", type=Path, help="the workflow's results folder (default: config's results_dir)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ffmerge_recovery_ablation"))
    p.add_argument("--fraction", default="1/3")
    p.add_argument("--arms", default="paper,ffdrop,drop,repair")
    p.add_argument("--kd", default="", help="arms to run again with distillation (comma-separated)")
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: the config's)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the config's)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default: the config's)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--list", action="store_true")
    p.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        help="instead of running: read --out files of earlier runs (one per task) and print one table",
    )
    return p.parse_args()


def selection(cfg: dict, results: Path, work: Path, method: str, fraction: str) -> Path:
    """The workflow's window choice for ``method``, or one made now with the workflow's own search."""
    label = fraction_label(fraction)
    done = results / "selection" / method / f"{label}.json"
    if done.is_file():
        return done
    out = work / "selection" / method / f"{label}.json"
    if not out.is_file():
        alignments = results / "alignment" / "permute.safetensors"
        pipeline.search(
            cfg,
            results / "model" / "base",
            results / "data",
            results / "features" if method not in ("drop", "ffdrop") else None,
            method,
            label,
            out,
            "cpu",
            alignments=alignments if method == "permute" and alignments.is_file() else None,
        )
    return out


def arm_named(name: str) -> dict[str, Any]:
    """An arm of ARMS by name; ``NAME@STEPS`` overrides its repair steps, ``NAME@STEPS:LR`` also the repair's
    learning rate (a repaired arm only)."""
    base, _, override = name.partition("@")
    arm = copy.deepcopy(ARMS[base])
    if override:
        if "repair" not in arm:
            raise SystemExit(f"arm {base} has no repair to give {override} steps")
        steps, _, lr = override.partition(":")
        arm["repair"]["steps"] = int(steps)
        if lr:
            arm["repair"]["lr"] = float(lr)
    return arm


def run_arm(name: str, arm: dict, cfg: dict, results: Path, work: Path, args: argparse.Namespace) -> dict:
    arm_cfg = copy.deepcopy(cfg)
    arm_cfg["repair"] = {"enabled": False, **arm.get("repair", {})}  # the arm's options over the schema's defaults
    ft = arm_cfg["finetune"]
    ft.update({k: v for k, v in (("max_steps", args.steps), ("lr", args.lr)) if v is not None})
    ft["eval_every"] = args.eval_every or ft["max_steps"] or 1
    ft["checkpoint_every"] = max(ft["max_steps"], 1)
    ft["distill"] = {"weight": arm.get("kd", 0.0), "temperature": args.kd_temperature}
    method = arm["variant"].split("@")[0]
    sel = selection(cfg, results, work, method, args.fraction)
    folder = work / "models" / name
    timings = {}
    started = time.perf_counter()
    built = pipeline.build_compressed(
        arm_cfg,
        results / "model" / "base",
        results / "features" if method not in ("drop", "ffdrop") else None,
        sel,
        arm["variant"],
        "best",
        folder / "compressed",
        data_dir=results / "data",
        eval_json=folder / "pre.json",
    )
    timings["compress_and_test_s"] = time.perf_counter() - started
    started = time.perf_counter()
    record = pipeline.run_finetune(
        arm_cfg,
        folder / "compressed",
        results / "data",
        folder / "work",
        folder / "finetuned",
        "cpu",
        eval_json=folder / "post.json",
        teacher_dir=results / "model" / "base",
    )
    timings["finetune_and_test_s"] = time.perf_counter() - started
    post = json.loads((folder / "post.json").read_text())
    repair = built.get("repair") or {}
    stacks = repair.get("stacks", {})
    errors = {s: {k: round(v, 4) for k, v in st.items() if k.startswith("error")} for s, st in stacks.items()}
    return {
        "arm": name,
        "variant": arm["variant"],
        "windows": built["windows"],
        "parameters": post["size"]["parameters"],
        "repair_error": errors,
        "valid_pre": record["finetune"]["curve"][0]["valid"],
        "test_pre": json.loads((folder / "pre.json").read_text())["test"],
        "valid_post_best": record["finetune"]["best_valid"],
        "test_post": post["test"],
        "budget": record["finetune"]["budget"],
        "distill": ft["distill"],
        "lr": ft["lr"],
        "curve": record["finetune"]["curve"],
        **{k: round(v, 1) for k, v in timings.items()},
    }


def summarize(paths: list[Path]) -> None:
    """One Markdown table over the tasks' runs (the README's ablation table)."""
    print(
        "| task | arm | parameters | local error | valid before | test before | test after | build+test s | ft+test s |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for path in paths:
        run = json.loads(path.read_text())
        for r in run["rows"]:
            err = "; ".join(
                f"{s} {e['error_merged']:.2f}->{e['error_repaired']:.2f}" for s, e in r["repair_error"].items()
            )
            print(
                f"| {run['task']} | {r['arm']} | {r['parameters']:,} | {err} | {r['valid_pre']:.2f} "
                f"| {r['test_pre']:.2f} | {r['test_post']:.2f} | {r['compress_and_test_s']} "
                f"| {r['finetune_and_test_s']} |"
            )
        print(f"(host {run['gflops_1_thread']:.0f} GFLOPS, 1 thread; budget {run['rows'][0]['budget']})")


def main() -> None:
    args = parse_args()
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in ARMS.items()))
        return
    if args.summarize:
        summarize(args.summarize)
        return
    gflops = announce(args.threads)
    cfg, results_dir = task_config(args.config, args.task)
    results = (args.results or results_dir) / args.task
    work = args.work / args.task
    arms = {n: arm_named(n) for n in args.arms.split(",") if n}
    arms |= {f"{n}+kd": {**arm_named(n), "kd": args.kd_weight} for n in args.kd.split(",") if n}
    rows = []
    for name, arm in arms.items():
        row = run_arm(name, arm, cfg, results, work, args)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    if args.out:
        run = {"task": args.task, "fraction": args.fraction, "metric": get_task(cfg).metric}
        args.out.write_text(json.dumps({**run, "gflops_1_thread": gflops, "rows": rows}, indent=1))
    metric = get_task(cfg).metric
    print(f"\n{args.task} at {args.fraction}, {metric}; budget {rows[0]['budget']}, lr {rows[0]['lr']}")
    print("| arm | params | local error | valid before | test before | test after | build+test s | finetune+test s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = "; ".join(f"{s} {e['error_merged']:.3f}->{e['error_repaired']:.3f}" for s, e in r["repair_error"].items())
        print(
            f"| {r['arm']} | {r['parameters']:,} | {err} | {r['valid_pre']:.2f} | {r['test_pre']:.2f} | "
            f"{r['test_post']:.2f} | {r['compress_and_test_s']} | {r['finetune_and_test_s']} |"
        )


if __name__ == "__main__":
    main()
