"""Glue between Snakemake and the package: config checks at start-up and job planning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig

from . import sources
from .adapters import get_adapter
from .experiments import window_starts


class ConfigError(ValueError):
    pass


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
            if key == "model" and source["kind"] == "local":
                path = Path(source["path"])
                if not (path / "config.json").is_file():
                    raise ConfigError(f"tasks.{name}.model.path: {path} has no config.json (not a transformers folder)")
                get_adapter(AutoConfig.from_pretrained(path))


def _check_system_assets(source: dict[str, Any]) -> None:
    """Data that comes from Debian packages rather than pip: say which package before any job runs."""
    if source["kind"] == "espeak_wiki":
        from .data.speech import _espeak_binary

        _espeak_binary()
    if source["kind"] == "fashion_mnist":
        from .data.images import FASHION_MNIST_DIR, FASHION_MNIST_FILES

        folder = Path(source.get("path", FASHION_MNIST_DIR))
        missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (folder / f).is_file()]
        if missing:
            raise sources.SourceError(
                f"Fashion-MNIST files {missing} not found in {folder}: apt-get install dataset-fashion-mnist "
                "(or set data.path to a folder holding the idx .gz files)"
            )


def layer_counts(model_dir: str | Path) -> dict[str, int]:
    config = AutoConfig.from_pretrained(str(model_dir))
    return get_adapter(config).config_num_layers(config)


def candidate_starts(model_dir: str | Path, variant: str, fraction: str) -> list[int]:
    return window_starts(variant, layer_counts(model_dir), fraction)
