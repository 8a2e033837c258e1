"""Local repair of a merged FF block: refit the one shared block to every member layer's original function.

Averaging k aligned FF blocks gives a block whose output on a member's inputs can be almost unrelated to
that member's original output (on SmolLM2's chosen 1/3 window the squared error is 0.99 of the outputs'
energy). Block-wise reconstruction fixes this locally, before any fine-tuning: cache each member's FF inputs
``x_l`` and original outputs ``y_l`` on the calibration tokens and fit the shared block to

    sum_l ||FF(x_l) - y_l||^2 / sum_l ||y_l||^2

(the "relative error" reported everywhere below; 0 means every member is reproduced exactly). This is the
core of FiPS (Uyuk et al., TMLR 2026) and of "A Free Lunch in LLM Compression" (arXiv 2510.14444). The
options, each measured in the README's ablation:

- ``inputs``: ``original`` takes ``x_l`` from the uncompressed model (the feature cache, no extra forward);
  ``merged`` runs the merged model on the calibration data and takes the inputs its own layers see, so the
  fit also absorbs the error that earlier members pass down the residual stream.
- ``fold``: fold each member's pre-FF norm weight (and bias) into the input projections and its output scale
  (DINOv2's LayerScale) into the output projection *before* averaging. Each layer computes exactly what it
  did (the norm's and the scale's parameters become ones and zeros), the average is taken in a space where
  the members differ less, and the fit weighs each member's error as it enters the residual stream.
- ``lstsq``: start from the least-squares output projection (and bias) given the merged input side: a
  closed-form solve over all members' hidden activations.
- ``normalize``: ``total`` divides the members' summed squared error by their summed output energy, so members
  with large outputs dominate the fit; ``member`` divides each member's error by its own energy (the mean of
  the members' relative errors), so every layer counts alike.
- ``steps``, ``lr``, ``batch_tokens``: Adam on the whole shared block (input and output projections, biases),
  ``batch_tokens`` positions per step spread evenly over the members, seeded; a step costs the same whatever
  the window's size (SmolLM2, 1/3 window: 100 steps of ~128 positions per member gave a better validation
  perplexity than 300 steps or 256 positions, README).

Parameters never change in number: the fit moves the shared tensors in place, and folding only rewrites the
members' own norm and scale values.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter, get_submodule, neuron_axis
from .align import MergePlan
from .features import FeatureStore, first_positions, trunk_forward

log = logging.getLogger(__name__)

Inputs = Literal["original", "merged"]


@dataclass(frozen=True)
class RepairConfig:
    """The ``repair`` config block; ``enabled: false`` reproduces the paper's merge exactly."""

    enabled: bool = False
    inputs: Inputs = "original"
    fold: bool = False
    lstsq: bool = False
    normalize: Literal["total", "member"] = "total"
    steps: int = 100
    lr: float = 3e-3
    batch_tokens: int = 1536
    ridge: float = 1e-4
    tolerance: float = 1e-6
    """A merged block whose relative error is already at most this is left exactly as it is."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in ("original", "merged"):
            raise ValueError(f"repair.inputs must be 'original' or 'merged', got {self.inputs!r}")
        if self.normalize not in ("total", "member"):
            raise ValueError(f"repair.normalize must be 'total' or 'member', got {self.normalize!r}")
        if self.steps < 0 or self.batch_tokens < 1 or self.lr <= 0 or self.ridge < 0:
            raise ValueError(f"repair needs steps >= 0, batch_tokens >= 1, lr > 0 and ridge >= 0, got {self}")

    @classmethod
    def from_cfg(cls, block: Mapping[str, Any] | None, seed: int = 0) -> RepairConfig:
        return cls(**{**dict(block or {}), "seed": seed})


@dataclass
class MemberData:
    """One window's reconstruction data: per member layer, inputs ``x`` [N, d] and targets ``y`` [N, d]."""

    stack: str
    layers: list[int]
    x: dict[int, torch.Tensor]
    y: dict[int, torch.Tensor]
    weights: dict[int, float] | None = None
    """Per-member weights of the squared error (``repair.normalize: member``); None weighs every row alike."""


