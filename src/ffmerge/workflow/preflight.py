"""Glue between Snakemake and the package: config checks at start-up and job planning."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from .. import sources
from ..adapters import get_adapter
from ..experiments import window_starts


class ConfigError(ValueError):
    pass


RENAMED_KEYS = {
    ("finetune", "fp16"): "finetune.precision: fp16 (or bf16 on Ampere and newer GPUs, fp32 for neither)",
}
"""Keys of earlier releases, with what replaces them: the schema alone would only call them unexpected."""


def check_renamed_keys(config: dict[str, Any]) -> None:
    """Name the replacement of a key an older config still uses; run before schema validation."""
    for name, task in (config.get("tasks") or {}).items():
        for (block, key), replacement in RENAMED_KEYS.items():
            values = task.get(block) if isinstance(task, dict) else None
            if isinstance(values, dict) and key in values:
                raise ConfigError(
                    f"tasks.{name}.{block}.{key} is no longer a setting: write {replacement} instead "
                    f"(your value: {key}: {values[key]})"
                )


def preflight(config: dict[str, Any]) -> None:
    """Checks the JSON schema cannot express, run before any job: packaged assets exist, local models fit."""
    for name, task in config["tasks"].items():
        for key in ("model", "data"):
            source = task[key]
            try:
                if source["kind"] in ("package", "wiki_offline", "espeak_wiki"):
                    sources.locate_package_dir(source["package"])
            except sources.SourceError as err:
                raise ConfigError(f"tasks.{name}.{key}.package: {err}") from None
            try:
                _check_system_assets(source)
            except sources.SourceError as err:
                raise ConfigError(f"tasks.{name}.{key}: {err}") from None
            if key == "model":
                _check_audio_window(name, task)
            if key == "model" and source["kind"] == "local":
                path = Path(source["path"])
                if not (path / "config.json").is_file():
                    raise ConfigError(
                        f"tasks.{name}.model.path: {path} has no config.json (not a transformers folder); point it at "
                        "the folder that save_pretrained wrote (config.json beside the weights)"
                    )
                get_adapter(AutoConfig.from_pretrained(path))
        if task["type"] == "translation":
            for warning in translation_data_warnings(name, task):
                print(f"ffmerge preflight warning: {warning}", file=sys.stderr)
        if task["type"] == "image_classification":
            for warning in image_data_warnings(name, task):
                print(f"ffmerge preflight warning: {warning}", file=sys.stderr)


def translation_data_warnings(name: str, task: dict[str, Any]) -> list[str]:
    """Check the local files a translation task reads before any job runs.

    A missing validation or test file, or a local copy of a hub export without the config's folder, is an error
    (nothing of the task can run). A missing *training* file (``train_source``, the Tatoeba Challenge pairs, which
    no one has by default) is returned as a warning naming the key and how to get the data: the run, or a dry
    run, can be planned without it, and ``prepare_data`` stops with the same message. Hub datasets are not
    contacted here.
    """
    from ..data.translation import POOL_OF, TRAIN_DATA_HINT, hub_load_arguments, local_pool_path

    data = task["data"]
    pools = {POOL_OF[split] for split in task["splits"]}
    warnings = []
    blocks = [("data", data, pools - ({"train"} if data.get("train_source") else set()))]
    if data.get("train_source") and "train" in pools:
        blocks.append(("data.train_source", data["train_source"], {"train"}))
    for key, source, needed in blocks:
        if source["kind"] == "local":
            for pool in sorted(needed):
                path = local_pool_path(source, pool)
                if path.is_file():
                    continue
                message = f"tasks.{name}.{key}.path: {path} (the {pool!r} pool) does not exist"
                if pool == "train":
                    warnings.append(f"{message}; prepare_data will stop without it. {TRAIN_DATA_HINT}")
                else:
                    raise ConfigError(f"{message}; expected 'source<TAB>target' lines (files: {{{pool}: NAME}})")
        elif source["kind"] == "hub" and _looks_local(source.get("path")):
            _, kwargs = hub_load_arguments(source)
            folder = Path(source["path"]) / kwargs.get("data_dir", "")
            if not folder.is_dir():
                raise ConfigError(
                    f"tasks.{name}.{key}: local dataset folder {folder} does not exist (a copy of the hub's Parquet "
                    "export holds one folder per config, e.g. eng-zho/test/0000.parquet; set path, name or data_dir)"
                )
    return warnings


def image_data_warnings(name: str, task: dict[str, Any]) -> list[str]:
    """Check the image source settings before any job runs; return what is missing on this machine.

    Settings that can never work (an augmentation range the wrong way round) are errors. Local folders and
    files that do not exist (yet) are warnings naming the key and what it should hold: a run, or a dry run, can
    be planned without them (the paper config points at an ImageNet copy most machines lack), and prepare_data
    stops with the same message. Hub datasets are not contacted here.
    """
    from ..data.image_sources import ILSVRC_LABEL_FILES, LOCAL_IMAGE_HINT
    from ..data.image_transforms import augment_settings

    data = task["data"]
    try:
        augment_settings(data)
    except sources.SourceError as err:
        raise ConfigError(f"tasks.{name}.{err}") from None
    kind, key = data["kind"], f"tasks.{name}.data"
    expected = {
        "imagefolder": "<pool>/<class>/<image> folders",
        "parquet": "the Parquet export's <config>/<split>/NNNN.parquet files",
        "ilsvrc_val": "the flat ILSVRC2012_val_NNNNNNNN.JPEG validation images",
    }
    warnings = []
    if kind in expected and not Path(data["path"]).is_dir():
        warnings.append(f"{key}.path: {data['path']} does not exist (expected {expected[kind]}). {LOCAL_IMAGE_HINT}")
    if kind == "ilsvrc_val":
        for option in ("labels", "synsets", "devkit_meta"):
            if data.get(option) and not Path(data[option]).is_file():
                warnings.append(f"{key}.{option}: {data[option]} does not exist; prepare_data will stop without it")
        if data.get("train_path") and not Path(data["train_path"]).is_dir():
            warnings.append(
                f"{key}.train_path: {data['train_path']} does not exist (expected one folder of training images per "
                "synset, DIR/n01440764/*.JPEG); prepare_data will stop without it"
            )
        if not data.get("labels") and Path(data["path"]).is_dir():
            folders = (Path(data["path"]), Path(data["path"]).parent)
            if not any((folder / f).is_file() for folder in folders for f in ILSVRC_LABEL_FILES):
                warnings.append(
                    f"{key}.labels is not set and neither {' nor '.join(ILSVRC_LABEL_FILES)} lies in {data['path']} or "
                    "its parent: prepare_data will stop without the ground truth"
                )
    return warnings


def _looks_local(path: str | None) -> bool:
    """A hub source's ``path`` that names a folder on this machine (a local copy) rather than a hub id."""
    return bool(path) and (Path(path).is_absolute() or path.startswith(".") or Path(path).exists())


