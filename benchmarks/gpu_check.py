#!/usr/bin/env python
"""GPU check: the paper's three model types through snakemake on CUDA, and fine-tuning throughput GPU vs CPU.

Run wherever a GPU is lent (a few minutes on one GPU):

    .venv/bin/python benchmarks/gpu_check.py --out gpu-check.json

1. **The paper-type run on the GPU.** ``configs/paper.yaml`` with the tiny random GPT-2 (Conv1D), ViT
   classifier and MarianMT models and the local data copies of ``tests/test_paper_types.py`` (the CI test's
   run), with ``device: cuda``: GPT-2 trains and is evaluated in bf16, ViT trains in fp16 (loss scaling) with
   DataLoader workers, Marian trains in bf16; LLM.int8() runs with bitsandbytes on the GPU. It checks that
   every model job recorded ``cuda``, the GPU's name and the precision asked for (result JSONs, Table 9) and
   that every task's Table 9 has finite metrics.
2. **Throughput.** Fine-tuning steps of a GPT-2-small-sized model (random weights, its first third of FF
   sublayers merged and tied as the pipeline does) through ``ffmerge.finetune.finetune``, tokens per second on
   the CPU (fp32, this host's threads) and on the GPU in fp32, bf16 and fp16, each the median of timed steps
   after warm-up steps; with the host's single-thread matmul GFLOPS beside the CPU figure.

``--device cpu`` runs the same checks on the CPU (expecting ``cpu`` records in fp32), to try the script
without a GPU; ``--skip-run`` / ``--skip-throughput`` do one part only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _host import matmul_gflops
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PRECISIONS = {"lm": ("bf16", "bf16"), "vision": ("fp16", "fp32"), "mt": ("bf16", "fp32")}
"""Per task of the paper-type run: (finetune.precision, evaluation and selection precision)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--skip-run", action="store_true", help="no paper-type snakemake run")
    p.add_argument("--skip-throughput", action="store_true", help="no fine-tuning throughput")
    p.add_argument("--steps", type=int, default=10, help="timed fine-tuning steps per setting")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", type=Path, help="run the paper-type pipeline here and keep it (default: a temp dir)")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------------------
# 1. The paper-type run
# ------------------------------------------------------------------------------------------------------------


def paper_type_run(root: Path, device: str) -> dict:
    from test_paper_types import TASKS, paper_config, run_paper_config

    config = paper_config(root)
    config["device"] = device
    for key, (train, score) in PRECISIONS.items():
        task = config["tasks"][TASKS[key]]
        task["finetune"]["precision"] = train
        task["selection"] = {**task.get("selection", {}), "precision": score}
        task["evaluation"] = {**task.get("evaluation", {}), "precision": score}
    started = time.perf_counter()
    run = run_paper_config(root, config, cores=min(os.cpu_count() or 2, 8))
    wall = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"paper-type run failed after {wall:.0f} s:\n{(run.stdout + run.stderr)[-6000:]}")
    results = Path(config["results_dir"])
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    checked = {}
    for key, name in TASKS.items():
        train, score = PRECISIONS[key] if device == "cuda" else ("fp32", "fp32")
        want = {"type": device, "name": gpu}
        files = [*(results / name / "eval").rglob("*.json"), *(results / name / "candidates").rglob("*.json")]
        files += list((results / name / "selection").rglob("*.json"))
        bad = []
        for path in files:
            record = json.loads(path.read_text())
            if {k: record["device"][k] for k in want} != want or record["device"]["precision"] != score:
                bad.append(f"{path.relative_to(results)}: {record['device']}")
            trained = (record.get("finetune") or {}).get("device")
            if trained and (trained["type"] != device or trained["precision"] != train):
                bad.append(f"{path.relative_to(results)} finetune: {trained}")
        int8 = [json.loads(p.read_text())["device"] for p in (results / name / "int8").rglob("*.json")]
        bad += [f"int8: {d}" for d in int8 if d["type"] != device]
        table = pd.read_csv(results / name / "tables" / "table9.csv")
        if not table["test"].map(math.isfinite).all():
            bad.append(f"table9 has non-finite metrics:\n{table}")
        if bad:
            sys.exit(f"{name}: results not computed where asked ({device}, {want}):\n" + "\n".join(bad[:20]))
        checked[key] = {"files": len(files) + len(int8), "table9_device": sorted(set(table["device"]))}
    return {"wall_s": wall, "device": device, "gpu": gpu, "tasks": checked}