# ----------------------------------------------------------------------------------------------------------
# Folding per-layer scales into the block (function-preserving, done before the members are averaged)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_scales(model: nn.Module, stack: str, layers: Iterable[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Fold each layer's pre-FF norm affine and FF output scale into its own FF block, in place.

    Returns the original values ``{layer: {"norm_weight", "norm_bias", "scale"}}`` (only those that exist),
    which :func:`original_space` needs to express cached inputs and outputs in the folded space.
    """
    adapter = get_adapter(model)
    spec = adapter.stack(stack)
    if spec.ff_norm is None and spec.ff_scale is None:
        raise ValueError(
            f"{adapter.name} {stack}: nothing to fold (no pre-FF norm or output scale that only the FF uses)"
        )
    originals: dict[int, dict[str, torch.Tensor]] = {}
    for j in layers:
        layer = adapter.layers(model, stack)[j]
        modules = adapter.ff_modules(model, stack, j)
        saved: dict[str, torch.Tensor] = {}
        if spec.ff_norm is not None:
            norm = get_submodule(layer, spec.ff_norm)
            g = norm.weight.detach().clone()
            b = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else None
            for role, _ in spec.ff_in:
                module = modules[role]
                weight = _as_out_in(module)  # [neurons, d] view
                if b is not None:
                    if module.bias is None:
                        raise ValueError(f"{stack} layer {j}: the norm has a bias but {role} has none to take it")
                    module.bias.add_(weight @ b.to(weight.dtype))
                weight.mul_(g.to(weight.dtype))
            norm.weight.fill_(1.0)
            if b is not None:
                norm.bias.zero_()
            saved["norm_weight"] = g
            if b is not None:
                saved["norm_bias"] = b
        if spec.ff_scale is not None:
            scale_module = get_submodule(layer, spec.ff_scale)
            (name, param), *_ = scale_module.named_parameters(recurse=False)
            lam = param.detach().clone()
            out = modules["out"]
            _as_out_in(out, side="out").mul_(lam.to(out.weight.dtype)[:, None])
            if out.bias is not None:
                out.bias.mul_(lam.to(out.bias.dtype))
            param.fill_(1.0)
            saved["scale"] = lam
        originals[j] = saved
    return originals


def _as_out_in(module: nn.Module, side: str = "in") -> torch.Tensor:
    """The weight as ``[outputs, inputs]`` (a view, so in-place edits reach the module), Linear or Conv1D."""
    weight = module.weight
    transposed = neuron_axis(module, side) != (0 if side == "in" else 1)
    return weight.t() if transposed else weight


def folded_inputs(x: torch.Tensor, saved: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A norm's output expressed before its affine: ``(x - b) / g``; channels with ``g == 0`` are zeroed,
    which is exact because the folded weights' columns for them are zero."""
    if "norm_weight" not in saved:
        return x
    g = saved["norm_weight"].to(x.dtype)
    shifted = x - saved["norm_bias"].to(x.dtype) if "norm_bias" in saved else x
    safe = torch.where(g == 0, torch.ones_like(g), g)
    return torch.where(g == 0, torch.zeros_like(shifted), shifted / safe)


