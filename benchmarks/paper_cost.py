#!/usr/bin/env python
"""What a run of configs/paper.yaml costs per stage: jobs, GPU hours (estimated) and disk, per task.

Nothing is downloaded: the three models are built on PyTorch's meta device from their published architecture
hyper-parameters (gpt2-large, google/vit-base-patch16-224, Helsinki-NLP/opus-mt-zh-en), so parameter counts and
sizes are exact. Job counts come from ``ffmerge.experiments`` (the workflow's own grid functions). GPU time is an
ESTIMATE, not a measurement: floating-point operations (training 3x the forward pass, forward 2 FLOP per
parameter and token plus attention, 2 n_layer n_ctx d per token) divided by a sustained throughput, ``--tflops``
(default 100 TFLOP/s: about a third of an A100's dense fp16/bf16 peak). Replace it with a measured figure
(``benchmarks/gpu_check.py`` prints fine-tuning tokens/s of a GPT-2-small-sized model on the lent GPU: tokens/s x
6 x its 124M parameters is the sustained FLOP/s). Job start, model loading, data loading and beam-search
inefficiency are left out, so real times are longer, most for OPUS-MT's BLEU evaluations.

    python benchmarks/paper_cost.py [--tflops 100] [--mt-tokens 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from snakemake.utils import validate
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel, ViTConfig, ViTForImageClassification

from ffmerge.adapters import get_adapter
from ffmerge.experiments import compressed_models, removed_count, window_starts
from ffmerge.size import size_report

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "paper.yaml")
    p.add_argument("--tflops", type=float, default=100.0, help="sustained training/inference TFLOP/s of one GPU")
    p.add_argument("--mt-tokens", type=int, default=16, help="OPUS-MT: assumed subword tokens per sentence and side")
    p.add_argument("--mt-beams", type=int, default=6, help="OPUS-MT: beams of its generation config")
    return p.parse_args()


def build(model_id: str) -> torch.nn.Module:
    """The paper's models on the meta device (no weights), from their published configs."""
    with torch.device("meta"):
        if model_id == "gpt2-large":
            return GPT2LMHeadModel(GPT2Config(n_layer=36, n_embd=1280, n_head=20, n_positions=1024))
        if model_id == "google/vit-base-patch16-224":
            return ViTForImageClassification(
                ViTConfig(
                    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    num_labels=1000,
                )
            )  # fmt: skip
        if model_id == "Helsinki-NLP/opus-mt-zh-en":
            config = MarianConfig(
                vocab_size=65001, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                pad_token_id=65000, decoder_start_token_id=65000, share_encoder_decoder_embeddings=True,
            )  # fmt: skip
            return MarianMTModel(config)
    raise ValueError(f"no architecture on file for {model_id}")


