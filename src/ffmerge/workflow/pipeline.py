"""One function per workflow step, so each Snakemake script is a few lines and each step is testable alone.

Every step reads files, writes its outputs atomically (temporary name, then rename) and returns what it
wrote. Steps take the task's validated config block and plain paths; nothing here knows about Snakemake.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..align import (
    MergePlan,
    SolvedPairs,
    align_group,
    anchor_layer,
    load_pairs,
    plan_merge,
    save_pairs,
    solve_pairs,
)
from ..checkpoint import load_model, save_compressed
from ..cka import cka_matrix
from ..device import autocast, device_record, effective_precision
from ..device import resolve_device as _resolve_device
from ..drop import drop_layers
from ..experiments import (
    MERGE_METHODS,
    MERGES_WITH,
    parse_fraction_label,
    random_starts,
    split_variant,
    window_starts,
    windows_at,
)
from ..features import FeatureStore, cache_features
from ..ffdrop import delete_ff, ffdrop_layers
from ..finetune import FinetuneConfig, distillation_loss, finetune
from ..fips import METHOD as FIPS
from ..fips import FipsConfig, compress_fips
from ..group import METHOD as GROUP
from ..group import SIMILARITY as GROUP_SIMILARITY
from ..group import similar_groups
from ..merge import apply_plan
from ..onewide import METHOD as ONEWIDE
from ..onewide import onewide_layout
from ..repair import RepairConfig, merge_and_repair
from ..size import size_report
from ..tasks import get_task
from ..tie_random import tie_random
from ..wide import METHOD as WIDE
from ..wide import build_wide
from .atomic import write_json
from .settings import setting

log = logging.getLogger("ffmerge")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def resolve_device(device: str) -> torch.device:
    """The job's device (:func:`ffmerge.device.resolve_device`: a granted GPU that cannot be used is an error),
    named in its log."""
    dev = _resolve_device(device)
    log.info("device: %s%s", dev, f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    return dev


def scoring_precision(cfg: dict, block: str, dev: torch.device) -> str:
    """The precision the forward passes of scoring block ``block`` (selection, evaluation) use on ``dev``."""
    precision = effective_precision(dev, setting(cfg, block, "precision"), log.info)
    log.info("%s scoring in %s", block, precision)
    return precision


class _AutocastScorer:
    """A batch-addressable scorer whose forward passes run under the scoring precision's autocast; the model
    building between them (alignment, averaging) stays in fp32."""

    def __init__(self, scorer: Any, device: torch.device, precision: str):
        self.scorer, self.device, self.precision = scorer, device, precision
        self.n_batches = scorer.n_batches

    def run(self, model: nn.Module, batches: range | None = None) -> dict[str, float]:
        with autocast(self.device, self.precision):
            return self.scorer.run(model, batches)

    def metric(self, sums: dict[str, float]) -> float:
        return self.scorer.metric(sums)


def _score(task: Any, model: nn.Module, data_dir: Path, split: str, block: str, dev: torch.device, precision: str):
    with autocast(dev, precision):
        return task.score(model, Path(data_dir), split, block, dev)


def stack_layers(model: nn.Module) -> dict[str, int]:
    adapter = get_adapter(model)
    return {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}


def prepare_base_model(cfg: dict, out_dir: Path) -> Path:
    """The task's model source as a transformers folder; the task names the head class unless the source does."""
    from ..sources import prepare_model

    return prepare_model({"auto_class": get_task(cfg).auto_class, **cfg["model"]}, out_dir)


def prepare_data(cfg: dict, model_dir: Path, out_dir: Path) -> dict:
    return get_task(cfg).prepare_data(Path(model_dir), Path(out_dir))


def fit_head(cfg: dict, backbone_dir: Path, data_dir: Path, out_dir: Path, device: str) -> dict:
    """A linear head on the frozen backbone, as the baseline classifier (see :mod:`ffmerge.probe`)."""
    from ..probe import fit_linear_head

    result = fit_linear_head(Path(backbone_dir), Path(data_dir), Path(out_dir), cfg, device=resolve_device(device))
    log.info("linear probe: %s", result)
    return result


