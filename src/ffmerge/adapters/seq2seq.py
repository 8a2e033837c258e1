"""Encoder-decoder models with BART-style layers (Marian/OPUS-MT, Whisper): two stacks, merged in sync.

Marian's layers are post-norm (the norm after the residual add feeds the next sublayer and the residual
stream alike), so nothing folds into its FF; Whisper's are pre-norm, and ``final_layer_norm`` feeds only fc1.
"""

from .base import ModelAdapter, StackSpec


def _stack(name: str, ff_norm: str | None = None) -> StackSpec:
    return StackSpec(
        name=name,
        layers=f"{name}.layers",
        ff_in=(("in", "fc1"),),
        ff_out="fc2",
        ff_act="activation_fn",
        attn_out="self_attn.out_proj",
        num_layers_key=f"{name}_layers",
        ff_norm=ff_norm,
    )


class Seq2SeqAdapter(ModelAdapter):
    model_types = ("marian",)
    stacks = (_stack("encoder"), _stack("decoder"))


class WhisperAdapter(Seq2SeqAdapter):
    model_types = ("whisper",)
    stacks = (_stack("encoder", "final_layer_norm"), _stack("decoder", "final_layer_norm"))
