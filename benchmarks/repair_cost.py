#!/usr/bin/env python
"""Cost of one repair fit, as ``ffmerge.repair.fit_block`` does it against the per-member formulation it replaced.

The fit's loss is the sum over the window's members of each member's mean squared error on its own positions.
Every member contributes the same number of positions per step, so that sum equals the squared error of one
pass over all members' rows divided by the per-member count: ``fit_block`` runs the block once on the
concatenated rows; the reference below (the code before 2026-12-02) runs it once per member. Both draw the same
positions from the same seeded generator, so their losses agree up to float rounding; the benchmark prints both
curves' largest difference next to the times.

Reads a workflow's results (``results/{task}``: base model, feature cache, the permute search's choice), merges
the chosen window at ``--fraction`` as the compress step does (without folding: the fit costs the same), and
times ``--steps`` steps of each formulation on the same merged block (reset between them), then the full
relative-error pass the repair runs twice. Prints the host's float32 matmul speed first: compare the times
within one run only.

    python benchmarks/repair_cost.py --task lm --steps 30
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from _config import task_config
from _host import announce

from ffmerge.adapters import get_adapter
from ffmerge.align import MergePlan, plan_merge
from ffmerge.checkpoint import load_model
from ffmerge.experiments import windows_at
from ffmerge.features import FeatureStore
from ffmerge.merge import apply_plan
from ffmerge.repair import RepairConfig, fit_block, relative_error, store_data
from ffmerge.tasks import get_task
from ffmerge.workflow.pipeline import stack_layers

ROOT = Path(__file__).resolve().parent.parent


def per_member_error(block, data, picks) -> torch.Tensor:
    """The earlier formulation: one block pass per member, the members' mean errors summed."""
    return sum((block(data.x[j][pick]) - data.y[j][pick]).pow(2).sum(1).mean() for j, pick in picks)


def per_member_fit(adapter, model, stack, anchor, data, cfg) -> list[float]:
    return fit_block(adapter, model, stack, anchor, data, cfg, error=per_member_error)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--fraction", default="1of3")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    announce(args.threads)
    cfg, results_dir = task_config(args.config, args.task)
    results = results_dir / args.task
    selection = json.loads((results / "selection" / "permute" / f"{args.fraction}.json").read_text())
    model = load_model(results / "model" / "base", auto_class=get_task(cfg).auto_class)
    store = FeatureStore.open(results / "features")
    windows = windows_at("permute", stack_layers(model), selection["fraction"], selection["best_start"])
    plan: MergePlan = plan_merge(store, windows, method="permute")
    apply_plan(model, plan)
    adapter = get_adapter(model)
    repair = RepairConfig.from_cfg({**cfg.get("repair", {}), "steps": args.steps}, cfg["seed"])
    for alignment in plan.stacks:
        data = store_data(store, alignment.stack, alignment.layers)
        modules = adapter.ff_modules(model, alignment.stack, alignment.anchor)
        merged = {id(p): p.detach().clone() for m in modules.values() for p in m.parameters()}
        curves, seconds = {}, {}
        for name, fit in (("per_member", per_member_fit), ("batched", fit_block), ("per_member again", per_member_fit)):
            with torch.no_grad():
                for m in modules.values():
                    for q in m.parameters():
                        q.copy_(merged[id(q)])
            started = time.perf_counter()
            curves[name] = fit(adapter, model, alignment.stack, alignment.anchor, data, copy.copy(repair))
            seconds[name] = time.perf_counter() - started
        started = time.perf_counter()
        relative_error(adapter.ff_forward(model, alignment.stack, alignment.anchor), data)
        error_pass = time.perf_counter() - started
        gap = max(abs(a - b) for a, b in zip(curves["per_member"], curves["batched"], strict=True))
        rows = len(data.layers) * -(-repair.batch_tokens // len(data.layers))
        per_step = {name: s / args.steps for name, s in seconds.items()}
        print(
            f"{args.task} {alignment.stack}: {len(data.layers)} members, {rows} rows per step, {args.steps} steps: "
            f"per member {per_step['per_member']:.3f} s/step (again {per_step['per_member again']:.3f}), "
            f"batched {per_step['batched']:.3f} s/step; ratio batched/per member "
            f"{per_step['batched'] / min(per_step['per_member'], per_step['per_member again']):.2f}; "
            f"largest loss difference {gap:.2e} (final loss {curves['batched'][-1]:.4f}); "
            f"one relative-error pass over {len(data.x[data.layers[0]])} positions per member {error_pass:.2f} s"
        )


if __name__ == "__main__":
    main()
