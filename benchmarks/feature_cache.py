#!/usr/bin/env python
"""Feature caching vs a bare forward pass over the same tokens, and its peak memory at GPT-2-Large shape.

1. Throughput on the real SmolLM2-135M: the workflow's calibration batches (rows of 512 tokens, batch 8)
   through ``model(**inputs)`` (a bare forward of the task model, head included) vs ``cache_features``
   recording all three kinds (pre, ff_out, attn_out) in float16, as the ``cache_features`` rule does.
   Check: on a smaller budget, the trunk-only forward the cache uses writes byte-identical files to a
   cache made with the full model's forward.
2. Peak memory: a GPT-2-Large-shaped model (36 layers, d 1280, FF 5120; random weights from a config) caching
   10,240 tokens, in a fresh process, against the ``cache_features`` rule's ``mem_mb`` claim.

    python benchmarks/feature_cache.py --work /tmp/bench_features
"""

from __future__ import annotations

import argparse
import filecmp
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _assets import WIKI, smollm2_dir
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("results/bench/feature_cache"))
    p.add_argument("--model-dir", type=Path, help="prepared SmolLM2 folder (default <work>/model)")
    p.add_argument("--tokens", type=int, default=10240)
    p.add_argument("--check-tokens", type=int, default=1024)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def _batches(data_dir: Path, tokens: int):
    from ffmerge.tasks.causal_lm import CausalLMTask

    task = CausalLMTask({"features": {"seq_len": 512, "batch_size": 8}})
    return list(task.calibration_batches(data_dir))[: -(-tokens // (512 * 8))]


def throughput(args: argparse.Namespace) -> dict:
    from ffmerge.checkpoint import load_model
    from ffmerge.data.text import prepare_text_splits
    from ffmerge.features import cache_features

    model_dir = smollm2_dir(args.model_dir, args.work)
    data_dir = args.work / f"data_{args.tokens}"
    if not (data_dir / "splits.json").is_file():
        prepare_text_splits(WIKI, AutoTokenizer.from_pretrained(model_dir), data_dir, {"calib": args.tokens}, 0)
    model = load_model(model_dir, auto_class="AutoModelForCausalLM").eval()
    batches = _batches(data_dir, args.tokens)
    n = sum(int(b["attention_mask"].sum()) for b in batches)

    with torch.inference_mode():  # warm-up, so neither side pays for first-call allocations
        model(input_ids=batches[0]["input_ids"][:1], use_cache=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    bare = time.perf_counter() - t0

    t0 = time.perf_counter()
    cache_features(model, batches, args.work / "cache", n_tokens=args.tokens, progress=False)
    cached = time.perf_counter() - t0

    small = _batches(data_dir, args.check_tokens)
    cache_features(model, small, args.work / "check_trunk", n_tokens=args.check_tokens, progress=False)
    cache_features(
        model,
        small,
        args.work / "check_full",
        n_tokens=args.check_tokens,
        progress=False,
        forward=lambda m, inputs: m(**inputs, use_cache=False),
    )
    files = sorted(p.relative_to(args.work / "check_trunk") for p in (args.work / "check_trunk").rglob("*.safetensors"))
    identical = all(
        filecmp.cmp(args.work / "check_trunk" / f, args.work / "check_full" / f, shallow=False) for f in files
    )
    return {"tokens": n, "bare_s": bare, "cache_s": cached, "identical_files": identical, "n_files": len(files)}


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process so that ru_maxrss is this cache's peak alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ffmerge.features import cache_features

    torch.manual_seed(0)
    config = GPT2Config(n_layer=36, n_embd=1280, n_head=20, n_inner=5120, n_positions=1024)
    model = GPT2LMHeadModel(config).eval()
    model_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(-(-args.tokens // (512 * 8))):
        ids = torch.randint(0, config.vocab_size, (8, 512), generator=g)
        batches.append({"input_ids": ids, "token_masks": {"decoder": torch.ones_like(ids, dtype=torch.bool)}})
    t0 = time.perf_counter()
    cache_features(model, batches, args.work / "gpt2_large_cache", n_tokens=args.tokens, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "params": model.num_parameters(),
                "model_rss_mb": model_rss,
                "peak_rss_mb": peak,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def _rule_mem_mb() -> int:
    text = (REPO / "rules" / "features.smk").read_text()
    return int(text.split("mem_mb=")[1].split(",")[0])


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.memory_child:
        memory_child(args)
        return
    t = throughput(args)
    print(f"\nSmolLM2-135M, {t['tokens']} calibration tokens, {torch.get_num_threads()} threads")
    print(f"{'':<22}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'bare forward':<22}{t['bare_s']:>9.1f}{t['tokens'] / t['bare_s']:>10.1f}")
    print(f"{'cache_features':<22}{t['cache_s']:>9.1f}{t['tokens'] / t['cache_s']:>10.1f}")
    print(f"ratio (cache / bare throughput): {t['bare_s'] / t['cache_s']:.3f}")
    print(f"trunk-only cache byte-identical to full-forward cache ({t['n_files']} files): {t['identical_files']}")
    result = {"throughput": t}
    if not args.skip_memory:
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", "--work", str(args.work), "--tokens", str(args.tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(child.stdout.strip().splitlines()[-1])
        budget = _rule_mem_mb()
        print(
            f"\nGPT-2-Large shape ({m['params'] / 1e6:.0f}M params), {args.tokens} tokens: peak RSS "
            f"{m['peak_rss_mb']:.0f} MB (model alone {m['model_rss_mb']:.0f} MB) vs rule budget {budget} MB: "
            f"{'within' if m['peak_rss_mb'] <= budget else 'OVER'}; {m['seconds']:.0f} s"
        )
        result["memory"] = m | {"budget_mb": budget}
    (args.work / "feature_cache.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