def _check_audio_window(name: str, task: dict[str, Any]) -> None:
    """Clips longer than the encoder's window would be cut silently by the feature extractor (the reference still
    holds every word), so the longest clip the data may keep must fit the window the model is cut to."""
    window = task["model"].get("audio_window_s")
    if window is None:
        return
    from ..data.speech import SPEECH_DEFAULTS

    max_seconds = (task.get("speech") or {}).get("max_seconds", SPEECH_DEFAULTS["max_seconds"])
    if max_seconds > window:
        raise ConfigError(
            f"tasks.{name}.speech.max_seconds is {max_seconds} s but tasks.{name}.model.audio_window_s is {window} s: "
            f"clips up to {max_seconds} s would be cut to the first {window} s without a word. Set speech.max_seconds "
            f"to at most {window} (longer clips are skipped) or raise audio_window_s to at least {max_seconds}."
        )


def _check_system_assets(source: dict[str, Any]) -> None:
    """Data that comes from Debian packages rather than pip: say which package before any job runs."""
    if source["kind"] == "espeak_wiki":
        from ..data.speech import _espeak_binary

        _espeak_binary()
    if source["kind"] == "fashion_mnist":
        from ..data.images import FASHION_MNIST_DIR, FASHION_MNIST_FILES

        folder = Path(source.get("path", FASHION_MNIST_DIR))
        missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (folder / f).is_file()]
        if missing:
            raise sources.SourceError(
                f"Fashion-MNIST files {missing} not found in {folder}: apt-get install dataset-fashion-mnist "
                "(or set data.path to a folder holding the idx .gz files)"
            )


