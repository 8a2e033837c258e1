"""Size accounting as the paper reports it: parameters with embeddings, FF blocks removed, bytes.

Counting distinct tensors (not names) is what makes tied layers count once; the int8 figure mirrors
LLM.int8() storage of linear weights (one byte per weight plus one float32 scale per output row), with
everything else kept at its current dtype. A FiPS model's sparse factors (:class:`ffmerge.fips.FactorLinear`)
count what their checkpoint stores: the kept values, plus their index (a bitmask) as ``index_bytes`` and, in
``parameters``, as the float32 parameters those bytes would hold, so that no budget is met by hiding an index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import get_adapter
from .ffdrop import deleted_ff
from .fips import FactorLinear
from .merge import ff_block_groups


@dataclass
class SizeReport:
    parameters: int
    ff_parameters: int
    ff_blocks: int
    ff_blocks_removed: int
    """FF blocks saved by tying (merging) or deleted outright (ffdrop); dropped layers are gone from the model
    and not counted here."""
    bytes: int
    bytes_int8_linear: int
    index_bytes: int = 0
    """Bytes of sparse-index metadata (FiPS's bitmasks), included in ``bytes`` and, divided by 4, in
    ``parameters``; 0 for dense models."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # deduplicated by identity


def _stored_counts(model: nn.Module) -> tuple[dict[int, int], int]:
    """``({id(parameter): values stored}, index bytes)`` for the sparse factors of FiPS blocks; every other
    parameter is stored whole."""
    stored, index = {}, 0
    for module in model.modules():
        if isinstance(module, FactorLinear):
            values, index_bytes = module.stored()
            stored[id(module.coeffs)] = values
            index += index_bytes
    return stored, index


def _int8_bytes(model: nn.Module, stored: dict[int, int], index: int) -> int:
    """Bytes if every linear weight were int8 with one float32 scale per output feature (``stored``, ``index``:
    :func:`_stored_counts`)."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_weights: dict[int, int] = {}
    for module in model.modules():
        # LLM.int8() keeps the output head in high precision (bitsandbytes skips it by default)
        if isinstance(module, (nn.Linear, Conv1D)) and module is not output_embeddings:
            w = module.weight
            out_features = w.shape[0] if isinstance(module, nn.Linear) else w.shape[1]
            linear_weights[id(w)] = w.numel() + 4 * out_features
    total = index
    for p in _unique_params(model):
        total += linear_weights.get(id(p), stored.get(id(p), p.numel()) * p.element_size())
    return total


def size_report(model: nn.Module) -> SizeReport:
    """Sizes of ``model`` as it is now (merged, dropped or original)."""
    adapter = get_adapter(model)
    stored, index = _stored_counts(model)
    index_params = math.ceil(index / 4)
    ff_params: dict[int, int] = {}
    blocks = removed = 0
    for spec in adapter.stacks:
        for i in range(adapter.num_layers(model, spec.name)):
            for module in adapter.ff_modules(model, spec.name, i).values():
                for p in module.parameters():
                    ff_params[id(p)] = stored.get(id(p), p.numel())
        deleted = set(deleted_ff(model).get(spec.name, []))
        groups = [g for g in ff_block_groups(model, spec.name) if g[0] not in deleted]
        blocks += len(groups)
        removed += sum(len(g) - 1 for g in groups) + len(deleted)
    params = _unique_params(model)
    return SizeReport(
        parameters=sum(stored.get(id(p), p.numel()) for p in params) + index_params,
        ff_parameters=sum(ff_params.values()) + index_params,
        ff_blocks=blocks,
        ff_blocks_removed=removed,
        bytes=sum(stored.get(id(p), p.numel()) * p.element_size() for p in params) + index,
        bytes_int8_linear=_int8_bytes(model, stored, index),
        index_bytes=index,
    )