def cache(cfg: dict, model_dir: Path, data_dir: Path, out_dir: Path, device: str) -> FeatureStore:
    task = get_task(cfg)
    dev = resolve_device(device)
    model = load_model(model_dir, auto_class=task.auto_class, device=dev)
    f = cfg["features"]
    return cache_features(
        model,
        task.calibration_batches(Path(data_dir)),
        out_dir,
        n_tokens=task.calibration_tokens(Path(data_dir)),
        feature=f["feature"],
        dtype=f["dtype"],
        device=dev,
    )


def compress(
    model: nn.Module,
    variant: str,
    fraction: str,
    start: int,
    features: FeatureStore | None,
    plan: dict | None = None,
    solved: SolvedPairs | None = None,
    repair: RepairConfig | None = None,
    calibration: Callable[[], Iterable[dict]] | None = None,
    seed: int = 0,
    fips: FipsConfig | None = None,
    group_count: int = 1,
) -> dict:
    """Apply one variant in place; returns the windows and, for merges, the plan (to rebuild it exactly).

    A ``plan`` from an earlier call rebuilds the same merge without aligning the layers again; ``solved`` holds
    pairs already aligned (the align step), so only pairs missing from it are solved here. An enabled
    ``repair`` refits each merged block to its members' original outputs (:mod:`ffmerge.repair`);
    ``calibration`` yields the calibration batches when the repair takes its inputs from the merged model.
    ``seed`` draws tie_random's fresh block; tie_random is never repaired (see :mod:`ffmerge.tie_random`).
    ``onewide`` merges the first stack whole and deletes the other stacks' FF sublayers (:mod:`ffmerge.onewide`);
    ``group`` merges the most alike layers instead of a window (:mod:`ffmerge.group`; ``group_count`` disjoint
    groups per stack) and returns them as ``groups`` (``{stack: [members, ...]}``) with ``windows: None``.
    ``fips`` factorises every FF block at the merge's budget for ``fraction``
    (:mod:`ffmerge.fips`, configured by ``fips``; its fit's record under ``repair``, ``windows: None``); ``wide``
    gives each stack one block as wide as the blocks the merge keeps, shared by all its layers (:mod:`ffmerge.wide`;
    its layout under ``wide``).
    """
    method, anchor = split_variant(variant)
    windows = windows_at(method, stack_layers(model), fraction, start)
    if method == "drop":
        drop_layers(model, windows)
        return {"windows": windows, "plan": None}
    if method == "ffdrop":
        delete_ff(model, ffdrop_layers(windows))
        return {"windows": windows, "plan": None}
    if method == "tie_random":
        tie_random(model, windows, seed)
        return {"windows": windows, "plan": None, "repair": None}
    if method not in MERGES_WITH and method != FIPS:
        raise ValueError(f"unknown variant {variant!r}")
    if features is None and plan is None:
        raise ValueError(f"variant {variant} builds from the cached features: give it the features folder")
    if method == FIPS:
        report = compress_fips(model, features, fraction, fips or FipsConfig(seed=seed))
        return {"windows": None, "plan": None, "repair": report}
    if method == WIDE:
        built = build_wide(model, features, fraction, repair, solved=solved, calibration=calibration)
        return {"windows": None, "plan": None, **built}
    if method == ONEWIDE:
        shared, deleted = onewide_layout(stack_layers(model), fraction)
    if plan is not None:  # a recorded plan rebuilds the merge exactly, without aligning anything again
        merge_plan = MergePlan.from_dict(plan)
    elif method == GROUP:
        merge_plan = MergePlan(
            method="permute",
            feature=features.manifest["feature"],
            stacks=[
                align_group(features, s, members, anchor=anchor, solved=solved)
                for s, groups in similar_groups(features, stack_layers(model), fraction, group_count).items()
                for members in groups
            ],
        )
    elif method == ONEWIDE:
        merge_plan = plan_merge(features, shared, anchor=anchor, method="permute", solved=solved)
    else:
        merge_plan = plan_merge(features, windows, anchor=anchor, method=method, solved=solved)
    info = {"windows": windows, "plan": merge_plan.to_dict()}
    if repair is not None and repair.enabled:
        if features is None:
            raise ValueError(f"repairing {variant} needs the cached features")
        info["repair"] = merge_and_repair(model, merge_plan, features, repair, calibration=calibration)
    else:
        apply_plan(model, merge_plan)
    if method == GROUP:
        groups: dict[str, list[list[int]]] = {}
        for a in merge_plan.stacks:
            groups.setdefault(a.stack, []).append(a.layers)
        return {**info, "windows": None, "groups": groups, "similarity": GROUP_SIMILARITY}
    if method == ONEWIDE:
        delete_ff(model, deleted)  # after the repair, which reads only the shared stack's cached features
        return {**info, "deleted_ff": deleted}
    return info