_SPLIT_COUNT_KEYS = ("n_tokens", "n_images", "n_utterances", "n_pairs")


def check_results_dir(config: dict[str, Any]) -> None:
    """Refuse a results folder whose finished outputs were made with another config, naming the keys that differ.

    Snakemake would rebuild such a task from its first step and overwrite the other config's results (or, with
    ``--rerun-triggers mtime``, mix them with new ones). Only what every later output depends on is compared, as
    recorded by the first two steps (``model/*/ffmerge_source.json``, ``data/splits.json`` or ``seq2seq.json``):
    the model and data sources, the seed, the split sizes, the image size and the speech settings. Changing a
    later block (fine-tuning, selection, ...) is an ordinary rerun of the jobs that read it, not an error.
    """
    differences = results_config_differences(config)
    if differences:
        folders = sorted({line.split(".")[1] for line in differences})
        root = Path(config["results_dir"])
        raise ConfigError(
            f"{root} holds results of another config:\n  "
            + "\n  ".join(differences)
            + f"\nA run would rebuild {', '.join(folders)} from scratch over them. To keep them, set results_dir to a "
            f"new folder; to replace them, delete {', '.join(str(root / task) for task in folders)} first."
        )


def results_config_differences(config: dict[str, Any]) -> list[str]:
    """``tasks.<task>.<key>: recorded ..., config ...`` for every recorded setting the config now gives otherwise."""
    from ..tasks import TASKS

    root = Path(config["results_dir"])
    lines: list[str] = []
    for name, task in config["tasks"].items():
        folder = root / name
        model_dir = folder / "model" / ("backbone" if "probe" in task else "base")
        source_record = _read_record(model_dir / sources.SOURCE_RECORD)
        if source_record is not None and task["type"] in TASKS:
            expected = {"auto_class": TASKS[task["type"]].auto_class, **task["model"]}
            if source_record.get("source") != expected:
                lines.append(_difference(name, "model", source_record.get("source"), expected, model_dir))
        data_record = _read_record(folder / "data" / "splits.json") or (
            (_read_record(folder / "data" / "seq2seq.json") or {}).get("data")
        )
        if data_record is not None:
            lines += _data_differences(name, task, data_record, folder / "data")
    return lines


def _data_differences(name: str, task: dict[str, Any], record: dict[str, Any], where: Path) -> list[str]:
    pairs: dict[str, tuple[Any, Any]] = {
        "seed": (record.get("seed"), task["seed"]),
        "data": (record.get("source"), task["data"]),
    }
    recorded_splits = record.get("splits", {})
    for split in sorted(set(recorded_splits) | set(task["splits"])):
        entry = recorded_splits.get(split, {})
        count = next((entry[k] for k in _SPLIT_COUNT_KEYS if k in entry), None)
        pairs[f"splits.{split}"] = (count, task["splits"].get(split))
    if "image_size" in record and "image_size" in task:
        pairs["image_size"] = (record["image_size"], task["image_size"])
    for key, value in (task.get("speech") or {}).items():
        if key in record.get("speech", {}):
            pairs[f"speech.{key}"] = (record["speech"][key], value)
    return [_difference(name, key, old, new, where) for key, (old, new) in pairs.items() if old != new]


def _difference(task: str, key: str, recorded: Any, now: Any, where: Path) -> str:
    return f"tasks.{task}.{key}: {recorded!r} recorded in {where}, {now!r} in the config"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def layer_counts(model_dir: str | Path) -> dict[str, int]:
    config = AutoConfig.from_pretrained(str(model_dir))
    return get_adapter(config).config_num_layers(config)


def candidate_starts(model_dir: str | Path, variant: str, fraction: str) -> list[int]:
    return window_starts(variant, layer_counts(model_dir), fraction)
