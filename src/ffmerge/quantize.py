"""LLM.int8() quantization (Dettmers et al., 2022) of merged and tied models through bitsandbytes.

Why a temporary folder: transformers applies ``BitsAndBytesConfig`` only inside ``from_pretrained``. The
quantizer swaps every ``nn.Linear``/``Conv1D`` for a bitsandbytes ``Linear8bitLt`` on the meta device
*before* the weights exist, then quantizes each weight as it is read from the checkpoint. There is no
supported call that quantizes a model already in memory, so :func:`quantize_int8` writes the model as a
plain, untied transformers folder and loads it back with the config.

Why untied, then re-tied: after merging, several layers hold the same module objects.
``save_pretrained`` (transformers 5) refuses shared tensors it was not told about, and the loader would
in any case quantize each layer separately. We record :func:`ffmerge.checkpoint.tie_map` first, write
every layer by value (a fresh model from the config, loaded with the full expanded state dict), quantize
that, and then :func:`ffmerge.checkpoint.apply_ties` points every alias path at the canonical quantized
module, so each shared int8 weight and its scales exist once. The quantized copies made for the aliases
are identical to the canonical one (same float weights in, deterministic row-wise quantization) and are
dropped. Peak memory is therefore about the float model twice plus the untied int8 model, briefly.

CPU: bitsandbytes >= 0.48 ships CPU kernels, and ``from_pretrained(folder,
quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")`` works as is (checked with
bitsandbytes 0.50.2, transformers 5.23, torch 2.13 CPU). Weights are stored as int8 (``Int8Params``) with
one float32 absmax scale per output row (``SCB``). In the forward pass, activations are quantized row-wise
to int8, columns with an activation of magnitude >= ``llm_int8_threshold`` (6.0) go through a float16
matmul against the dequantized weight columns (the "outlier" decomposition), and the rest is an
int8 x int8 -> int32 product, rescaled by both scales. On CPUs with AVX-512 that product is
``torch._int_mm``; otherwise (e.g. AVX2) bitsandbytes' default kernel computes the same integer product in
float32 (exact for these magnitudes), so the numerics are LLM.int8()'s either way, only slower. Inputs in
float32 are cast to float16 for the activation quantization (bitsandbytes logs a warning, "MatMul8bitLt:
inputs will be cast from torch.float32 to float16", on every such call); outputs come back in the input
dtype. The model keeps its floating dtype (float32 here) for everything that is not quantized.

The output head stays in floating point (bitsandbytes' and transformers' default: the output embeddings,
tied embedding weights and the module of the model's last parameter are never converted).
``accelerate`` is required by transformers for any bitsandbytes loading.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Iterable

import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel

from .adapters import get_submodule
from .checkpoint import apply_ties, tie_map

INSTALL_HINT = "pip install 'ffmerge[int8]' (bitsandbytes>=0.45; transformers also needs accelerate)"


def _require(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"int8 quantization needs the {name!r} package, which is missing: {INSTALL_HINT}") from err


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _output_head_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return []
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is head]


def quantize_int8(
    model: PreTrainedModel,
    *,
    device: str | torch.device = "cpu",
    skip_modules: Iterable[str] | None = None,
) -> PreTrainedModel:
    """An LLM.int8() copy of ``model`` (which may be merged and tied); ``model`` itself is not changed.

    Every ``nn.Linear`` / ``Conv1D`` except the output head becomes a bitsandbytes ``Linear8bitLt`` with
    int8 weights; layers that shared modules in ``model`` share the same quantized module objects.
    ``skip_modules`` lists further module names (or patterns, as ``llm_int8_skip_modules`` takes them) to
    keep in floating point; the output head is kept in floating point in any case. ``device`` is where
    the quantized model lives (bitsandbytes supports "cpu" and CUDA among others).
    """
    bnb = _require("bitsandbytes")
    _require("accelerate")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"quantize_int8 needs a transformers PreTrainedModel, got {type(model).__name__}")
    ties = tie_map(model)
    dtype = _float_dtype(model)
    if skip_modules is None:
        skip = None  # transformers' defaults: output head, tied embeddings, last module
    else:
        # an explicit list replaces transformers' defaults: add the output head back ourselves
        skip = sorted(set(skip_modules) | set(_output_head_names(model)))
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    cls = type(model)
    with tempfile.TemporaryDirectory(prefix="ffmerge-int8-") as tmp:
        untied = cls._from_config(model.config, dtype=dtype)
        with torch.no_grad():
            untied.load_state_dict(model.state_dict(), strict=True)  # copies: aliases become separate tensors
        untied.save_pretrained(tmp)
        del untied
        quantized = cls.from_pretrained(tmp, quantization_config=config, device_map={"": str(device)}, dtype=dtype)

    for canon, aliases in ties["modules"].items():
        kind = type(get_submodule(quantized, canon))
        odd = [a for a in aliases if type(get_submodule(quantized, a)) is not kind]
        if odd:
            raise ValueError(
                f"skip_modules treats tied modules differently: {canon} became {kind.__name__} but its aliases "
                f"{odd} did not; skip all of a tied group or none of it"
            )
    for canon, aliases in ties["parameters"].items():
        for name in (canon, *aliases):
            owner = get_submodule(quantized, name.rpartition(".")[0])
            if isinstance(owner, bnb.nn.Linear8bitLt):
                raise NotImplementedError(
                    f"parameter {name} is tied to another module's parameter and would be quantized; "
                    "bitsandbytes keeps scales per module, so such ties cannot be kept. Pass its module in "
                    "skip_modules"
                )
    apply_ties(quantized, ties)
    return quantized.eval()


def int8_size_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the (quantized) model stores, each counted once.

    Counts parameters (int8 weights of ``Linear8bitLt`` and everything left in floating point), persistent
    buffers, and each ``Linear8bitLt``'s per-row float32 scales ``SCB`` (kept on ``weight.SCB`` until the
    first forward pass, then on ``module.state.SCB``; ``state.CB`` is the int8 weight itself). Tensors are
    deduplicated by identity and by storage (data pointer), so tied layers and tied embeddings count once.
    The 1-byte ``weight_format`` entry that bitsandbytes adds to state dicts is synthesised on saving and is
    not stored on the model, so it is not counted. Works on float models too (then it is plain bytes).
    """
    try:
        linear8 = importlib.import_module("bitsandbytes").nn.Linear8bitLt
    except ImportError:
        linear8 = ()
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta" or t.numel() == 0:
            return
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes

    for module in model.modules():  # distinct modules only
        for p in module.parameters(recurse=False):
            add(p)
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                add(b)
        if linear8 and isinstance(module, linear8):
            add(getattr(module.weight, "SCB", None))
            add(getattr(module.weight, "CB", None))
            add(getattr(module.state, "SCB", None))
            add(getattr(module.state, "CB", None))
    return total