def align(cfg: dict, features_dir: Path, out_path: Path) -> int:
    """Solve once each (anchor, layer) pair that the permute searches of all configured fractions align.

    Their windows share most pairs (see :func:`ffmerge.align.solve_pairs`), and the compressed models rebuilt
    from the chosen windows need no new ones. Anchor ablations align their one window in their own job.
    Returns the number of pairs solved.
    """
    store = FeatureStore.open(features_dir)
    layers = dict(store.manifest["num_layers"])
    pairs = set()
    for fraction in cfg["experiments"]["fractions"]:
        for start in window_starts("permute", layers, fraction):
            for stack, (first, size) in windows_at("permute", layers, fraction, start).items():
                anchor = anchor_layer(first, size, "first")
                pairs |= {(stack, anchor, j) for j in range(first, first + size) if j != anchor}
    log.info(f"aligning {len(pairs)} (anchor, layer) pairs")
    save_pairs(out_path, solve_pairs(store, pairs), store)
    return len(pairs)


def _solved(alignments: Path | None, features: FeatureStore | None) -> SolvedPairs | None:
    if alignments is None or features is None:
        return None
    return load_pairs(alignments, features)


def candidate(
    cfg: dict,
    model_dir: Path,
    data_dir: Path,
    features_dir: Path | None,
    variant: str,
    fraction_label: str,
    start: int,
    out_json: Path,
    device: str,
) -> dict:
    """Build one candidate window and score it on validation data (the paper's window search).

    Each candidate job aligns its own window, so a cluster spreads the alignments over the jobs (rule align
    serves in-process searches only)."""
    task = get_task(cfg)
    dev = resolve_device(device)
    model = load_model(model_dir, auto_class=task.auto_class, device=dev)
    fraction = parse_fraction_label(fraction_label)
    features = FeatureStore.open(features_dir) if features_dir else None
    info = compress(model, variant, fraction, start, features, repair=_search_repair(cfg, variant))
    precision = scoring_precision(cfg, "selection", dev)
    metric = _score(task, model, data_dir, "valid", "selection", dev, precision)
    result = {
        "variant": variant,
        "fraction": fraction,
        "start": start,
        "windows": info["windows"],
        "metric": task.metric,
        "valid": metric,
        "parameters": model.num_parameters(),
        **_metric_details(task),
        "device": device_record(dev, precision),
    }
    write_json(out_json, result)
    return result


def select(candidate_jsons: Iterable[Path], cfg: dict, out_json: Path) -> dict:
    """The best of the per-window candidate jobs (``search.mode: per_window``)."""
    rows = [read_json(p) for p in candidate_jsons]
    return _write_selection(rows, get_task(cfg), out_json, record={"mode": "per_window"})


