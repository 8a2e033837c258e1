#!/usr/bin/env python
"""Proxy window search vs the exhaustive one: does the proxy find the exhaustive choice, and what does it cost?

Reads a finished default run's results folder (model, data, feature cache, alignments; nothing is written
there) and, for every task, method and fraction of its grid, runs in this process, back to back and on the same
loaded model:

- the exhaustive search as the run's config has it (``search.mode: in_process``, with the task's screening),
  through ``pipeline.search_model``, the function the workflow's select_window job calls;
- the proxy search (``mode: proxy``, ``--keep`` windows evaluated), through the same function.

Both times leave out what both jobs pay alike (process start, model load: a few seconds per job). Prints per
search: the Spearman rank correlation between every start's proxy score and its exhaustive score, whether the
exhaustive choice is the proxy's top 1 and within its top 3, the window the proxy search chose and its exact
validation score against the exhaustive choice's, and the cost (seconds of the proxy scores plus the exact
evaluations against the exhaustive search's, and their ratio).

Screening: a search with ``screen_share`` < 1 (the default run's lm) scored every start on that share of the
validation batches and only ``screen_keep`` on all of it, and chose among those. Its ranking of all starts is
the screening share's, so that is what the proxy is compared with (recorded here from the search's own scorer
calls); the exhaustive choice is its choice. The exhaustive scores are checked against the run's selection files.

Then, for the merge searches, the token subsample: Spearman between the proxy on ``PROXY_TOKENS`` positions and
on every cached position, and whether both put the same starts in their top 3.

    nice -n 19 python benchmarks/proxy_search.py --results results --config config.yaml > proxy-bench.txt
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _host import matmul_gflops
from scipy.stats import spearmanr
from snakemake.utils import validate

from ffmerge import proxy
from ffmerge.checkpoint import load_model
from ffmerge.experiments import fraction_label, window_starts
from ffmerge.features import FeatureStore
from ffmerge.tasks import get_task
from ffmerge.workflow import pipeline

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results", help="a finished default run's results")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml", help="the config that run used")
    p.add_argument("--tasks", default="", help="comma-separated (default: every task of the config)")
    p.add_argument("--methods", default="", help="comma-separated (default: the grid's searches)")
    p.add_argument("--fractions", default="", help="comma-separated (default: the grid's)")
    p.add_argument("--keep", type=int, default=3, help="search.proxy_keep")
    p.add_argument("--threads", type=int, default=1, help="torch threads (select_window jobs get 1)")
    p.add_argument("--no-subsample", action="store_true", help="skip the token-subsample check")
    p.add_argument("--out", type=Path, help="also write every row as JSON here")
    return p.parse_args()


class RecordingScorer:
    """The search's scorer, remembering the sums of every candidate's pass over the first batches: the screening
    share's score of every start (candidate passes run in the order of the starts; the base model's recording
    passes are told apart by identity)."""

    def __init__(self, scorer: Any, base: torch.nn.Module):
        self.scorer, self.base, self.first_passes = scorer, base, []
        self.n_batches = scorer.n_batches

    def run(self, model: torch.nn.Module, batches: range | None = None) -> dict[str, float]:
        sums = self.scorer.run(model, batches)
        if model is not self.base and (batches is None or batches.start == 0):
            self.first_passes.append(sums)
        return sums

    def metric(self, sums: dict[str, float]) -> float:
        return self.scorer.metric(sums)


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return math.nan
    value = spearmanr(a, b).statistic
    return float(value) if value == value else math.nan  # constant input: undefined


def one_search(
    task: Any,
    cfg: dict,
    base: torch.nn.Module,
    results: Path,
    store: FeatureStore,
    solved: Any,
    method: str,
    fraction: str,
    keep: int,
    scratch: Path,
) -> dict:
    """One (method, fraction): the exhaustive search, then the proxy search, timed; ``scratch`` takes the
    selection records (never the results folder)."""
    data = results / "data"
    search_cfg = cfg["search"]
    starts = window_starts(method, pipeline.stack_layers(base), fraction)
    sign = -1 if task.higher_is_better else 1
    scorer, reuse = pipeline.selection_scorer(task, data, torch.device("cpu"), search_cfg)
    recording = RecordingScorer(scorer, base)
    started = time.perf_counter()
    rows, _ = pipeline.search_model(
        task, base, recording, store, method, fraction, search_cfg, reuse=reuse, solved=solved, log_fn=lambda m: None
    )
    exhaustive_s = time.perf_counter() - started
    exhaustive = pipeline._write_selection(rows, task, scratch / "exhaustive.json", {}, {})
    ranked_by = [sign * scorer.metric(s) for s in recording.first_passes]  # screening share (all of it if none)
    assert len(ranked_by) == len(starts), (len(ranked_by), len(starts))

    scorer, reuse = pipeline.selection_scorer(task, data, torch.device("cpu"), search_cfg)
    proxy_cfg = {**search_cfg, "mode": "proxy", "proxy_keep": keep}
    started = time.perf_counter()
    rows, record = pipeline.search_model(
        task, base, scorer, store, method, fraction, proxy_cfg, reuse=reuse, solved=solved, log_fn=lambda m: None
    )
    proxy_total_s = time.perf_counter() - started
    chosen = pipeline._write_selection(rows, task, scratch / "proxy.json", {}, record)
    proxies = [record["proxy_scores"][str(s)] for s in starts]
    order = proxy.rank(dict(zip(starts, proxies, strict=True)))

    # the run's own selection file: the exhaustive search here must repeat it
    done = json.loads((results / "selection" / method / f"{fraction_label(fraction)}.json").read_text())
    repeat = max(
        (
            abs(exhaustive["scores"][s] / v - 1) if v else abs(exhaustive["scores"][s])
            for s, v in done["scores"].items()
        ),
        default=0.0,
    )
    best = exhaustive["best_start"]
    return {
        "method": method,
        "fraction": fraction,
        "starts": len(starts),
        "screened": bool(exhaustive["screened"]),
        "spearman": spearman(proxies, ranked_by),
        "top1": order[0] == best,
        "top3": best in order[:3],
        "exhaustive_best": best,
        "run_best": done["best_start"],
        "repeat_rel_diff": repeat,
        "proxy_best": chosen["best_start"],
        "exhaustive_valid": exhaustive["best_valid"],
        "proxy_valid": chosen["best_valid"],
        "proxy_top3": order[:3],
        "proxy_s": record["proxy"]["seconds"],
        "proxy_total_s": proxy_total_s,
        "exhaustive_s": exhaustive_s,
        "ratio": proxy_total_s / exhaustive_s,
        "metric": task.metric,
    }


def subsample_check(base: torch.nn.Module, store: FeatureStore, solved: Any, method: str, fraction: str) -> dict:
    starts = window_starts(method, pipeline.stack_layers(base), fraction)

    def build(model: torch.nn.Module, start: int, plan: dict | None) -> dict:
        return pipeline.compress(model, method, fraction, start, store, plan, solved)

    runs = {}
    for tokens in (proxy.PROXY_TOKENS, 0):
        started = time.perf_counter()
        runs[tokens] = (
            proxy.proxy_scores(base, store, method, fraction, starts, build, tokens=tokens),
            time.perf_counter() - started,
        )
    (sub, sub_s), (full, full_s) = runs[proxy.PROXY_TOKENS], runs[0]
    return {
        "method": method,
        "fraction": fraction,
        "starts": len(starts),
        "cached": dict(store.n_tokens),
        "spearman": spearman([sub[s] for s in starts], [full[s] for s in starts]),
        "same_top3": set(proxy.rank(sub)[:3]) == set(proxy.rank(full)[:3]),
        "same_top1": proxy.rank(sub)[0] == proxy.rank(full)[0],
        "subsample_s": sub_s,
        "all_s": full_s,
    }


def fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def main() -> None:
    args = parse_args()
    gflops = matmul_gflops()
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    names = args.tasks.split(",") if args.tasks else list(config["tasks"])
    print(
        f"host: 2048x2048 float32 matmul {gflops:.1f} GFLOPS on 1 thread; searches on {args.threads} thread(s); "
        f"proxy_keep {args.keep}; proxy on {proxy.PROXY_TOKENS} cached positions",
        flush=True,
    )
    rows, subsamples = [], []
    scratch = Path(tempfile.mkdtemp(prefix="proxy_search_"))
    started = time.perf_counter()
    for name in names:
        cfg = config["tasks"][name]
        task = get_task(cfg)
        results = args.results / name
        base = load_model(results / "model" / "base", auto_class=task.auto_class)
        store = FeatureStore.open(results / "features")
        solved = pipeline._solved(results / "alignment" / "permute.safetensors", store)
        exp = cfg["experiments"]
        searches = [m for m in ("permute", "vanilla", "drop", "ffdrop") if m in exp["methods"]]
        searches = [m for m in searches if not args.methods or m in args.methods.split(",")]
        fractions = [f for f in exp["fractions"] if not args.fractions or f in args.fractions.split(",")]
        for fraction in fractions:
            for method in searches:
                row = {"task": name} | one_search(
                    task, cfg, base, results, store, solved, method, fraction, args.keep, scratch
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        if not args.no_subsample:
            for fraction in fractions:
                for method in ("permute", "vanilla"):
                    if method in searches:
                        sub = {"task": name} | subsample_check(base, store, solved, method, fraction)
                        subsamples.append(sub)
                        print(json.dumps(sub), flush=True)
    wall = time.perf_counter() - started

    print(f"\nproxy search (keep {args.keep}) vs exhaustive in_process search; lower proxy = better window")
    print(
        "| task | method | fraction | starts | Spearman | top-1 | top-3 | exhaustive choice (valid) | proxy choice "
        "(valid) | proxy s | + exact s | exhaustive s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        screened = " (screening share)" if r["screened"] else ""
        print(
            f"| {r['task']} | {r['method']} | {r['fraction']} | {r['starts']} | {fmt(r['spearman'])}{screened} | "
            f"{'yes' if r['top1'] else 'no'} | {'yes' if r['top3'] else 'no'} | {r['exhaustive_best']} "
            f"({r['exhaustive_valid']:.4g} {r['metric']}) | {r['proxy_best']} ({r['proxy_valid']:.4g}) | "
            f"{r['proxy_s']:.1f} | {r['proxy_total_s'] - r['proxy_s']:.1f} | {r['exhaustive_s']:.1f} | "
            f"{r['ratio']:.2f} |"
        )
    for name in names:
        mine = [r for r in rows if r["task"] == name]
        proxy_s, exhaustive_s = sum(r["proxy_total_s"] for r in mine), sum(r["exhaustive_s"] for r in mine)
        print(
            f"{name}: top-3 {sum(r['top3'] for r in mine)}/{len(mine)}, "
            f"top-1 {sum(r['top1'] for r in mine)}/{len(mine)}, "
            f"same choice {sum(r['proxy_best'] == r['exhaustive_best'] for r in mine)}/{len(mine)}; "
            f"{proxy_s:.0f} s vs {exhaustive_s:.0f} s exhaustive (ratio {proxy_s / exhaustive_s:.2f}); "
            f"exhaustive choice = run's in {sum(r['exhaustive_best'] == r['run_best'] for r in mine)}/{len(mine)}, "
            f"largest relative score difference to the run's {max(r['repeat_rel_diff'] for r in mine):.1e}"
        )
    met = [r for r in rows if r["top3"] and r["ratio"] <= 0.1]
    print(f"target (top 3 and <= 0.1x the exhaustive cost) met on {len(met)}/{len(rows)} searches")
    if subsamples:
        print(f"\nmerge proxy on {proxy.PROXY_TOKENS} evenly spaced cached positions vs all of them")
        print("| task | method | fraction | starts | cached | Spearman | same top-1 | same top-3 | s | s (all) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in subsamples:
            print(
                f"| {r['task']} | {r['method']} | {r['fraction']} | {r['starts']} | {r['cached']} | "
                f"{fmt(r['spearman'])} | "
                f"{'yes' if r['same_top1'] else 'no'} | {'yes' if r['same_top3'] else 'no'} | {r['subsample_s']:.1f} | "
                f"{r['all_s']:.1f} |"
            )
    print(f"\nbenchmark wall {wall:.0f} s; host after: {matmul_gflops():.1f} GFLOPS on 1 thread")
    if args.out:
        args.out.write_text(json.dumps({"gflops_1_thread": gflops, "rows": rows, "subsample": subsamples}, indent=1))


if __name__ == "__main__":
    main()
