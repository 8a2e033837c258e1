"""Converters from model formats that ship inside offline packages (ONNX, CTranslate2) to transformers.

The only real pretrained vision and speech models that install without the hub come in inference
formats, not as transformers checkpoints. Each converter is one module with a ``convert(path)``
function returning ``(model, preprocessor_or_None, provenance)``; :func:`ffmerge.sources.prepare_model`
runs it once when a source names its ``format``, and every later step loads the saved safetensors folder.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# format name in config -> module that implements ``convert``
CONVERTERS: dict[str, str] = {
    "dinov2_onnx": "ffmerge.convert.dinov2_onnx",
    "whisper_ct2": "ffmerge.convert.whisper_ct2",
}

Converter = Callable[[Path], tuple[Any, Any, dict]]


def get_converter(fmt: str) -> Converter:
    """The ``convert`` function for ``fmt``; unknown formats get the list of known ones."""
    if fmt not in CONVERTERS:
        raise ValueError(f"unknown model format {fmt!r}; known formats: {', '.join(sorted(CONVERTERS))}")
    return importlib.import_module(CONVERTERS[fmt]).convert