def search(
    cfg: dict,
    model_dir: Path,
    data_dir: Path,
    features_dir: Path | None,
    variant: str,
    fraction_label: str,
    out_json: Path,
    device: str,
    *,
    alignments: Path | None = None,
) -> dict:
    """Every window start in one job (``search.mode: in_process``), reusing the base model's hidden
    states and, if configured, finishing only the candidates that lead on a first share of the data; or
    (``proxy``) only the ``proxy_keep`` starts that a score from the feature cache ranks best (:mod:`ffmerge.proxy`)."""
    task = get_task(cfg)
    dev = resolve_device(device)
    base = load_model(model_dir, auto_class=task.auto_class, device=dev)
    features = FeatureStore.open(features_dir) if features_dir else None
    precision = scoring_precision(cfg, "selection", dev)
    scorer, reuse = selection_scorer(task, Path(data_dir), dev, cfg["search"], precision)
    rows, record = search_model(
        task,
        base,
        scorer,
        features,
        variant,
        parse_fraction_label(fraction_label),
        cfg["search"],
        reuse=reuse,
        solved=_solved(alignments, features),
        repair=_search_repair(cfg, variant),
    )
    record["device"] = device_record(dev, precision)
    return _write_selection(rows, task, out_json, _metric_details(task), record)


def _search_repair(cfg: dict, variant: str) -> RepairConfig | None:
    """The repair a search applies to its candidates (``search.repair``, merges only), or None."""
    if not setting(cfg, "search", "repair") or split_variant(variant)[0] not in MERGE_METHODS:
        return None
    repair = RepairConfig.from_cfg(cfg.get("repair"), cfg["seed"])
    if not repair.enabled:
        raise ValueError(
            "search.repair: true scores repaired candidates, but repair.enabled is false; enable the repair or set "
            "search.repair to false"
        )
    return repair


def selection_scorer(
    task: Any, data_dir: Path, device: torch.device, search_cfg: dict, precision: str = "fp32"
) -> tuple[Any, bool]:
    """The validation scorer of a search (forward passes in ``precision``) and whether hidden states below a
    window can be replayed."""
    scorer = task.scorer(data_dir, "valid", "selection", device)
    if scorer is None:  # a metric that cannot be split (corpus BLEU, WER): one full pass per candidate
        return _AutocastScorer(_WholeScorer(task, data_dir, device), device, precision), False
    return _AutocastScorer(scorer, device, precision), search_cfg["reuse_states"]


