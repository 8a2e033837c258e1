"""Tiny random-weight models, one per supported architecture family, with inputs and a comparable output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as T

VOCAB = 97
HIDDEN = 32
FF = 48
LAYERS = 5


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Generator], dict[str, Any]]
    output: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]
    token_masks: Callable[[dict[str, Any]], dict[str, torch.Tensor]]
    generates: bool = False


def _ids(g: torch.Generator, batch: int = 3, length: int = 11) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _text_inputs(g: torch.Generator) -> dict[str, Any]:
    ids = _ids(g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # one padded row: padding must never count as a token
    return {"input_ids": ids, "attention_mask": mask}


def _image_inputs(g: torch.Generator) -> dict[str, Any]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _seq2seq_inputs(g: torch.Generator) -> dict[str, Any]:
    inputs = _text_inputs(g)
    inputs["decoder_input_ids"] = _ids(g, length=7)
    return inputs


def _whisper_inputs(g: torch.Generator) -> dict[str, Any]:
    return {"input_features": torch.randn(2, 8, 32, generator=g), "decoder_input_ids": _ids(g, batch=2, length=6)}


def _logits(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).logits


def _hidden(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs).last_hidden_state


def _text_masks(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"decoder": inputs["attention_mask"].bool()}


def _encoder_masks(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    if "pixel_values" in inputs:
        b = inputs["pixel_values"].shape[0]
        return {"encoder": torch.ones(b, 1 + 16, dtype=torch.bool)}  # CLS + (16 / 4)^2 patches
    return {"encoder": inputs["attention_mask"].bool()}


def _seq2seq_masks(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    enc = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
    if enc is None:  # whisper: the encoder halves the frame count with its stride-2 convolution
        b, _, frames = inputs["input_features"].shape
        enc = torch.ones(b, frames // 2, dtype=torch.bool)
    return {"encoder": enc, "decoder": torch.ones_like(inputs["decoder_input_ids"], dtype=torch.bool)}


_LM = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=FF,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENC = dict(hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=4)
_IMG = dict(image_size=16, patch_size=4, num_channels=3)
_S2S = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    encoder_ffn_dim=FF,
    decoder_ffn_dim=FF + 8,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS - 1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
    max_position_embeddings=64,
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2",
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_inner=FF,
                n_layer=LAYERS,
                n_head=4,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            )
        ),
        _text_inputs,
        _logits,
        _text_masks,
        generates=True,
    ),
    "llama": Family(
        "llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(**_LM)), _text_inputs, _logits, _text_masks, generates=True
    ),
    "mistral": Family(
        "mistral",
        lambda: T.MistralForCausalLM(T.MistralConfig(**_LM)),
        _text_inputs,
        _logits,
        _text_masks,
        generates=True,
    ),
    "qwen2": Family(
        "qwen2", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_LM)), _text_inputs, _logits, _text_masks, generates=True
    ),
    "gemma3_text": Family(
        "gemma3_text",
        lambda: T.Gemma3ForCausalLM(
            T.Gemma3TextConfig(
                **_LM,
                head_dim=8,
                sliding_window=4,
                layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2,
            )
        ),
        _text_inputs,
        _logits,
        _text_masks,
        generates=True,
    ),
    "vit": Family(
        "vit",
        lambda: T.ViTForImageClassification(T.ViTConfig(**_ENC, **_IMG, num_labels=5)),
        _image_inputs,
        _logits,
        _encoder_masks,
    ),
    "dinov2": Family(
        "dinov2", lambda: T.Dinov2Model(T.Dinov2Config(**_ENC, **_IMG)), _image_inputs, _hidden, _encoder_masks
    ),
    "bert": Family(
        "bert",
        lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, **_ENC, pad_token_id=0)),
        _text_inputs,
        _logits,
        _encoder_masks,
    ),
    "marian": Family(
        "marian",
        lambda: T.MarianMTModel(T.MarianConfig(**_S2S)),
        _seq2seq_inputs,
        _logits,
        _seq2seq_masks,
        generates=True,
    ),
    "whisper": Family(
        "whisper",
        lambda: T.WhisperForConditionalGeneration(
            T.WhisperConfig(**_S2S, num_mel_bins=8, max_source_positions=16, max_target_positions=64)
        ),
        _whisper_inputs,
        _logits,
        _seq2seq_masks,
    ),
}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A family's model (eval mode, fixed seed) and a batch of inputs for it."""
    torch.manual_seed(seed)
    family = FAMILIES[name]
    model = family.build().eval()
    return model, family.inputs(torch.Generator().manual_seed(seed + 1))


def calibration_batches(name: str, n: int, seed: int = 5):
    """``n`` random input batches of family ``name`` with their token masks, as the feature cache wants."""
    g = torch.Generator().manual_seed(seed)
    family = FAMILIES[name]
    for _ in range(n):
        inputs = family.inputs(g)
        yield {**inputs, "token_masks": family.token_masks(inputs)}
