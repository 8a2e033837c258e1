"""Permute, average and tie FF sublayers so that one parameter set serves a whole window of layers.

Tying is done by module identity: after a merge every layer of the window holds the *same* projection
modules as the anchor, so the parameters exist once (``model.num_parameters()`` drops by (k-1) FF blocks),
an optimizer step moves all of them together, and ``ffmerge.checkpoint`` stores them once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter, neuron_axis, set_submodule
from .align import MergePlan, StackAlignment


@torch.no_grad()
def permute_ff(adapter: ModelAdapter, model: nn.Module, stack: str, layer: int, perm: Sequence[int]) -> None:
    """Reorder one FF block's hidden neurons in place; the block computes exactly the same function.

    Rows (neuron axis) of every input projection and its bias move together with the columns of the
    output projection. The output bias lives in model space and does not move.
    """
    modules = adapter.ff_modules(model, stack, layer)
    index = torch.as_tensor(perm, dtype=torch.long, device=modules["out"].weight.device)  # GPU models too
    n = modules["out"].weight.shape[neuron_axis(modules["out"], "out")]
    if sorted(perm) != list(range(n)):
        raise ValueError(f"{stack} layer {layer}: not a permutation of {n} neurons")
    for role, module in modules.items():
        side = "out" if role == "out" else "in"
        axis = neuron_axis(module, side)
        module.weight.copy_(module.weight.index_select(axis, index))
        if side == "in" and module.bias is not None:
            module.bias.copy_(module.bias[index])


@torch.no_grad()
def merge_window(adapter: ModelAdapter, model: nn.Module, alignment: StackAlignment) -> None:
    """Permute the window's members onto the anchor, average them, and make every member share it."""
    for j, perm in alignment.perms.items():
        permute_ff(adapter, model, alignment.stack, j, perm)
    anchor = adapter.ff_modules(model, alignment.stack, alignment.anchor)
    members = [adapter.ff_modules(model, alignment.stack, j) for j in alignment.layers]
    for role, module in anchor.items():
        for name, param in module.named_parameters(recurse=False):
            stacked = torch.stack([getattr(m[role], name).float() for m in members])
            param.copy_(stacked.mean(0).to(param.dtype))
    tie_window(adapter, model, alignment.stack, alignment.anchor, alignment.layers)


def tie_window(
    adapter: ModelAdapter, model: nn.Module, stack: str, anchor: int, layers: Sequence[int]
) -> dict[str, nn.Module]:
    """Make every layer of ``layers`` hold the anchor's FF modules (the same objects); returns them by role.

    The other members' FF modules leave the model, so their parameters are gone; whatever the anchor's modules
    hold (an average, or fresh weights in :mod:`ffmerge.tie_random`) now serves the whole window.
    """
    spec = adapter.stack(stack)
    layer_list = adapter.layers(model, stack)
    shared = adapter.ff_modules(model, stack, anchor)
    for j in layers:
        for path, module in zip(spec.ff_paths, shared.values(), strict=True):
            set_submodule(layer_list[j], path, module)
    return shared


def apply_plan(model: nn.Module, plan: MergePlan) -> nn.Module:
    """Merge and tie every stack window of ``plan`` in place; returns the model for chaining."""
    adapter = get_adapter(model)
    if plan.method == "vanilla" and any(s.perms for s in plan.stacks):
        raise ValueError("a vanilla plan must not carry permutations")
    for alignment in plan.stacks:
        merge_window(adapter, model, alignment)
    return model


def ff_block_groups(model: nn.Module, stack: str) -> list[list[int]]:
    """Layers grouped by the FF modules they share: ``[[0], [1, 2, 3], [4]]`` after merging 1-3."""
    adapter = get_adapter(model)
    groups: dict[int, list[int]] = {}
    for i in range(adapter.num_layers(model, stack)):
        groups.setdefault(id(adapter.ff_modules(model, stack, i)["out"]), []).append(i)
    return list(groups.values())