def search_model(
    task: Any,
    base: nn.Module,
    scorer: Any,
    features: FeatureStore | None,
    variant: str,
    fraction: str,
    search_cfg: dict,
    *,
    reuse: bool = True,
    solved: SolvedPairs | None = None,
    repair: RepairConfig | None = None,
    log_fn: Callable[[str], Any] = log.info,
) -> tuple[list[dict], dict]:
    """The search of :func:`search` on a loaded model: the scored rows and what the record adds to them.

    ``proxy`` mode scores every start with :func:`ffmerge.proxy.proxy_scores`, then runs the in-process search
    (no screening) on the ``proxy_keep`` best only; the record keeps every start's proxy score, the starts
    evaluated and how the proxy ranked them (``proxy``: what it measures, tokens, keep, seconds). With
    ``repair`` (``search.repair``) every scored candidate is repaired first, as the compress step will repair
    the chosen one; the proxy still ranks the plain merges.
    """
    from ..search import search_windows

    method, _ = split_variant(variant)
    starts = window_starts(method, stack_layers(base), fraction)
    mode = search_cfg["mode"]
    record: dict[str, Any] = {"mode": mode}

    def build(model: nn.Module, start: int, plan: dict | None) -> dict:
        return compress(model, variant, fraction, start, features, plan, solved)

    def build_scored(model: nn.Module, start: int, plan: dict | None) -> dict:
        return compress(model, variant, fraction, start, features, plan, solved, repair=repair)

    if mode != "proxy":
        screen_share, screen_keep = search_cfg["screen_share"], search_cfg["screen_keep"]
    else:  # the kept starts are scored in full (a proxy search's params hold no screening keys)
        from .. import proxy

        screen_share, screen_keep = 1.0, 1
        if features is None:
            raise ValueError("search.mode proxy ranks windows from the feature cache: give it the features folder")
        started = time.perf_counter()
        scores = proxy.proxy_scores(base, features, method, fraction, starts, build)
        seconds = time.perf_counter() - started
        kept = sorted(proxy.rank(scores)[: search_cfg["proxy_keep"]])
        log_fn(f"proxy scores of {len(starts)} starts in {seconds:.1f} s; evaluating starts {kept}")
        record |= {
            # how the proxy ranked (seconds: run history, like the repair's, not a result)
            "proxy": {
                "score": proxy.describe(method),
                "tokens": proxy.PROXY_TOKENS,
                "keep": search_cfg["proxy_keep"],
                "seconds": round(seconds, 2),
            },
            "proxy_scores": {str(s): scores[s] for s in starts},
            "evaluated": kept,
        }
        starts = kept
    if repair is not None:
        record["repair"] = {k: v for k, v in asdict(repair).items() if k != "enabled"}
    results = search_windows(
        base,
        scorer,
        build_scored,
        starts,
        higher_is_better=task.higher_is_better,
        reuse=reuse,
        screen_share=screen_share,
        screen_keep=screen_keep,
        max_tapes=search_cfg["max_tapes"],
        log=log_fn,
    )
    rows = [
        {
            "variant": variant,
            "fraction": fraction,
            "start": r.start,
            "windows": r.info["windows"],
            "metric": task.metric,
            "valid": r.metric(scorer),
            "share": r.batches / scorer.n_batches,
        }
        for r in results
    ]
    return rows, record


class _WholeScorer:
    """Adapter for tasks without a batch-addressable scorer: one 'batch', the whole split."""

    n_batches = 1

    def __init__(self, task: Any, data_dir: Path, device: torch.device):
        self.task, self.data_dir, self.device = task, data_dir, device

    def run(self, model: nn.Module, batches: range | None = None) -> dict[str, float]:
        return {"metric": self.task.score(model, self.data_dir, "valid", "selection", self.device)}

    @staticmethod
    def metric(sums: dict[str, float]) -> float:
        return sums["metric"]


def _write_selection(
    rows: list[dict], task: Any, out_json: Path, details: dict | None = None, record: dict | None = None
) -> dict:
    """Keep the best fully scored window; ties go to the earliest start so the choice is deterministic.

    Windows scored only on a screening share (``share`` < 1) are reported but never chosen. ``scores`` holds
    validation scores only: a proxy search's other starts are in ``proxy_scores`` (``record``: the search mode
    and, for ``proxy``, its proxy scores and evaluated starts).
    """
    rows = sorted(rows, key=lambda r: r["start"])
    full = [r for r in rows if r.get("share", 1.0) >= 1.0]
    if not full:
        raise ValueError("no candidate windows to select from" if not rows else "no candidate was scored in full")
    sign = -1 if task.higher_is_better else 1

    def rank(row: dict) -> tuple:  # a diverged (NaN or infinite) candidate never wins over a finite one
        finite = math.isfinite(row["valid"])
        return (not finite, sign * row["valid"] if finite else 0.0, row["start"])

    best = min(full, key=rank)
    result = {
        "variant": best["variant"],
        "fraction": best["fraction"],
        "best_start": best["start"],
        "windows": best["windows"],
        "metric": task.metric,
        "best_valid": best["valid"],
        "scores": {str(r["start"]): r["valid"] for r in rows},
        "screened": {str(r["start"]): r["share"] for r in rows if r.get("share", 1.0) < 1.0},
        **(record or {}),
        # the candidates' metric details (per-window jobs: the best one's, and where it was scored, since candidate
        # jobs may run on different nodes), e.g. the sacrebleu signature
        **(details if details is not None else {k: best[k] for k in (*METRIC_DETAIL_KEYS, "device") if k in best}),
    }
    write_json(out_json, result)
    return result


