#!/usr/bin/env python
"""Window search: one full validation pass per candidate (naive, the paper's procedure) vs ffmerge.search.

Both sides score every window start of one method and fraction on the same validation tokens with the
same merged candidates (both build each candidate from a copy of the loaded base model, and both align
its layers once). "reuse" replays the base model's hidden states below each window; "reuse+screen"
also scores all windows on the first share of the batches and finishes only the leaders.

Prints one row per mode: wall time, ratio to naive, the selected start, and the largest relative
difference between a fully scored candidate's score and the naive score of the same start.

    python benchmarks/window_search.py --work /tmp/bench_search          # SmolLM2-135M, 16,384 tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from _assets import WIKI, smollm2_dir
from transformers import AutoTokenizer

from ffmerge.checkpoint import load_model
from ffmerge.data.text import load_split, prepare_text_splits
from ffmerge.experiments import window_starts
from ffmerge.features import FeatureStore, cache_features
from ffmerge.metrics.perplexity import PerplexityScorer
from ffmerge.search import search_windows
from ffmerge.tasks.causal_lm import CausalLMTask
from ffmerge.workflow import pipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("results/bench/window_search"))
    p.add_argument("--model-dir", type=Path, help="prepared model folder (default <work>/model)")
    p.add_argument("--tokens", type=int, default=16384, help="validation tokens")
    p.add_argument("--calib", type=int, default=10240, help="calibration tokens for the alignment features")
    p.add_argument("--variant", default="permute")
    p.add_argument("--fraction", default="1/3", help="1/3 of SmolLM2's 30 layers: 11-layer windows, 20 starts")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--screen-share", type=float, default=0.25)
    p.add_argument("--screen-keep", type=int, default=3)
    p.add_argument("--modes", default="naive,reuse,reuse+screen")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p.parse_args()


def prepare(args: argparse.Namespace) -> tuple[Path, Path, FeatureStore]:
    model_dir = smollm2_dir(args.model_dir, args.work)
    data_dir = args.work / f"data_{args.calib}_{args.tokens}"
    if not (data_dir / "splits.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prepare_text_splits(WIKI, tokenizer, data_dir, {"calib": args.calib, "valid": args.tokens}, seed=0)
    features_dir = args.work / f"features_{args.calib}"
    if (features_dir / "manifest.json").is_file():
        features = FeatureStore.open(features_dir)
    else:
        task = CausalLMTask({"features": {"seq_len": 512, "batch_size": 8}})
        model = load_model(model_dir, auto_class="AutoModelForCausalLM")
        features = cache_features(
            model, task.calibration_batches(data_dir), features_dir, n_tokens=args.calib, kinds=("pre",)
        )
    return model_dir, data_dir, features


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model_dir, data_dir, features = prepare(args)
    base = load_model(model_dir, auto_class="AutoModelForCausalLM")
    scorer = PerplexityScorer(
        load_split(data_dir, "valid"), window=args.window, stride=args.stride, batch_size=args.batch_size
    )
    starts = window_starts(args.variant, pipeline.stack_layers(base), args.fraction)

    def compress(model, start, plan=None):
        return pipeline.compress(model, args.variant, args.fraction, start, features, plan)

    runs: dict[str, dict] = {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        if mode == "naive":
            scores = {}
            for start in starts:
                model = copy.deepcopy(base)
                compress(model, start)
                scores[start] = (scorer.metric(scorer.run(model)), True)
        else:
            share = args.screen_share if mode == "reuse+screen" else 1.0
            results = search_windows(
                base,
                scorer,
                compress,
                starts,
                higher_is_better=False,
                screen_share=share,
                screen_keep=args.screen_keep,
                log=lambda msg: None,
            )
            scores = {r.start: (r.metric(scorer), r.batches == scorer.n_batches) for r in results}
        wall = time.perf_counter() - t0
        full = {s: v for s, (v, finished) in scores.items() if finished}
        runs[mode] = {"wall_s": wall, "best": min(full, key=lambda s: (full[s], s)), "scores": scores}
        print(f"{mode}: {wall:.1f} s", flush=True)

    naive = runs.get("naive")
    print(
        f"\n{args.variant} {args.fraction}: {len(starts)} starts, {scorer.n_batches} batches of "
        f"{args.batch_size} x {args.window} tokens, {args.tokens} validation tokens, {args.threads} threads"
    )
    print(f"{'mode':<14}{'wall s':>9}{'ratio':>8}{'best':>6}{'finished':>10}{'max rel diff':>14}")
    for mode, run in runs.items():
        finished = [s for s, (_, done) in run["scores"].items() if done]
        ratio = run["wall_s"] / naive["wall_s"] if naive else math.nan
        diff = max(abs(run["scores"][s][0] / naive["scores"][s][0] - 1) for s in finished) if naive else math.nan
        print(f"{mode:<14}{run['wall_s']:>9.1f}{ratio:>8.3f}{run['best']:>6}{len(finished):>10}{diff:>14.2e}")
    if naive:
        same = all(run["best"] == naive["best"] for run in runs.values())
        print(f"selected window identical to naive in every mode: {same}")
    out = args.work / "window_search.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