def folded_targets(y: torch.Tensor, saved: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return y * saved["scale"].to(y.dtype) if "scale" in saved else y


# ----------------------------------------------------------------------------------------------------------
# Reconstruction data
# ----------------------------------------------------------------------------------------------------------


def store_data(store: FeatureStore, stack: str, layers: list[int]) -> MemberData:
    """Each member's original FF inputs and outputs from the feature cache (kinds ``ff_in``, ``ff_out``)."""
    missing = {"ff_in", "ff_out"} - set(store.manifest.get("kinds", []))
    if missing:
        raise ValueError(
            f"the feature cache {store.root} has no {sorted(missing)} features, which repair needs; it was written "
            f"by an older ffmerge. Delete {store.root} and rerun the cache_features step"
        )
    x = {j: store.load(stack, "ff_in", j).float() for j in layers}
    y = {j: store.load(stack, "ff_out", j).float() for j in layers}
    return MemberData(stack, list(layers), x, y)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    windows: Mapping[str, list[int]],
    batches: Iterable[Mapping[str, Any]],
    n_tokens: int | Mapping[str, int],
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, torch.Tensor]]:
    """The FF inputs the model's own layers see on the calibration batches (first ``n_tokens`` positions, one
    count for every stack or ``{stack: count}``, as the feature cache took them).

    The members of a merged window share one module object, so a hook on it alone cannot tell the layers
    apart: a pre-hook on each member *layer* names the layer that is running, and the shared input
    projection's hook files its input under that name (layers run in order within a stack).
    """
    adapter = get_adapter(model)
    rows: dict[str, dict[int, list[torch.Tensor]]] = {s: {j: [] for j in js} for s, js in windows.items()}
    running: dict[str, int | None] = {s: None for s in windows}
    masks: dict[str, torch.Tensor] = {}
    taken = {s: 0 for s in windows}
    budget = {s: n_tokens[s] if isinstance(n_tokens, Mapping) else n_tokens for s in windows}

    def on_layer(stack: str, j: int | None) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any = None) -> None:
            running[stack] = j

        return hook

    def on_input(stack: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            j = running[stack]
            if j is not None and stack in masks:
                rows[stack][j].append(args[0][masks[stack]].float().cpu())

        return hook

    with ExitStack() as hooks:
        for stack, js in windows.items():
            spec = adapter.stack(stack)
            layer_list = adapter.layers(model, stack)
            for j, layer in enumerate(layer_list):
                hooks.callback(layer.register_forward_pre_hook(on_layer(stack, j if j in js else None)).remove)
            # one hook per distinct module: a merged window's members share theirs
            shared = {id(m): m for m in (adapter.ff_modules(model, stack, j)[spec.ff_in[0][0]] for j in js)}
            for module in shared.values():
                hooks.callback(module.register_forward_pre_hook(on_input(stack)).remove)
        forward = trunk_forward(adapter)
        model.eval()
        for batch in batches:
            if all(taken[s] >= budget[s] for s in windows):
                break
            masks.clear()
            for stack in windows:
                mask = first_positions(batch["token_masks"][stack].to(torch.bool), budget[stack] - taken[stack])
                if mask.any():
                    masks[stack] = mask.to(device)
                    taken[stack] += int(mask.sum())
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "token_masks"}
            forward(model, inputs)
    short = {s: t for s, t in taken.items() if t < budget[s]}
    if short:
        raise ValueError(f"the calibration data ran out after {short} tokens; {n_tokens} were asked for")
    return {s: {j: torch.cat(parts) for j, parts in per.items()} for s, per in rows.items()}


# ----------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------


def error_sums(
    blocks: Mapping[int, Callable[[torch.Tensor], torch.Tensor]], data: MemberData, chunk: int = 4096
) -> tuple[float, float]:
    """``(sum_l ||blocks[l](x_l) - y_l||^2, sum_l ||y_l||^2)`` over every cached position, each member through its
    own block (FiPS factorises every member separately; a merge's members share one)."""
    err = energy = 0.0
    with torch.no_grad():
        for j in data.layers:
            for s in range(0, len(data.x[j]), chunk):
                y = data.y[j][s : s + chunk]
                err += float((blocks[j](data.x[j][s : s + chunk]) - y).pow(2).sum())
                energy += float(y.pow(2).sum())
    return err, energy


def relative_error(block: Callable[[torch.Tensor], torch.Tensor], data: MemberData, chunk: int = 4096) -> float:
    """``sum_l ||block(x_l) - y_l||^2 / sum_l ||y_l||^2`` over every cached position."""
    err, energy = error_sums(dict.fromkeys(data.layers, block), data, chunk)
    return err / max(energy, 1e-30)


@torch.no_grad()
def lstsq_output(adapter: ModelAdapter, model: nn.Module, stack: str, anchor: int, data: MemberData, ridge: float):
    """Set the shared output projection (and bias) to the ridge least-squares solution over all members.

    Its input is the hidden activation of the (merged) input side, so the solve is one [n + 1]^2 system for
    the whole window: ``min_W sum_l ||h_l W^T + b - y_l||^2 + ridge * tr(H^T H) / n * ||W||^2``.
    """
    modules = adapter.ff_modules(model, stack, anchor)
    out = modules["out"]
    captured: list[torch.Tensor] = []
    hook = out.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        block = adapter.ff_forward(model, stack, anchor)
        gram = targets = None
        for j in data.layers:
            captured.clear()
            block(data.x[j])
            h = captured[0].double()
            h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if out.bias is not None else h
            g, t = h.T @ h, h.T @ data.y[j].double()
            gram = g if gram is None else gram + g
            targets = t if targets is None else targets + t
    finally:
        hook.remove()
    n = gram.shape[0]
    gram += ridge * gram.diagonal().mean() * torch.eye(n, dtype=gram.dtype)
    solution = torch.linalg.solve(gram, targets)  # [n (+1), d]
    weight = solution[: out.weight.shape[neuron_axis(out, "out")]]
    _as_out_in(out, side="out").copy_(weight.T.to(out.weight.dtype))
    if out.bias is not None:
        out.bias.copy_(solution[-1].to(out.bias.dtype))


