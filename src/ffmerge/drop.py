"""The paper's baseline: remove a window of whole layers (attention and FF) instead of merging FFs.

Besides shortening the layer list, the config must agree with the new depth: the layer count is read by
caches and ``generate()``, per-layer lists such as ``layer_types`` are indexed by layer, and attention
modules carry a ``layer_idx`` that addresses the KV cache.
"""

from __future__ import annotations

from torch import nn

from .adapters import get_adapter, get_submodule, set_submodule


def drop_layers(model: nn.Module, windows: dict[str, tuple[int, int]]) -> nn.Module:
    """Remove ``count`` layers from ``start`` in each named stack (``{stack: (start, count)}``), in place."""
    adapter = get_adapter(model)
    for stack, (start, count) in windows.items():
        spec = adapter.stack(stack)
        layers = adapter.layers(model, stack)
        n = len(layers)
        if count < 1 or start < 0 or start + count > n or count >= n:
            raise ValueError(f"cannot drop {count} layers from {start} in {stack} with {n} layers")
        kept = [layer for i, layer in enumerate(layers) if not start <= i < start + count]
        set_submodule(adapter.base(model), spec.layers, nn.ModuleList(kept))
        adapter.set_num_layers(model.config, stack, len(kept))
        for key in spec.per_layer_keys:
            values = getattr(model.config, key, None)
            if isinstance(values, list) and len(values) == n:
                setattr(model.config, key, values[:start] + values[start + count :])
        for new_idx, layer in enumerate(get_submodule(adapter.base(model), spec.layers)):
            for module in layer.modules():
                if getattr(module, "layer_idx", None) is not None:
                    module.layer_idx = new_idx
    return model
