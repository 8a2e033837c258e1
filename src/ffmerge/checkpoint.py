"""Save and load compressed models whose tied tensors are stored once.

``save_pretrained`` in transformers 5 refuses shared tensors it was not told about, and saving tied
layers by value would make the files as large as the original. Our folder format:

- ``config.json`` (and ``generation_config.json``): the model's own transformers config;
- ``ffmerge.safetensors``: every distinct tensor once, under its first (canonical) name;
- ``ffmerge_ties.json``: the architecture class, the tie map (which modules and parameters are the same
  object as a canonical one), the FF sublayers deleted outright (:mod:`ffmerge.ffdrop`), the factorised FF
  blocks of FiPS (:mod:`ffmerge.fips`: groups and rank) and the widened shared blocks of :mod:`ffmerge.wide`
  (their width), which the config cannot describe and which are rebuilt before the tensors load. A FiPS block's
  sparse factors are stored as their values and a packed bitmask (the module's own state dict), not dense.

There is deliberately no ``model.safetensors``: a plain ``from_pretrained`` on this folder fails with
"no file named model.safetensors" instead of silently initialising the missing tied layers at random.
Use :func:`load_compressed`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, GenerationConfig
from transformers.initialization import no_init_weights

from .adapters import get_submodule, set_submodule
from .ffdrop import delete_ff, deleted_ff
from .fips import fips_layout, restore_fips
from .wide import restore_wide, wide_layout
from .workflow.atomic import atomic_output_dir

WEIGHTS = "ffmerge.safetensors"
TIES = "ffmerge_ties.json"
GENERATION_CONFIG = "generation_config.json"
FORMAT_VERSION = 1


def tie_map(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """Shared modules and shared parameters, each as ``{canonical name: [alias names]}``.

    Modules first: when a whole module is shared, its parameters need no entry of their own. Parameters
    shared across different modules (e.g. tied input and output embeddings) are listed separately.
    """
    modules: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and any(True for _ in module.parameters(recurse=False)):
            modules.setdefault(id(module), []).append(name)
    module_ties = {names[0]: names[1:] for names in modules.values() if len(names) > 1}
    aliased_prefixes = tuple(f"{alias}." for aliases in module_ties.values() for alias in aliases)
    params: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not name.startswith(aliased_prefixes):
            params.setdefault(id(param), []).append(name)
    param_ties = {names[0]: names[1:] for names in params.values() if len(names) > 1}
    return {"modules": module_ties, "parameters": param_ties}


def _alias_keys(ties: dict[str, dict[str, list[str]]], keys: list[str]) -> dict[str, str]:
    """Every state-dict key that is an alias, mapped to its canonical key."""
    alias: dict[str, str] = {}
    for canon, aliases in ties["modules"].items():
        for a in aliases:
            for key in keys:
                if key.startswith(f"{a}."):
                    alias[key] = canon + key[len(a) :]
    for canon, aliases in ties["parameters"].items():
        for a in aliases:
            alias[a] = canon
    return alias


def save_compressed(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` with each shared tensor once; the folder appears complete or not at all."""
    ties = tie_map(model)
    state = model.state_dict()
    alias = _alias_keys(ties, list(state))
    unique = {k: v.detach().contiguous() for k, v in state.items() if k not in alias}
    seen: dict[int, str] = {}
    for k, v in list(unique.items()):  # tensors shared in ways the maps above miss would be saved twice
        if v.data_ptr() in seen and v.numel() > 0:
            raise ValueError(f"{k} shares storage with {seen[v.data_ptr()]} but is not a recorded tie")
        seen[v.data_ptr()] = k
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "ties": ties,
        "deleted_ff": deleted_ff(model),
        "fips": fips_layout(model),
        "wide": wide_layout(model),
        "extra": extra or {},
    }
    with atomic_output_dir(path, TIES) as tmp:
        save_file(unique, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        (tmp / TIES).write_text(json.dumps(meta, indent=1))
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path / TIES
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not an ffmerge compressed checkpoint ({TIES} missing). Plain transformers folders load "
            "with from_pretrained; a half-written ffmerge folder should be deleted and its step rerun"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def apply_ties(model: nn.Module, ties: dict[str, dict[str, list[str]]]) -> None:
    """Make aliases the same objects as their canonical module or parameter."""
    for canon, aliases in ties["modules"].items():
        shared = get_submodule(model, canon)
        for a in aliases:
            set_submodule(model, a, shared)
    for canon, aliases in ties["parameters"].items():
        owner, _, name = canon.rpartition(".")
        shared = getattr(get_submodule(model, owner), name)
        for a in aliases:
            a_owner, _, a_name = a.rpartition(".")
            setattr(get_submodule(model, a_owner), a_name, shared)


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild the model from its config, restore the ties, then load every tensor strictly.

    Loading is strict: a tensor missing from the file is an error, never a randomly initialised layer. So the
    model is built without initialising its weights (``no_init_weights``; 3.5 s of SmolLM2's 4 s build on a
    laptop core): every parameter and persistent buffer is overwritten from the file. The weight tying that
    ``init_weights`` also does is done here, and non-persistent buffers such as rotary frequencies are computed
    by the modules' constructors, which still run.
    """
    path = Path(path)
    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path)
    cls = getattr(transformers, meta["architecture"])
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    model.tie_weights(recompute_mapping=False)
    delete_ff(model, meta.get("deleted_ff", {}))
    restore_fips(model, meta.get("fips", {}))
    restore_wide(model, meta.get("wide", {}))
    apply_ties(model, meta["ties"])
    try:
        stored = load_file(str(path / WEIGHTS))
    except Exception as err:
        raise RuntimeError(f"cannot read {path / WEIGHTS}: {err}; delete {path} and rerun its step") from err
    keys = list(model.state_dict())
    alias = _alias_keys(meta["ties"], keys)
    full = {k: stored[alias.get(k, k)] for k in keys if alias.get(k, k) in stored}
    missing = sorted(set(keys) - set(full))
    if missing:
        raise RuntimeError(f"{path / WEIGHTS} lacks {len(missing)} tensors, e.g. {missing[:3]}; it is corrupt")
    model.load_state_dict(full, strict=True)
    if (path / GENERATION_CONFIG).is_file():  # _from_config derives a bare one; Whisper needs its own to decode
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()


def load_model(path: str | Path, *, auto_class: str = "AutoModel", device: str | torch.device = "cpu"):
    """Load either an ffmerge compressed folder or a plain transformers folder, in float32, eval mode."""
    path = Path(path)
    if (path / TIES).is_file():
        return load_compressed(path, device=device)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model (no config.json); rerun the step that writes it")
    model, _ = load_pretrained(
        getattr(transformers, auto_class), path, fix=f"delete {path} and rerun the step that writes it"
    )
    return model.to(device).eval()


def load_pretrained(cls: Any, path: Path, *, fix: str, strict_trunk: bool = False) -> tuple[nn.Module, dict]:
    """``cls.from_pretrained(path)`` in float32 whose failures name the folder, the cause and ``fix``.

    transformers reports a truncated weights file as a safetensors header error and a config whose shapes
    differ from the weights as "ignore_mismatched_sizes", without the folder; worse, weights that lack layers
    the config asks for only log a table and initialise those layers at random. With ``strict_trunk`` that
    is an error; a missing task head is left to the caller (the linear probe fits one on a bare backbone).
    """
    try:
        model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        if "deserializ" in text or "header" in text or type(err).__name__ == "SafetensorError":
            problem = "its weights file is truncated or corrupt"
        elif "mismatch" in text:
            problem = "its weights do not match its config.json (tensor shapes differ)"
        elif "no file named" in text:
            problem = "it has a config.json but no weights file (half-saved?)"
        else:
            problem = "transformers cannot load it"
        raise RuntimeError(f"cannot load the model in {path}: {problem} ({text.splitlines()[0][:300]}); {fix}") from err
    missing = sorted(info.get("missing_keys") or [])
    if strict_trunk and missing:
        prefix = f"{model.base_model_prefix}."
        trunk = [k for k in missing if model.base_model is model or k.startswith(prefix)]
        saved_as = list(getattr(model.config, "architectures", None) or [])
        if trunk and saved_as and type(model).__name__ not in saved_as:
            raise RuntimeError(
                f"cannot load the model in {path}: it was saved as {saved_as[0]} but loads as {type(model).__name__}, "
                f"which lacks {len(trunk)} of its tensors (e.g. {trunk[:3]}); set model.auto_class to the Auto class "
                f"of {saved_as[0]} (e.g. AutoModelForSeq2SeqLM for a translation model)"
            )
        if trunk:
            raise RuntimeError(
                f"cannot load the model in {path}: its weights do not match its config.json: {len(trunk)} tensors "
                f"the config asks for are missing from the weights (e.g. {trunk[:3]}), and transformers would "
                f"initialise them at random; {fix}"
            )
    return model, info