Picks = list[tuple[int, torch.Tensor]]
"""One step's positions: ``(member layer, row indices into its cached inputs)`` for every member."""


def batched_error(block: Callable[[torch.Tensor], torch.Tensor], data: MemberData, picks: Picks) -> torch.Tensor:
    """The sum over members of each member's mean squared error on its picked positions.

    Every member has the same number of positions per step, so that sum is the error summed over the
    concatenated rows divided by that number: one pass of the block over all members' rows instead of one
    small pass per member (on SmolLM2's 11-layer window, 1,540 rows in one matmul instead of 11 of 140: 0.30
    against 0.32-0.39 s per step on one thread at 82 GFLOPS, losses equal to 2e-7, ``benchmarks/repair_cost.py``).
    """
    x = torch.cat([data.x[j][pick] for j, pick in picks])
    y = torch.cat([data.y[j][pick] for j, pick in picks])
    diff = block(x) - y
    if data.weights is not None:
        rows = torch.cat([torch.full((len(pick),), data.weights[j]) for j, pick in picks])
        diff = diff * rows.sqrt().to(diff.dtype)[:, None]
    return diff.pow(2).sum() / len(picks[0][1])


def fit_block(
    adapter: ModelAdapter,
    model: nn.Module,
    stack: str,
    anchor: int,
    data: MemberData,
    cfg: RepairConfig,
    error: Callable[[Callable[[torch.Tensor], torch.Tensor], MemberData, Picks], torch.Tensor] = batched_error,
) -> list[float]:
    """Adam on the shared block's parameters against the summed relative error; returns the loss per step.

    ``error`` computes a step's summed error from the drawn positions (a benchmark passes the per-member form).
    """
    modules = adapter.ff_modules(model, stack, anchor)
    params = list({id(p): p for m in modules.values() for p in m.parameters()}.values())
    block = adapter.ff_forward(model, stack, anchor)
    energies = {j: float(data.y[j].pow(2).sum(1).mean()) for j in data.layers}
    if cfg.normalize == "member":  # each member's relative error, averaged
        data = MemberData(data.stack, data.layers, data.x, data.y, {j: 1 / max(e, 1e-30) for j, e in energies.items()})
        energy = float(len(data.layers))
    else:
        energy = sum(energies.values())
    return adam_fit(
        params,
        lambda picks: error(block, data, picks) / energy,
        data,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
    )


def adam_fit(
    params: list[nn.Parameter],
    loss: Callable[[Picks], torch.Tensor],
    data: MemberData,
    *,
    steps: int,
    lr: float,
    batch_tokens: int,
    seed: int,
    before_step: Callable[[int], Any] | None = None,
) -> list[float]:
    """The block-reconstruction loop of the repair and of FiPS: ``steps`` Adam steps on ``params``, each on
    ``batch_tokens`` positions drawn evenly over the members (seeded, member by member); ``before_step(step)``
    runs first in every step (FiPS prunes there). Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    per_member = -(-batch_tokens // len(data.layers))
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            if before_step is not None:
                before_step(step)
            optimizer.zero_grad(set_to_none=True)
            picks = [(j, torch.randint(len(data.x[j]), (per_member,), generator=generator)) for j in data.layers]
            value = loss(picks)
            value.backward()
            optimizer.step()
            losses.append(value.item())
    return losses


def merge_and_repair(
    model: nn.Module,
    plan: MergePlan,
    store: FeatureStore,
    cfg: RepairConfig,
    *,
    calibration: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Apply ``plan`` (fold, permute, average, tie) and repair every stack window in place.

    Returns what was done with the relative error after merging, after the least-squares start and after the
    fit, per stack (encoder-decoder stacks are repaired each on its own). ``calibration`` yields the
    calibration batches; only ``inputs: merged`` needs it.
    """
    from .merge import apply_plan

    return build_and_repair(
        model,
        [(a.stack, a.anchor, list(a.layers)) for a in plan.stacks],
        lambda: apply_plan(model, plan),
        store,
        cfg,
        calibration=calibration,
        device=device,
    )