def window_starts_of(selection: dict) -> list[int]:
    """Every start the search ranked: a proxy search scores only some of them on validation."""
    return sorted(int(s) for s in selection.get("proxy_scores") or selection["scores"])


def choose_start(selection: dict, choice: str, seed: int) -> int:
    if choice == "best":
        return selection["best_start"]
    if not choice.startswith("random"):
        raise ValueError(f"choice must be 'best' or 'randomN', got {choice!r}")
    index = int(choice.removeprefix("random"))
    starts = window_starts_of(selection)
    picks = random_starts(starts, selection["best_start"], index + 1, seed)
    if index >= len(picks):
        raise ValueError(
            f"only {len(picks)} windows other than the best exist; {choice} is not available: lower "
            f"experiments.random_windows to at most {len(picks)}"
        )
    return picks[index]


def build_compressed(
    cfg: dict,
    model_dir: Path,
    features_dir: Path | None,
    selection_json: Path,
    variant: str,
    choice: str,
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    eval_json: Path | None = None,
    device: str = "cpu",
    alignments: Path | None = None,
) -> dict:
    """Rebuild the chosen candidate and save it as a tied checkpoint (shared tensors stored once).

    With ``eval_json`` the saved model's test metric is measured in the same process (see :func:`evaluate`).
    """
    task = get_task(cfg)
    method, _ = split_variant(variant)
    model = load_model(model_dir, auto_class=task.auto_class)
    before = model.num_parameters()
    selection = read_json(selection_json)
    start = choose_start(selection, choice, cfg["seed"])
    features = FeatureStore.open(features_dir) if features_dir else None
    repair = RepairConfig.from_cfg(cfg.get("repair"), cfg["seed"])
    calibration = (lambda: task.calibration_batches(Path(data_dir))) if data_dir is not None else None
    info = compress(
        model,
        variant,
        selection["fraction"],
        start,
        features,
        solved=_solved(alignments, features),
        repair=repair,
        calibration=calibration,
        seed=cfg["seed"],
        fips=FipsConfig.from_cfg(cfg["fips"], cfg["seed"]) if method == FIPS else None,
        group_count=setting(cfg, "group", "count") if method == GROUP else 1,
    )
    extra = {
        "variant": variant,
        "fraction": selection["fraction"],
        "choice": choice,
        "start": start if info["windows"] is not None else None,  # a similarity group or FiPS has no window start
        "windows": info["windows"],
        **({"groups": info["groups"], "similarity": info["similarity"]} if info.get("groups") else {}),
        **({"wide": info["wide"]} if info.get("wide") else {}),
        "plan": info["plan"],
        "repair": info.get("repair"),
        "parameters_before": before,
    }
    save_compressed(model, out_dir, extra=extra)
    if eval_json is not None:
        _write_test_record(task, model, data_dir, eval_json, device, extra, cfg)
    return extra


