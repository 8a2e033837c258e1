"""The exact-budget control for merging: delete FF sublayers outright, keep every attention sublayer.

Merging a window of k layers removes k-1 FF blocks and keeps attention; dropping whole layers removes
attention too, so it is matched to a merge only roughly. Deleting the same number of FF sublayers (and
nothing else) removes exactly the parameters a merge removes. If a merge does not beat this control, the
merged weights carry no information worth their tying.

A deleted FF sublayer is replaced by parameter-free modules: the input projections return zero neurons and
the output projection returns zeros of the model width, so the layer's residual stream gets nothing from its
FF, the pre-FF norm still runs (as it does in a merged layer), and no special case is needed in any
architecture's forward. The modules are found again by type when a checkpoint is saved and re-created
before one is loaded (:mod:`ffmerge.checkpoint`), because the config alone cannot describe them.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import get_adapter, neuron_axis, set_submodule


class NoNeurons(nn.Module):
    """Stands in for an FF input projection with zero hidden neurons: ``[..., d] -> [..., 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class ZeroOutput(nn.Module):
    """Stands in for an FF output projection of a block without neurons: always zeros of the model width."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}"


def is_deleted(modules: dict[str, nn.Module]) -> bool:
    """Whether an FF block (``adapter.ff_modules`` of one layer) was deleted by :func:`delete_ff`."""
    return isinstance(modules["out"], ZeroOutput)


def delete_ff(model: nn.Module, layers: dict[str, list[int]]) -> nn.Module:
    """Delete the FF sublayers ``{stack: [layer, ...]}`` in place; their parameters leave the model."""
    adapter = get_adapter(model)
    for stack, indices in layers.items():
        spec = adapter.stack(stack)
        n = adapter.num_layers(model, stack)
        for i in indices:
            if not 0 <= i < n:
                raise ValueError(f"cannot delete the FF sublayer of {stack} layer {i}: the stack has {n} layers")
            modules = adapter.ff_modules(model, stack, i)
            if is_deleted(modules):
                continue
            out = modules["out"]
            width = out.weight.shape[1 - neuron_axis(out, "out")]
            layer = adapter.layers(model, stack)[i]
            for _, path in spec.ff_in:
                set_submodule(layer, path, NoNeurons())
            set_submodule(layer, spec.ff_out, ZeroOutput(width))
    return model


def deleted_ff(model: nn.Module) -> dict[str, list[int]]:
    """The FF sublayers deleted so far, ``{stack: [layer, ...]}`` (stacks without any are left out)."""
    adapter = get_adapter(model)
    found = {
        spec.name: [
            i
            for i in range(adapter.num_layers(model, spec.name))
            if is_deleted(adapter.ff_modules(model, spec.name, i))
        ]
        for spec in adapter.stacks
    }
    return {stack: indices for stack, indices in found.items() if indices}


def ffdrop_layers(windows: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """A window ``{stack: (start, count)}`` as the layer lists :func:`delete_ff` takes."""
    return {stack: list(range(start, start + count)) for stack, (start, count) in windows.items()}