def build_and_repair(
    model: nn.Module,
    shared: Sequence[tuple[str, int, list[int]]],
    build: Callable[[], Any],
    store: FeatureStore,
    cfg: RepairConfig,
    *,
    calibration: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fold (if configured), ``build()`` the shared blocks, then repair each: ``shared`` lists ``(stack, anchor,
    members)``, the layer whose FF modules every member holds after ``build`` and the members it serves. Any
    construction of shared blocks (a merge, several groups of one stack, :mod:`ffmerge.wide`'s widened block) is
    repaired alike. The report is keyed by stack, or ``stack#k`` where a stack has several blocks."""
    adapter = get_adapter(model)
    windows: dict[str, list[int]] = {}
    for stack, _, layers in shared:
        windows[stack] = sorted({*windows.get(stack, []), *layers})
    folded = {stack: fold_scales(model, stack, layers) for stack, layers in windows.items()} if cfg.fold else {}
    build()
    data = {stack: store_data(store, stack, layers) for stack, layers in windows.items()}
    for stack, saved in folded.items():
        d = data[stack]
        d.y = {j: folded_targets(d.y[j], saved[j]) for j in d.layers}
        if cfg.inputs == "original":  # inputs captured from the merged model are already in the folded space
            d.x = {j: folded_inputs(d.x[j], saved[j]) for j in d.layers}
    if cfg.inputs == "merged":
        if calibration is None:
            raise ValueError("repair.inputs: merged needs the calibration batches")
        n_tokens = {stack: len(d.y[d.layers[0]]) for stack, d in data.items()}  # what the cache holds per stack
        captured = capture_inputs(model, windows, calibration(), n_tokens, device)
        for stack, per_layer in captured.items():
            data[stack].x = {j: x.to(data[stack].y[j].device) for j, x in per_layer.items()}
    report: dict[str, Any] = {"config": {k: v for k, v in asdict(cfg).items() if k != "enabled"}, "stacks": {}}
    blocks = Counter(stack for stack, _, _ in shared)
    seen: Counter[str] = Counter()
    for stack, anchor, layers in shared:
        started = time.perf_counter()
        seen[stack] += 1
        key = stack if blocks[stack] == 1 else f"{stack}#{seen[stack]}"
        whole = data[stack]
        d = MemberData(stack, list(layers), {j: whole.x[j] for j in layers}, {j: whole.y[j] for j in layers})
        block = adapter.ff_forward(model, stack, anchor)
        stats: dict[str, Any] = {"layers": d.layers, "tokens": len(d.x[d.layers[0]])}
        stats["error_merged"] = after = before = relative_error(block, d)
        if before > cfg.tolerance:
            modules = adapter.ff_modules(model, stack, anchor)
            merged = {k: v.clone() for k, v in _block_state(modules).items()}
            if cfg.lstsq:
                lstsq_output(adapter, model, stack, anchor, d, cfg.ridge)
                stats["error_lstsq"] = relative_error(block, d)
            if cfg.steps:
                losses = fit_block(adapter, model, stack, anchor, d, cfg)
                stats["loss_first_last"] = [losses[0], losses[-1]]
            after = relative_error(block, d)
            if after >= before:  # a fit that made the block worse is undone
                with torch.no_grad():
                    for key, value in _block_state(modules).items():
                        value.copy_(merged[key])
                stats["reverted"], after = True, before
        stats["error_repaired"] = after
        stats["seconds"] = round(time.perf_counter() - started, 2)
        log.info(f"repair {key}: {stats}")
        report["stacks"][key] = stats
    return report


def _block_state(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The shared block's parameters by role, e.g. ``{"gate.weight": ..., "out.bias": ...}``."""
    return {f"{role}.{name}": p for role, m in modules.items() for name, p in m.named_parameters()}