def run_finetune(
    cfg: dict,
    model_dir: Path,
    data_dir: Path,
    work_dir: Path,
    out_dir: Path,
    device: str,
    *,
    eval_json: Path | None = None,
    teacher_dir: Path | None = None,
) -> dict:
    """Recovery fine-tuning with checkpoints in ``work_dir``; a rerun resumes from the last one.

    With ``eval_json`` the fine-tuned model's test metric is measured in the same process (see :func:`evaluate`).
    A ``finetune.distill.weight`` above 0 mixes in the KL to ``teacher_dir``'s outputs (the uncompressed model).
    The budget (steps, examples per step in the task's unit, their product) and the validation curve are
    recorded with the result.
    """
    task = get_task(cfg)
    work_dir = expand_work_dir(work_dir)
    dev = resolve_device(device)
    model = load_model(model_dir, auto_class=task.auto_class, device=dev)
    ft = cfg["finetune"]
    checkpointing = setting(cfg, "finetune", "gradient_checkpointing")
    if checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ValueError(
                f"finetune.gradient_checkpointing: {type(model).__name__} does not support it; set it to false"
            )
        # non-reentrant: recomputation replays the RNG state, so dropout (and exact resume) are unchanged
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = FinetuneConfig(
        lr=ft["lr"],
        schedule=ft["schedule"],
        warmup_steps=ft["warmup_steps"],
        min_lr=ft["min_lr"],
        decay_steps=setting(cfg, "finetune", "decay_steps"),
        max_steps=ft["max_steps"],
        batch_size=ft["batch_size"],
        grad_accum=setting(cfg, "finetune", "grad_accum"),
        loader_workers=setting(cfg, "finetune", "loader_workers"),
        eval_every=ft["eval_every"],
        checkpoint_every=ft["checkpoint_every"],
        seed=cfg["seed"],
        precision=setting(cfg, "finetune", "precision"),
        device=str(dev),
        higher_is_better=task.higher_is_better,
        # the finished model is saved right after; a resume state at the last step would only be deleted again
        save_final_state=ft["keep_state"],
        distill_weight=ft["distill"]["weight"],
        distill_temperature=ft["distill"]["temperature"],
    )
    loss_fn, get_batch = task.training(Path(data_dir), dev)
    distill = ft["distill"]
    if distill["weight"] > 0:
        if teacher_dir is None:
            raise ValueError("finetune.distill.weight > 0 needs the uncompressed model as teacher (teacher_dir)")
        teacher = load_model(teacher_dir, auto_class=task.auto_class, device=dev)
        loss_fn = distillation_loss(task.training_outputs, teacher, **distill)
    precision = scoring_precision(cfg, "selection", dev)
    result = finetune(
        model,
        loss_fn=loss_fn,
        get_batch=get_batch,
        config=config,
        work_dir=work_dir,
        evaluate=lambda m: _score(task, m, data_dir, "valid", "selection", dev, precision),
        log=log.info,
    )
    if checkpointing:
        model.activation_checkpointing_disable()
    per_step = task.examples_per_step() * config.grad_accum
    extra = {
        "finetune": {
            "best_valid": result.best_metric,
            "best_step": result.best_step,
            **_metric_details(task),
            "steps": result.steps_done,
            "resumed_from": result.resumed_from,
            "budget": {"unit": task.budget_unit, "per_step": per_step, "total": per_step * result.steps_done},
            "distill": dict(distill),
            "lr": ft["lr"],
            # where it trained, in what precision (a CPU: fp32 whatever the config asked)
            "device": device_record(dev, effective_precision(dev, config.precision)),
            "gradient_checkpointing": checkpointing,
            "curve": [
                {"step": h["step"], "seen": h["step"] * per_step, "valid": h["metric"], "train_loss": h["train_loss"]}
                for h in result.history
            ],
        }
    }
    extra = _source_extra(model_dir) | extra
    save_compressed(model.cpu(), out_dir, extra=extra)
    if eval_json is not None:
        _write_test_record(task, model, data_dir, eval_json, device, extra, cfg)
    if not ft["keep_state"]:
        # the finished model is saved; the resume state (weights plus AdamW moments) is only dead weight now
        shutil.rmtree(work_dir, ignore_errors=True)
    return extra