def ff_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of one FF block per stack (every layer of a stack has the same)."""
    adapter = get_adapter(model)
    return {
        s.name: sum(p.numel() for m in adapter.ff_modules(model, s.name, 0).values() for p in m.parameters())
        for s in adapter.stacks
    }


def main() -> None:
    args = parse_args()
    config = yaml.safe_load(args.config.read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    flops_per_s = args.tflops * 1e12
    print(f"{args.config.name}; GPU time ESTIMATED at a sustained {args.tflops:g} TFLOP/s per GPU (see --help)\n")
    print("| task | GPU stage | jobs | GPU h (est.) | what |")
    print("|---|---|---|---|---|")
    totals = {"jobs": 0, "gpu_h": 0.0}
    disk_rows = []
    for name, task in config["tasks"].items():
        model = build(task["model"]["id"])
        adapter = get_adapter(model)
        layers = {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}
        size = size_report(model)  # the tables' own accounting (shared tensors once), on the meta device
        n_params = size.parameters
        embeddings = sum(p.numel() for n, p in model.named_parameters() if "embed" in n or "wte" in n or "wpe" in n)
        compute = n_params - embeddings  # parameters a token's forward multiplies by (the head counted below)
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        exp, ft = task["experiments"], task["finetune"]
        if task["type"] == "causal_lm":
            head = d * model.config.vocab_size
            ctx = ft["seq_len"]
            fwd_token = 2 * (compute + head) + 2 * sum(layers.values()) * ctx * d
            train_tokens = ft["max_steps"] * ft["batch_size"] * ctx
            ev = task["evaluation"]
            valid_tokens = task["splits"]["valid"] * ev["window"] / ev["stride"]  # overlapping windows
            valid_flop = valid_tokens * fwd_token
            test_flop = task["splits"]["test"] * ev["window"] / ev["stride"] * fwd_token
        elif task["type"] == "image_classification":
            patches = (task["image_size"] // model.config.patch_size) ** 2 + 1
            fwd_token = 2 * compute + 2 * sum(layers.values()) * patches * d
            train_tokens = ft["max_steps"] * ft["batch_size"] * patches
            valid_flop = task["splits"]["valid"] * patches * fwd_token
            test_flop = task["splits"]["test"] * patches * fwd_token
        else:  # translation: encoder over the source, decoder (with its head) over the target, beams when decoding
            head = d * model.config.vocab_size
            half = compute / 2  # encoder and decoder stacks of the same size, roughly
            fwd_token = 2 * (compute + head)
            train_tokens = ft["max_steps"] * ft["batch_size"] * args.mt_tokens  # target tokens; source counted too
            decode = 2 * (half + head) * args.mt_beams + 2 * half  # per target token; the source once per sentence
            valid_flop = task["splits"]["valid"] * args.mt_tokens * decode
            test_flop = task["splits"]["test"] * args.mt_tokens * decode
        train_flop = 3 * fwd_token * train_tokens
        evals = ft["max_steps"] // ft["eval_every"] + 1
        starts = {
            (m, f): len(window_starts(m, layers, f))
            for m in ("permute", "vanilla", "drop", "ffdrop")
            if m in exp["methods"]
            for f in exp["fractions"]
        }
        n_candidates = sum(starts.values())
        models = compressed_models(exp)
        n_ft = len(models) + (1 if exp["finetune_baseline"] else 0)
        stages = [
            ("cache_features", 1, task["features"]["tokens"] * fwd_token, "one forward of the calibration"),
            ("candidate", n_candidates, n_candidates * valid_flop, "one validation pass per window start"),
            ("compress + evaluate", len(models) + 1, (len(models) + 1) * test_flop, "test pass per model"),
            (
                "finetune (all four rules)",
                n_ft,
                n_ft * (train_flop + evals * valid_flop + test_flop),
                f"{ft['max_steps']:,} steps of {train_tokens / ft['max_steps']:,.0f} tokens, {evals} validations",
            ),
            ("quantize_int8", 3 if exp["int8"] else 0, (3 if exp["int8"] else 0) * test_flop, "test pass (int8)"),
        ]
        for stage, jobs, flop, what in stages:
            hours = flop / flops_per_s / 3600
            totals["jobs"] += jobs
            totals["gpu_h"] += hours
            print(f"| {name} | {stage} | {jobs} | {hours:,.2f} | {what} |")
        model_bytes = size.bytes
        removed = {s: removed_count(n, exp["fractions"][0]) for s, n in layers.items()}
        merged_bytes = model_bytes - sum(removed[s] * p for s, p in ff_params(model).items()) * 4
        kept = len(exp["fractions"]) + (1 if exp["finetune_baseline"] else 0) + 1  # + the base model
        disk_rows.append(
            f"| {name} | {n_params / 1e6:,.1f}M | {model_bytes / GIB:.2f} | {merged_bytes / GIB:.2f} | "
            f"{4 * model_bytes / GIB:.1f} | {kept} x <= {model_bytes / GIB:.2f} = {kept * model_bytes / GIB:.1f} | "
            f"{len(models) + n_ft} |"
        )
    print(f"| all | | {totals['jobs']} | {totals['gpu_h']:,.1f} | |\n")
    print(
        "| task | parameters | model GiB (fp32) | 1/3 merged GiB | resume state GiB per running fine-tune | "
        "kept models GiB (keep_models: chosen) | models written (controls deleted once measured) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(disk_rows))


if __name__ == "__main__":
    main()
