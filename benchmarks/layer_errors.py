#!/usr/bin/env python
"""Each layer's own FF reconstruction error after compression, and the repair's loss normalisation.

The repair and FiPS report one relative error per stack: the members' summed squared error over their summed
output energy. Layers whose FF outputs are large dominate that sum, so a low summed error can hide layers that
are reproduced badly. For each method of ``--variants`` built on a finished workflow's results (the chosen
window of the permute search at ``--fraction``, the task's ``repair`` and ``fips`` config, as the compress step
builds it) this prints every layer's own relative error ``||FF'(x_l) - FF_l(x_l)||^2 / ||FF_l(x_l)||^2`` on its
cached calibration inputs (in the folded space where the repair folded the layer's norm and scale), once per
``--normalize`` value of the repair; with ``--score`` also the validation and test metric before fine-tuning.
The host's float32 matmul speed comes first: compare times within one run only.

    python benchmarks/layer_errors.py --task vision --variants permute,wide,fips --normalize total,member --score
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

from ffmerge.adapters import get_adapter, get_submodule
from ffmerge.checkpoint import load_model
from ffmerge.features import FeatureStore
from ffmerge.fips import FipsConfig
from ffmerge.repair import RepairConfig, fold_scales, folded_inputs, folded_targets, store_data
from ffmerge.tasks import get_task
from ffmerge.workflow import pipeline

ROOT = Path(__file__).resolve().parent.parent


def folded_layers(base: torch.nn.Module, model: torch.nn.Module, stack: str) -> set[int]:
    """Layers whose pre-FF norm the repair folded: its weight is all ones in ``model`` but not in ``base``."""
    adapter = get_adapter(base)
    spec = adapter.stack(stack)
    if spec.ff_norm is None:
        return set()
    found = set()
    for j in range(adapter.num_layers(base, stack)):
        before = get_submodule(adapter.layers(base, stack)[j], spec.ff_norm).weight
        after = get_submodule(adapter.layers(model, stack)[j], spec.ff_norm).weight
        if bool((after == 1).all()) and not bool((before == 1).all()):
            found.add(j)
    return found


@torch.no_grad()
def layer_errors(base: torch.nn.Module, model: torch.nn.Module, store: FeatureStore) -> dict[str, list[float]]:
    adapter = get_adapter(base)
    errors = {}
    for spec in adapter.stacks:
        n = adapter.num_layers(base, spec.name)
        data = store_data(store, spec.name, list(range(n)))
        folded = folded_layers(base, model, spec.name)
        saved = fold_scales(copy.deepcopy(base), spec.name, sorted(folded)) if folded else {}
        errors[spec.name] = []
        for j in range(n):
            x, y = data.x[j], data.y[j]
            if j in folded:
                x, y = folded_inputs(x, saved[j]), folded_targets(y, saved[j])
            out = adapter.ff_forward(model, spec.name, j)(x)
            errors[spec.name].append(float((out - y).pow(2).sum() / y.pow(2).sum()))
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="vision")
    p.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    p.add_argument("--fraction", default="1/3")
    p.add_argument("--variants", default="permute")
    p.add_argument("--normalize", default="total", help="comma-separated repair.normalize values to compare")
    p.add_argument("--score", action="store_true", help="also the validation and test metric before fine-tuning")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    gflops = announce(args.threads)
    cfg, results_dir = task_config(args.config, args.task)
    results = results_dir / args.task
    task = get_task(cfg)
    base = load_model(results / "model" / "base", auto_class=task.auto_class)
    store = FeatureStore.open(results / "features")
    label = args.fraction.replace("/", "of")
    start = json.loads((results / "selection" / "permute" / f"{label}.json").read_text())["best_start"]
    rows = []
    for variant in args.variants.split(","):
        for normalize in args.normalize.split(","):
            model = copy.deepcopy(base)
            repair = RepairConfig.from_cfg({**cfg["repair"], "normalize": normalize}, cfg["seed"])
            started = time.perf_counter()
            info = pipeline.compress(
                model,
                variant,
                args.fraction,
                start,
                store,
                repair=repair,
                calibration=lambda: task.calibration_batches(results / "data"),
                seed=cfg["seed"],
                fips=FipsConfig.from_cfg(cfg["fips"], cfg["seed"]),
            )
            stacks = (info.get("repair") or {}).get("stacks") or {}
            row = {
                "variant": variant,
                "normalize": normalize if variant != "fips" else "(fips: its own loss)",
                "seconds_build": round(time.perf_counter() - started, 1),
                "summed": {s: st.get("error_repaired") for s, st in stacks.items()},
                "layers": {s: [round(e, 4) for e in v] for s, v in layer_errors(base, model, store).items()},
            }
            if args.score:
                cpu = torch.device("cpu")
                row["valid"] = task.score(model, results / "data", "valid", "selection", cpu)
                row["test"] = task.score(model, results / "data", "test", "evaluation", cpu)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if variant == "fips":
                break  # the repair's normalisation does not apply to FiPS's fit
    if args.out:
        args.out.write_text(json.dumps({"gflops": gflops, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