def expand_work_dir(path: str | Path) -> Path:
    """The fine-tune's resume-state folder with the job's environment variables expanded (config scratch_dir,
    e.g. "/scratch/$USER/ffmerge"); one left unexpanded would make a folder literally named "$TMPDIR"."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if "$" in expanded:
        raise ValueError(
            f"scratch_dir: {path} names an environment variable this job does not have; set it in the job's "
            "environment or give scratch_dir a path without it"
        )
    log.info("resume state in %s", expanded)
    return Path(expanded)


# result-file fields that say how the metric was computed (translation: BLEU's sacrebleu signature etc.)
METRIC_DETAIL_KEYS = ("metric_signature", "metric_tokenize", "decoding")


def _metric_details(task: Any) -> dict:
    """``metric_signature``, ``metric_tokenize`` and ``decoding`` of the task's last score, where it has them
    (translation: sacrebleu's signature, e.g. "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
    its tokenizer, and the beams and length limit used); nothing for tasks without such details."""
    details = task.metric_details() if hasattr(task, "metric_details") else {}  # duck-typed tasks may lack it
    if not details:
        return {}
    decoding = {k: details[k] for k in ("num_beams", "num_beams_from", "max_new_tokens") if k in details}
    return {
        "metric_signature": details.get("signature"),
        "metric_tokenize": details.get("tokenize"),
        "decoding": decoding,
    }


def _source_extra(model_dir: Path) -> dict:
    path = Path(model_dir) / "ffmerge_ties.json"
    return read_json(path).get("extra", {}) if path.is_file() else {}


def evaluate(cfg: dict, model_dir: Path, data_dir: Path, out_json: Path, device: str) -> dict:
    """Test metric plus the size figures the tables need, of a saved model.

    The workflow calls this only for the uncompressed base: compress and finetune measure the models they
    have just saved themselves (``eval_json``), which spares a Python start and a model load per model
    (about 12 s on a laptop CPU, most of it importing torch and transformers).
    """
    task = get_task(cfg)
    model = load_model(model_dir, auto_class=task.auto_class)
    return _write_test_record(task, model, data_dir, out_json, device, _source_extra(model_dir), cfg)


def _write_test_record(
    task: Any, model: nn.Module, data_dir: Path | None, out_json: Path, device: str, extra: dict, cfg: dict
) -> dict:
    """One model's evaluation file; the same whether the model was just built or loaded from its folder."""
    if data_dir is None:
        raise ValueError(f"measuring the test metric for {out_json} needs the task's data folder (data_dir)")
    dev = resolve_device(device)
    model.to(dev)
    precision = scoring_precision(cfg, "evaluation", dev)
    result = {
        "metric": task.metric,
        "test": _score(task, model, data_dir, "test", "evaluation", dev, precision),
        **_metric_details(task),
        "size": size_report(model).as_dict(),
        **{k: extra.get(k) for k in ("variant", "fraction", "choice", "start", "windows", "repair", "finetune")},
        **{key: extra[key] for key in ("groups", "wide") if extra.get(key)},
        "device": device_record(dev, precision),
    }
    write_json(out_json, result)
    return result


def cka(features_dir: Path, out_csvs: dict[str, Path]) -> None:
    """CKA matrices of FF outputs and attention outputs, labelled by layer."""
    import pandas as pd  # only this step writes CSV; importing pandas costs every other job ~0.7 s

    store = FeatureStore.open(features_dir)
    for kind, path in out_csvs.items():
        matrix, labels = cka_matrix(store, kind)
        frame = pd.DataFrame(matrix, index=labels, columns=labels)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        frame.to_csv(tmp, float_format="%.6f")
        os.replace(tmp, path)


def int8(cfg: dict, model_dir: Path, data_dir: Path, out_json: Path, device: str) -> dict:
    """LLM.int8() of a (fine-tuned) model: test metric, bytes in float and in int8 (shared tensors once)."""
    from ..quantize import int8_size_bytes, quantize_int8

    task = get_task(cfg)
    dev = resolve_device(device)
    model = load_model(model_dir, auto_class=task.auto_class)
    float_bytes = size_report(model).bytes
    quantized = quantize_int8(model, device=str(dev))
    extra = _source_extra(model_dir)
    result = {
        "metric": task.metric,
        "test": task.score(quantized, Path(data_dir), "test", "evaluation", dev),
        **_metric_details(task),
        "bytes_float": float_bytes,
        "bytes_int8": int8_size_bytes(quantized),
        "device": device_record(dev, "int8"),
        **{k: extra.get(k) for k in ("variant", "fraction", "choice", "start", "windows")},
    }
    write_json(out_json, result)
    return result
