"""Gemma 3 text models: a GeGLU MLP with Llama's module names, between extra pre/post FF norms.

The norms stay per layer (they are not part of the FF sublayer that the paper merges). Gemma's norms scale by
``1 + w`` and its ``post_attention_layernorm`` normalises the attention output, so nothing folds into the FF.
"""

from dataclasses import replace

from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    stacks = tuple(replace(spec, ff_norm=None) for spec in LlamaAdapter.stacks)
