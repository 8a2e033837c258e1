"""Record every FF sublayer's features over an exact token budget, streamed to safetensors files.

The paper aligns neurons from ~10k calibration tokens. We keep the features on disk, one file per
(stack, kind, layer), so that any pair of layers can be correlated later without another forward pass,
and so that peak memory is the model plus one batch: rows are appended to the files as batches run,
never gathered in RAM.

Kinds of features:
- ``pre``: the FF features just before the activation (the paper's alignment features). For gated MLPs the
  mode chooses the gate output, the up output or their product (the down projection's input).
- ``ff_in``: the FF sublayer's input (after its pre-FF norm), the inputs of the block reconstruction that
  repairs a merge (:mod:`ffmerge.repair`).
- ``ff_out``: the FF sublayer's output before the residual add (for CKA, and the repair's targets).
- ``attn_out``: the attention sublayer's output before the residual add (for CKA).

Only positions whose ``token_mask`` is true are kept, so padding never counts towards the budget.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, get_adapter
from .workflow.atomic import atomic_output_dir

KINDS = ("pre", "ff_in", "ff_out", "attn_out")
_DTYPES = {"float16": (torch.float16, "F16"), "float32": (torch.float32, "F32")}
MANIFEST = "manifest.json"


class StreamingSafetensorsWriter:
    """Writes one 2-D tensor named ``features`` row block by row block into a valid safetensors file.

    The safetensors library can only save a tensor that is whole in memory; its format is simply an
    8-byte header length, a JSON header, and the raw little-endian bytes, so we write the header for the
    final shape first and then append rows as they are produced.
    """

    def __init__(self, path: Path, n_rows: int, n_cols: int, dtype: str, metadata: Mapping[str, str]):
        self.torch_dtype, st_dtype = _DTYPES[dtype]
        self.n_rows, self.n_cols, self.rows_written = n_rows, n_cols, 0
        nbytes = n_rows * n_cols * torch.empty((), dtype=self.torch_dtype).element_size()
        header = {
            "features": {"dtype": st_dtype, "shape": [n_rows, n_cols], "data_offsets": [0, nbytes]},
            "__metadata__": dict(metadata),
        }
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.tmp = path.with_name(path.name + ".partial")
        self.file: BinaryIO = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def append(self, rows: torch.Tensor) -> None:
        if rows.shape[1] != self.n_cols or self.rows_written + rows.shape[0] > self.n_rows:
            raise ValueError(f"{self.path.name}: block {tuple(rows.shape)} does not fit the declared shape")
        block = rows.detach().to("cpu", self.torch_dtype).contiguous()
        self.file.write(block.view(torch.uint8).numpy().tobytes())
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        self.file.close()
        if self.rows_written != self.n_rows:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path.name}: wrote {self.rows_written} of {self.n_rows} rows")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class FeatureStore:
    """A folder of cached features: ``<root>/<stack>/<kind>/layer_NNN.safetensors`` plus a manifest."""

    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{root} holds no finished feature cache ({MANIFEST} missing): the caching job was interrupted "
                "or never ran; delete the folder and rerun the cache_features step"
            )
        return cls(root, json.loads(path.read_text()))

    def path(self, stack: str, kind: str, layer: int) -> Path:
        return self.root / stack / kind / f"layer_{layer:03d}.safetensors"

    def load(self, stack: str, kind: str, layer: int) -> torch.Tensor:
        path = self.path(stack, kind, layer)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("features")
        except Exception as err:  # a truncated or foreign file: name it and say how to recover
            raise RuntimeError(
                f"cannot read cached features {path}: {err}. The cache is corrupt; delete {self.root} and rerun "
                "the cache_features step"
            ) from err

    @property
    def n_tokens(self) -> dict[str, int]:
        return self.manifest["n_tokens"]

    def num_layers(self, stack: str) -> int:
        return self.manifest["num_layers"][stack]


def _hook_points(
    adapter: ModelAdapter, model: nn.Module, feature: str, kinds: tuple[str, ...]
) -> Iterator[tuple[str, str, int, nn.Module, bool]]:
    """(stack, kind, layer, module, hook its input?) for every tensor to record."""
    for spec in adapter.stacks:
        for i in range(adapter.num_layers(model, spec.name)):
            modules = adapter.ff_modules(model, spec.name, i)
            targets = {
                "pre": _feature_module(modules, feature),
                "ff_in": (modules[spec.ff_in[0][0]], True),
                "ff_out": (modules["out"], False),
                "attn_out": (adapter.attn_out_module(model, spec.name, i), False),
            }
            for kind in kinds:
                yield (spec.name, kind, i, *targets[kind])


def _feature_module(modules: dict[str, nn.Module], feature: str) -> tuple[nn.Module, bool]:
    """Which module carries the 'pre' features, and whether they are its input (True) or output."""
    if feature == "product":
        return modules["out"], True
    return modules[feature], False


def _select(tensor: Any, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, tuple):  # some attention modules return (output, weights)
        tensor = tensor[0]
    return tensor[mask]


def cache_features(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    n_tokens: int | Mapping[str, int],
    feature: str = "auto",
    kinds: tuple[str, ...] = KINDS,
    dtype: str = "float16",
    device: str | torch.device = "cpu",
    forward: Any = None,
    progress: bool = True,
) -> FeatureStore:
    """Run ``batches`` through ``model`` until every stack has recorded exactly ``n_tokens`` positions (one
    budget for all stacks, or a mapping ``{stack: positions}``).

    Each batch is a mapping of model inputs plus ``token_masks``: ``{stack: bool tensor [B, T]}`` marking
    the real tokens (or patches) of that stack. Positions are taken in batch order, so the sample is
    deterministic given the batches. ``forward(model, inputs)`` overrides the call (default: the model's
    trunk without its head). The folder is written under a temporary name and renamed when complete, so
    an interrupted run never leaves something that looks finished.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; choose from {KINDS}")
    adapter = get_adapter(model)
    feature = adapter.resolve_feature(feature)
    with atomic_output_dir(out_dir, MANIFEST) as tmp_dir:
        model.eval()
        stacks = [s.name for s in adapter.stacks]
        budget = dict(n_tokens) if isinstance(n_tokens, Mapping) else dict.fromkeys(stacks, n_tokens)
        taken = {s: 0 for s in stacks}
        current: dict[str, torch.Tensor] = {}
        writers: dict[tuple[str, str, int], StreamingSafetensorsWriter] = {}
        meta = {"feature": feature, "dtype": dtype}

        def writer(stack: str, kind: str, layer: int, width: int) -> StreamingSafetensorsWriter:
            key = (stack, kind, layer)
            if key not in writers:
                path = FeatureStore(tmp_dir).path(stack, kind, layer)
                path.parent.mkdir(parents=True, exist_ok=True)
                writers[key] = StreamingSafetensorsWriter(path, budget[stack], width, dtype, meta | {"kind": kind})
            return writers[key]

        def hook_for(stack: str, kind: str, layer: int, use_input: bool):
            def hook(module: nn.Module, args: tuple, output: Any = None) -> None:
                if stack not in current:
                    return
                rows = _select(args[0] if use_input else output, current[stack])
                writer(stack, kind, layer, rows.shape[-1]).append(rows)

            return hook

        with ExitStack() as stack_ctx, torch.inference_mode():
            for stack, kind, layer, module, use_input in _hook_points(adapter, model, feature, kinds):
                hook = hook_for(stack, kind, layer, use_input)
                register = module.register_forward_pre_hook if use_input else module.register_forward_hook
                stack_ctx.callback(register(hook).remove)
            bar = tqdm(total=sum(budget[s] for s in stacks), desc="caching features", unit="tok", disable=not progress)
            try:
                for batch in batches:
                    if all(taken[s] >= budget[s] for s in stacks):
                        break
                    current.clear()
                    for name, mask in batch["token_masks"].items():
                        mask = first_positions(mask.to(torch.bool), budget[name] - taken[name])
                        if mask.any():
                            current[name] = mask.to(device)
                            taken[name] += int(mask.sum())
                            bar.update(int(mask.sum()))
                    if not current:
                        continue
                    inputs = {
                        k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "token_masks"
                    }
                    (forward or trunk_forward(adapter))(model, inputs)
                bar.close()
                short = {s: taken[s] for s in stacks if taken[s] < budget[s]}
                if short:
                    raise ValueError(
                        f"the calibration data ran out after {short} tokens; {n_tokens} were asked for. Lower the "
                        "feature token budget or give the calibration split more data"
                    )
                for w in writers.values():
                    w.close()
            except BaseException:
                for w in writers.values():
                    w.abort()
                raise
        manifest = {
            "model_type": model.config.model_type,
            "feature": feature,
            "dtype": dtype,
            "kinds": list(kinds),
            "n_tokens": {s: budget[s] for s in stacks},
            "num_layers": {s: adapter.num_layers(model, s) for s in stacks},
        }
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return FeatureStore(Path(out_dir), manifest)


def first_positions(mask: torch.Tensor, limit: int) -> torch.Tensor:
    """Keep only the first ``limit`` true positions of ``mask`` in row-major order (the budget's end)."""
    if limit <= 0:
        return torch.zeros_like(mask)
    flat = mask.flatten()
    keep = flat & (torch.cumsum(flat.long(), 0) <= limit)
    return keep.view_as(mask)


def trunk_forward(adapter: ModelAdapter):
    """Run only the model's trunk: every hooked tensor lies inside it, and the task head (for an LM, logits
    over the whole vocabulary at every position) would cost time and memory for nothing."""

    def forward(model: nn.Module, inputs: Mapping[str, Any]) -> None:
        adapter.base(model)(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)

    return forward