# ------------------------------------------------------------------------------------------------------------
# 2. Throughput
# ------------------------------------------------------------------------------------------------------------


def merged_gpt2() -> GPT2LMHeadModel:
    """GPT-2 small's shape (12 layers, d 768), random weights, FF sublayers 0-3 tied to layer 0's (a 1/3 merge)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024))
    for layer in model.transformer.h[1:4]:
        layer.mlp = model.transformer.h[0].mlp
    return model


def throughput(device: str, precision: str, steps: int, batch_size: int, seq_len: int, warmup: int) -> float:
    """Fine-tuning tokens per second: median over ``steps`` timed steps, after ``warmup`` steps."""
    from ffmerge.finetune import FinetuneConfig, causal_lm_loss, finetune

    model = merged_gpt2()
    stream = torch.randint(0, model.config.vocab_size, (batch_size * seq_len * (steps + warmup + 1),))
    times: list[float] = []
    last = [time.perf_counter()]

    def get_batch(i: int) -> dict[str, torch.Tensor]:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        now = time.perf_counter()
        if i > warmup:  # the interval since the previous call: step i - 1
            times.append(now - last[0])
        last[0] = now
        ids = stream[i * batch_size * seq_len : (i + 1) * batch_size * seq_len].view(batch_size, seq_len)
        return {"input_ids": ids}

    config = FinetuneConfig(
        lr=1e-4, max_steps=steps + warmup + 1, batch_size=batch_size, eval_every=10**6, checkpoint_every=10**6, seed=0,
        device=device, precision=precision, save_final_state=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu_check_ft_") as work:
        finetune(model, loss_fn=causal_lm_loss, get_batch=get_batch, evaluate=lambda m: 0.0, config=config,
                 work_dir=work)  # fmt: skip
    return batch_size * seq_len / statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        from ffmerge.device import cuda_problem

        sys.exit(f"no usable GPU: {cuda_problem()} (--device cpu tries this script on the CPU)")
    gflops = matmul_gflops()
    report: dict = {"host_gflops_1_thread": gflops, "torch": torch.__version__, "cuda": torch.version.cuda}
    print(f"host: 2048x2048 float32 matmul {gflops:.1f} GFLOPS on 1 thread; {torch.get_num_threads()} CPU threads")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if not args.skip_run:
        root = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check_"))
        report["paper_type_run"] = paper_type_run(root, args.device)
        run = report["paper_type_run"]
        print(f"paper-type run on {args.device}: {run['wall_s']:.0f} s; every model job recorded {args.device}")
        for key, task in run["tasks"].items():
            print(f"  {key}: {task['files']} result files checked; Table 9 device {task['table9_device']}")
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)
    if not args.skip_throughput:
        settings = [("cpu", "fp32")]
        if args.device == "cuda":
            settings += [("cuda", p) for p in ("fp32", "bf16", "fp16")]
        rows = []
        for device, precision in settings:
            # the CPU: fewer steps (each takes seconds), its warm-up is short (no kernels to select)
            steps, warmup = (max(2, args.steps // 4), 1) if device == "cpu" else (args.steps, 3)
            rate = throughput(device, precision, steps, args.batch_size, args.seq_len, warmup)
            rows.append({"device": device, "precision": precision, "tokens_per_s": rate, "steps": steps})
            print(f"  fine-tuning {device} {precision}: {rate:,.0f} tokens/s ({steps} timed steps)", flush=True)
        cpu = rows[0]["tokens_per_s"]
        print(
            f"GPT-2-small-sized merged model, batch {args.batch_size} x {args.seq_len} tokens; vs CPU: "
            + ", ".join(f"{r['device']} {r['precision']} {r['tokens_per_s'] / cpu:.1f}x" for r in rows[1:])
        )
        report["throughput"] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
