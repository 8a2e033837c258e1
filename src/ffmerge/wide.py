"""One Wide FFN's wide form at a merge's budget (Pires et al. 2023): one FF block, ``w`` times as wide, shared by
every layer of a stack.

Pires et al. share one FF block across a stack and widen it to win back what sharing removed. Here it is made
from a pretrained model at the budget of a merge: at fraction ``f`` a merge keeps ``w = n - removed_count(n, f)``
FF blocks of a stack, so the wide block has ``w`` blocks' worth of neurons (``w x d_ff``), and every layer of the
stack holds it. Its neurons come from the model: the stack is cut into ``w`` contiguous parts of as equal sizes
as possible, each part of two or more layers is merged as the permute merge does (aligned to its first layer,
averaged), and the ``w`` resulting blocks are concatenated along the neuron axis. Input projections (and their
biases) are stacked; the output projection is scaled by ``1 / w`` and its bias is the parts' mean, so every
layer starts from the average of the parts' blocks, that is roughly the average of all the original ones.
Then the repair (if ``repair.enabled``) refits the wide block to every layer's original output, as it refits a
merged window.

Parameters: the wide block has ``w`` blocks' weights and input biases but one output bias, so it keeps at most
what the merge keeps. Compute does not shrink: every layer runs a block ``w`` times as wide (at 1/3 of a
30-layer stack, 20 times the FF cost per token), which the parameter figures do not show.

Encoder-decoder models get one wide block per stack (each at its stack's budget); Pires et al.'s own
encoder-decoder design without decoder FFs is :mod:`ffmerge.onewide`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import get_adapter, neuron_axis, set_submodule
from .align import SolvedPairs, align_window
from .experiments import removed_count
from .features import FeatureStore
from .merge import merge_window
from .repair import RepairConfig, build_and_repair

METHOD = "wide"


def parts(n_layers: int, fraction: str) -> list[tuple[int, int]]:
    """The stack cut into the merge's ``w`` kept blocks: ``[(start, size), ...]``, larger parts first."""
    w = n_layers - removed_count(n_layers, fraction)
    base, extra = divmod(n_layers, w)
    sizes = [base + 1] * extra + [base] * (w - extra)
    starts = [sum(sizes[:k]) for k in range(w)]
    return list(zip(starts, sizes, strict=True))


class WideLinear(nn.Linear):
    """A widened FF projection (``nn.Linear`` in every other respect): its type marks it for checkpoints."""


class WideConv1D(Conv1D):
    """GPT-2's Conv1D, widened: its type marks it for checkpoints."""


def resized(module: nn.Module, side: str, width: int) -> nn.Module:
    """A blank wide projection like ``module`` (Linear or Conv1D, bias or not) with ``width`` FF neurons."""
    axis = neuron_axis(module, side)
    shape = list(module.weight.shape)
    shape[axis] = width
    bias = module.bias is not None
    if isinstance(module, Conv1D):  # weight [in, out]
        new = WideConv1D(shape[1], shape[0])
        if not bias:
            new.bias = None
    else:
        new = WideLinear(shape[1], shape[0], bias=bias)
    return new.to(device=module.weight.device, dtype=module.weight.dtype)


@torch.no_grad()
def concatenate(blocks: list[dict[str, nn.Module]]) -> dict[str, nn.Module]:
    """One block whose neurons are all of ``blocks``' neurons, computing their mean output."""
    w = len(blocks)
    wide: dict[str, nn.Module] = {}
    for role, first in blocks[0].items():
        side = "out" if role == "out" else "in"
        axis = neuron_axis(first, side)
        module = resized(first, side, sum(b[role].weight.shape[axis] for b in blocks))
        weight = torch.cat([b[role].weight for b in blocks], axis)
        module.weight.copy_(weight / w if side == "out" else weight)
        if module.bias is not None:
            biases = [b[role].bias for b in blocks]
            module.bias.copy_(torch.stack(biases).mean(0) if side == "out" else torch.cat(biases))
        wide[role] = module
    return wide


def tie_stack(model: nn.Module, stack: str, modules: Mapping[str, nn.Module]) -> None:
    """Every layer of the stack holds ``modules`` (by role) as its FF block."""
    adapter = get_adapter(model)
    spec = adapter.stack(stack)
    paths = dict((*spec.ff_in, ("out", spec.ff_out)))
    for layer in adapter.layers(model, stack):
        for role, module in modules.items():
            set_submodule(layer, paths[role], module)


def widen(model: nn.Module, store: FeatureStore, fraction: str, solved: SolvedPairs | None = None) -> dict[str, Any]:
    """Build every stack's wide block in place; returns ``{stack: {"parts": [...], "width": neurons}}``."""
    adapter = get_adapter(model)
    layout = {}
    for spec in adapter.stacks:
        windows = parts(adapter.num_layers(model, spec.name), fraction)
        for start, size in windows:
            if size > 1:
                merge_window(adapter, model, align_window(store, spec.name, start, size, solved=solved))
        wide = concatenate([adapter.ff_modules(model, spec.name, start) for start, _ in windows])
        tie_stack(model, spec.name, wide)
        out = wide["out"]
        layout[spec.name] = {"parts": windows, "width": out.weight.shape[neuron_axis(out, "out")]}
    return layout


def build_wide(
    model: nn.Module,
    store: FeatureStore,
    fraction: str,
    repair: RepairConfig | None = None,
    *,
    solved: SolvedPairs | None = None,
    calibration: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The wide form at ``fraction``'s budget, repaired if ``repair.enabled``; returns ``{"wide": layout,
    "repair": report or None}``."""
    adapter = get_adapter(model)
    layout: dict[str, Any] = {}
    if repair is None or not repair.enabled:
        return {"wide": widen(model, store, fraction, solved), "repair": None}
    members = [(s.name, 0, list(range(adapter.num_layers(model, s.name)))) for s in adapter.stacks]
    report = build_and_repair(
        model,
        members,
        lambda: layout.update(widen(model, store, fraction, solved)),
        store,
        repair,
        calibration=calibration,
    )
    return {"wide": layout, "repair": report}


def wide_layout(model: nn.Module) -> dict[str, int]:
    """``{stack: neurons}`` of the stacks that hold a wide block (found by type), which a checkpoint records so
    that :func:`restore_wide` can rebuild the modules before the tensors load."""
    adapter = get_adapter(model)
    found = {}
    for spec in adapter.stacks:
        out = adapter.ff_modules(model, spec.name, 0)["out"]
        if isinstance(out, (WideLinear, WideConv1D)):
            found[spec.name] = out.weight.shape[neuron_axis(out, "out")]
    return found


def restore_wide(model: nn.Module, layout: Mapping[str, int]) -> nn.Module:
    """Give a freshly built model the wide blocks of ``layout`` (blank; the checkpoint's tensors fill them)."""
    adapter = get_adapter(model)
    for stack, width in layout.items():
        block = adapter.ff_modules(model, stack, 0)
        tie_stack(
            model, stack, {role: resized(m, "out" if role == "out" else "in", int(width)) for role, m in block.items()}
        )
    return model
