"""Architecture adapters, looked up by the transformers ``model_type``.

To add a family: write ``adapters/<family>.py`` with a ``ModelAdapter`` subclass that sets
``model_types`` and ``stacks`` (module paths), and add it to ``ADAPTERS`` below.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .base import ModelAdapter, StackSpec, get_submodule, neuron_axis, set_submodule
from .bert import BertAdapter
from .dinov2 import Dinov2Adapter
from .gemma3 import Gemma3Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .seq2seq import Seq2SeqAdapter, WhisperAdapter
from .vit import ViTAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    GPT2Adapter,
    LlamaAdapter,
    Gemma3Adapter,
    ViTAdapter,
    Dinov2Adapter,
    BertAdapter,
    Seq2SeqAdapter,
    WhisperAdapter,
)

_BY_TYPE: dict[str, type[ModelAdapter]] = {t: cls for cls in ADAPTERS for t in cls.model_types}


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def get_adapter(model_or_config: PreTrainedModel | PretrainedConfig | str) -> ModelAdapter:
    """The adapter for a model, its config, or a bare ``model_type`` string."""
    if isinstance(model_or_config, str):
        model_type, config = model_or_config, None
    else:
        config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
        model_type = config.model_type
    try:
        adapter = _BY_TYPE[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"ffmerge has no adapter for model_type {model_type!r}. Supported: "
            f"{', '.join(supported_model_types())}. To add one, write src/ffmerge/adapters/<family>.py with a "
            "ModelAdapter subclass naming the layer list and FF/attention modules (see llama.py), and register "
            "it in ffmerge.adapters.ADAPTERS."
        ) from None
    if config is not None:
        adapter.check_config(config)
    return adapter


__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "StackSpec",
    "UnsupportedModelError",
    "get_adapter",
    "get_submodule",
    "neuron_axis",
    "set_submodule",
    "supported_model_types",
]
