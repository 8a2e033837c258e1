"""Gemma 3 text models: a GeGLU MLP with Llama's module names, between extra pre/post FF norms.

The norms stay per layer (they are not part of the FF sublayer that the paper merges).
"""

from .llama import LlamaAdapter


class Gemma3Adapter(LlamaAdapter):
    model_types = ("gemma3_text",)
