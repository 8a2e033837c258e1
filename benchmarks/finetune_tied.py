#!/usr/bin/env python
"""Fine-tuning step throughput of a merged, tied model vs the same merged weights untied.

The merged model shares one FF block between the window's layers (one set of parameters, gradients summed
over its uses). The untied control holds a private copy of that block in every layer: the same function,
more parameters. Both run ``ffmerge.finetune.finetune`` on the real SmolLM2-135M with batches of 2 x 256
tokens and no evaluation or checkpoint inside the timed steps. The two models take turns (untied, tied, tied,
untied, ...) so that a machine that slows down or speeds up during the run does not favour either; each
model's figure is the median of its runs.
Check: both compute the same loss on the first batch (same function before training).

    python benchmarks/finetune_tied.py --work /tmp/bench_finetune
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _assets import WIKI, smollm2_dir
from transformers import AutoTokenizer

from ffmerge.adapters import get_adapter, set_submodule
from ffmerge.checkpoint import load_model
from ffmerge.data.text import load_split, prepare_text_splits
from ffmerge.features import FeatureStore, cache_features
from ffmerge.finetune import FinetuneConfig, causal_lm_loss, finetune, lm_batches
from ffmerge.tasks.causal_lm import CausalLMTask
from ffmerge.workflow import pipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("results/bench/finetune_tied"))
    p.add_argument("--model-dir", type=Path, help="prepared SmolLM2 folder (default <work>/model)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="runs per model, in turns")
    p.add_argument("--start", type=int, default=17, help="merged window start (1/3 of 30 layers: 11 layers)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    return p.parse_args()


def untie(model: torch.nn.Module) -> torch.nn.Module:
    """A copy in which every layer owns its FF modules (same values, no sharing)."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    for spec in adapter.stacks:
        for layer in adapter.layers(model, spec.name):
            for path in spec.ff_paths:
                set_submodule(layer, path, copy.deepcopy(layer.get_submodule(path)))
    return model


def steps_per_second(model: torch.nn.Module, get_batch, args: argparse.Namespace) -> float:
    times: list[float] = []

    def timed_batch(step: int):
        times.append(time.perf_counter())
        return get_batch(step)

    config = FinetuneConfig(
        max_steps=args.steps + 2, eval_every=10**6, checkpoint_every=10**6, batch_size=args.batch_size, device="cpu"
    )
    with tempfile.TemporaryDirectory() as work:
        finetune(
            model, loss_fn=causal_lm_loss, get_batch=timed_batch, evaluate=lambda m: 0.0, config=config, work_dir=work
        )
    # batch fetch i+1 marks the end of step i; skip the two warm-up steps
    return (len(times) - 3) / (times[-1] - times[2])


def main() -> None:
    args = parse_args()
    model_dir = smollm2_dir(args.model_dir, args.work)
    data_dir = args.work / "data"
    if not (data_dir / "splits.json").is_file():
        prepare_text_splits(
            WIKI, AutoTokenizer.from_pretrained(model_dir), data_dir, {"calib": 10240, "train": 100_000}, 0
        )
    features_dir = args.work / "features"
    base = load_model(model_dir, auto_class="AutoModelForCausalLM")
    if (features_dir / "manifest.json").is_file():
        features = FeatureStore.open(features_dir)
    else:
        task = CausalLMTask({"features": {"seq_len": 512, "batch_size": 8}})
        features = cache_features(
            base, task.calibration_batches(data_dir), features_dir, n_tokens=10240, kinds=("pre",)
        )
    tied = copy.deepcopy(base)
    pipeline.compress(tied, "permute", "1/3", args.start, features)
    untied = untie(tied)
    get_batch = lm_batches(load_split(data_dir, "train"), seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
    with torch.no_grad():
        same = causal_lm_loss(tied, get_batch(0)).item() == causal_lm_loss(untied, get_batch(0)).item()
    models = {"untied": untied, "tied": tied}
    runs: dict[str, list[float]] = {name: [] for name in models}
    for turn in range(args.rounds):
        for name in ("untied", "tied") if turn % 2 == 0 else ("tied", "untied"):
            runs[name].append(steps_per_second(models[name], get_batch, args))
    rates = {name: statistics.median(r) for name, r in runs.items()}
    print(
        f"\nSmolLM2-135M, permute 1/3 window at {args.start}, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.rounds} runs of {args.steps} timed steps per model, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<8}{'parameters':>13}{'steps/s':>9}  runs")
    for name, m in models.items():
        print(f"{name:<8}{m.num_parameters():>13,}{rates[name]:>9.3f}  {', '.join(f'{r:.3f}' for r in runs[name])}")
    print(f"ratio (tied / untied throughput): {rates['tied'] / rates['untied']:.3f}")
    print(f"same first-batch loss before training: {same}")
    (args.work / "finetune_tied.json").write_text(
        json.dumps({"rates": rates, "runs": runs, "same_loss": same}, indent=2)
    )


if __name__ == "__main__":
    main()
