"""Encoder-decoder models with BART-style layers (Marian/OPUS-MT, Whisper): two stacks, merged in sync."""

from .base import ModelAdapter, StackSpec


def _stack(name: str) -> StackSpec:
    return StackSpec(
        name=name,
        layers=f"{name}.layers",
        ff_in=(("in", "fc1"),),
        ff_out="fc2",
        attn_out="self_attn.out_proj",
        num_layers_key=f"{name}_layers",
    )


class Seq2SeqAdapter(ModelAdapter):
    model_types = ("marian", "whisper")
    stacks = (_stack("encoder"), _stack("decoder"))
