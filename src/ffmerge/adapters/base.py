"""What ffmerge needs to know about an architecture, stated once per family.

An adapter never runs the model: it only names modules. Everything else (feature caching, alignment,
merging, tying, dropping, CKA) is written once against these names, so supporting a new family means
writing one small subclass (see ``llama.py`` for a gated MLP and ``gpt2.py`` for Conv1D weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class StackSpec:
    """One sequence of Transformer layers whose FF sublayers can be merged together.

    Decoder-only and encoder-only models have one stack; encoder-decoder models have two, which is why
    windows, features and ties are always keyed by stack name.

    All module paths are dotted attribute paths: ``layers`` from the model's *base model*
    (``model.base_model``), the others from one layer of that list.
    """

    name: str
    layers: str
    ff_in: tuple[tuple[str, str], ...]
    """(role, path) of every FF input projection; their output rows are the FF neurons."""
    ff_out: str
    """The FF output projection; its input columns are the FF neurons."""
    attn_out: str
    """The attention output projection: its output is the attention sublayer's output before the
    residual add (used for CKA)."""
    num_layers_key: str
    """The config attribute that holds this stack's layer count (updated when layers are dropped)."""
    per_layer_keys: tuple[str, ...] = ()
    """Config lists with one entry per layer of this stack (e.g. ``layer_types``), trimmed on drop."""
    ff_act: str | None = None
    """The FF block's activation function (an attribute path from the layer), so that the block can be run on
    its own: ``out(act(in(x)))``, or ``out(act(gate(x)) * up(x))`` when gated (block reconstruction)."""
    ff_norm: str | None = None
    """The pre-FF norm, where its output feeds the FF block and nothing else (pre-norm layers): its elementwise
    weight (and bias) can then be folded into the input projections without changing the layer's function.
    None for post-norm layers (Marian, BERT) and norms with an offset weight (Gemma's ``1 + w``)."""
    ff_scale: str | None = None
    """A per-channel scale applied to the FF output only (DINOv2's LayerScale): foldable into the output
    projection."""
    attn_scale: str | None = None
    """A per-channel scale applied to the attention output only (DINOv2's LayerScale): with ``ff_scale``, what
    the sublayers add to the residual stream (the proxy window search, :mod:`ffmerge.proxy`)."""

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.ff_in)

    @property
    def ff_paths(self) -> tuple[str, ...]:
        """Every module path that one FF block owns: the modules that merging averages and ties."""
        return tuple(path for _, path in self.ff_in) + (self.ff_out,)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at ``path``; replacing by the *same object* in several layers is how we tie."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def neuron_axis(module: nn.Module, side: str) -> int:
    """The weight axis that indexes FF neurons.

    ``side`` is "in" for an input projection (neurons are its outputs) and "out" for the output projection
    (neurons are its inputs). ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]``.
    """
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    if isinstance(module, Conv1D):
        return 1 if side == "in" else 0
    if isinstance(module, nn.Linear):
        return 0 if side == "in" else 1
    raise TypeError(
        f"ffmerge knows how to permute nn.Linear and transformers Conv1D, not {type(module).__name__}; "
        "teach ffmerge.adapters.base.neuron_axis about it"
    )


class ModelAdapter:
    """Base class: subclasses set ``model_types`` and ``stacks`` and, rarely, override a method.

    ``gated`` adapters have two input projections ("gate" and "up"), permuted together; their
    pre-activation feature can be the gate's output, the up projection's output, or their product
    (the down projection's input).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    stacks: ClassVar[tuple[StackSpec, ...]] = ()
    default_feature: ClassVar[str] = "in"

    @property
    def gated(self) -> bool:
        return {"gate", "up"} <= set(self.stacks[0].roles)

    @property
    def feature_modes(self) -> tuple[str, ...]:
        """Which tensor counts as 'the features just before the activation'."""
        return ("gate", "up", "product") if self.gated else ("in",)

    def resolve_feature(self, feature: str) -> str:
        if feature == "auto":
            return self.default_feature
        if feature not in self.feature_modes:
            raise ValueError(
                f"feature {feature!r} is not available for {self.name}: choose one of {('auto',) + self.feature_modes}"
            )
        return feature

    def check_config(self, config: PretrainedConfig) -> None:
        """Refuse variants of the family whose FF block the specs do not describe."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def stack(self, name: str) -> StackSpec:
        for spec in self.stacks:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has stacks {[s.name for s in self.stacks]}, not {name!r}")

    def base(self, model: nn.Module) -> nn.Module:
        """The module the stack paths start from; lets one adapter serve every head class."""
        return model.base_model if isinstance(model, PreTrainedModel) else model

    def layers(self, model: nn.Module, stack: str) -> nn.ModuleList:
        return get_submodule(self.base(model), self.stack(stack).layers)

    def num_layers(self, model: nn.Module, stack: str) -> int:
        return len(self.layers(model, stack))

    def ff_modules(self, model: nn.Module, stack: str, index: int) -> dict[str, nn.Module]:
        """The modules of one FF block keyed by role, plus "out" for the output projection."""
        spec = self.stack(stack)
        layer = self.layers(model, stack)[index]
        modules = {role: get_submodule(layer, path) for role, path in spec.ff_in}
        modules["out"] = get_submodule(layer, spec.ff_out)
        return modules

    def ff_forward(self, model: nn.Module, stack: str, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer ``index``'s FF block as a function of its input (the pre-FF norm's output), outside the model.

        Block reconstruction (:mod:`ffmerge.repair`) fits a merged block to cached inputs and outputs, which
        needs the block alone; every family's block is one of the two forms below.
        """
        spec = self.stack(stack)
        if spec.ff_act is None:
            raise NotImplementedError(f"{self.name} does not name its FF activation (StackSpec.ff_act)")
        modules = self.ff_modules(model, stack, index)
        act = get_submodule(self.layers(model, stack)[index], spec.ff_act)
        if self.gated:
            return lambda x: modules["out"](act(modules["gate"](x)) * modules["up"](x))
        return lambda x: modules["out"](act(modules["in"](x)))

    def attn_out_module(self, model: nn.Module, stack: str, index: int) -> nn.Module:
        return get_submodule(self.layers(model, stack)[index], self.stack(stack).attn_out)

    def config_num_layers(self, config: PretrainedConfig) -> dict[str, int]:
        """Layer count per stack read from the config alone (the workflow plans jobs before loading weights)."""
        return {spec.name: getattr(config, spec.num_layers_key) for spec in self.stacks}

    def set_num_layers(self, config: PretrainedConfig, stack: str, n: int) -> None:
        """Record a new layer count after dropping; per-layer config lists are trimmed by the caller."""
        setattr(config, self.stack(stack).num_layers_key, n)
