"""Tie + random initialisation: the merge's tied structure, its shared FF block freshly initialised.

A reviewer's control for merging. A merge ties one FF block across a window of k layers and fills it with the
members' aligned average, then recovery fine-tuning trains the tied model. How much of the merge's result comes
from the merged weights at all? This control builds the same window, the same ties (so the same parameter count,
tie map and checkpoint format) and gets the same recovery, but its shared block holds the weights the model family
gives a new model (the family's own ``_init_weights``), drawn with the task's seed. A merge that recovers no
better than this carries nothing in its weights that the fine-tuning needed; only the structure mattered.

Two choices keep the control clean:

- The window is the one the permute search chose (``experiments.search_of``). This control has no search of its
  own: a search ranks windows by their score before fine-tuning, which for a random block ranks noise.
- There is no repair, whatever ``repair.enabled`` says: repair refits the shared block to reproduce its members'
  original outputs, which turns the random block into a reconstruction of the members, a different control (and
  with enough steps, a merge again). The model's record says ``repair: None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import get_adapter
from .align import anchor_layer
from .merge import tie_window

# transformers' init functions leave a tensor with this attribute set alone, and its initialize_weights skips a
# module with it set; a model loaded with from_pretrained has it on every parameter
HF_INITIALIZED = "_is_hf_initialized"


def tie_random(model: nn.Module, windows: dict[str, tuple[int, int]], seed: int) -> nn.Module:
    """Tie each stack window ``{stack: (start, count)}`` to one freshly initialised FF block, in place.

    The shared block is the window's first layer's modules, as in a merge with the first layer as anchor, so the
    tie map (and the checkpoint's layout) equals the merge's; only its values differ. Returns the model.
    """
    adapter = get_adapter(model)
    anchors: dict[str, int] = {}
    for stack, (start, count) in windows.items():
        n = adapter.num_layers(model, stack)
        if count < 2 or start < 0 or start + count > n:
            raise ValueError(
                f"cannot tie {stack} layers {start}..{start + count - 1}: a window needs at least 2 of the stack's "
                f"{n} layers"
            )
        anchors[stack] = anchor_layer(start, count, "first")
    # initialised before tying: the family's init then visits the block once, through the anchor layer alone
    shared = [m for stack, i in anchors.items() for m in adapter.ff_modules(model, stack, i).values()]
    family_init(model, shared, seed)
    for stack, (start, count) in windows.items():
        tie_window(adapter, model, stack, anchors[stack], range(start, start + count))
    return model


@torch.no_grad()
def family_init(model: nn.Module, modules: Iterable[nn.Module], seed: int) -> None:
    """Give ``modules``' parameters the values the model family initialises them with, deterministically.

    Runs the model's own ``initialize_weights`` (every family's ``_init_weights``, in the order transformers
    visits the modules: children first, so a parent's rule wins, e.g. GPT-2's depth-scaled output projection set
    by ``GPT2MLP``) with every other tensor flagged as initialised, the flag transformers uses to leave loaded
    weights alone. Calling ``_init_weights`` on the modules directly would do nothing on a model loaded with
    ``from_pretrained`` (its parameters carry the flag) and would miss parent rules. The random draws come from
    a generator seeded with ``seed``, the global ones restored afterwards. Any write outside ``modules`` is an
    error (in-place writes bump a tensor's version counter), so a family whose init reaches further fails here.
    """
    modules = list(modules)
    targets = {id(p) for m in modules for p in m.parameters()}
    if not targets:
        raise ValueError("no parameters to initialise")
    visited = _with_ancestors(model, modules)
    others = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in targets]
    versions = [t._version for t in others]
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters() if p.device.type == "cuda"})
    with _flags(model) as flag:
        for module in model.modules():
            flag(module, id(module) not in visited)
        for tensor in (*model.parameters(), *model.buffers()):
            flag(tensor, id(tensor) not in targets)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.initialize_weights()
    touched = [i for i, (t, v) in enumerate(zip(others, versions, strict=True)) if t._version != v]
    if touched:
        names = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        raise RuntimeError(
            f"{type(model).__name__}'s weight initialisation wrote to tensors outside the shared FF block, e.g. "
            f"{[names.get(id(others[i]), '?') for i in touched[:3]]}; ffmerge.tie_random cannot use it as it is"
        )


def _with_ancestors(model: nn.Module, modules: list[nn.Module]) -> set[int]:
    """Ids of ``modules`` and of every module above them (their FF container, layer, layer list, ..., the model)."""
    wanted = {id(m) for m in modules}
    found = {id(m) for m in modules}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in wanted:
            parts = name.split(".") if name else []
            found |= {id(model.get_submodule(".".join(parts[:k]))) for k in range(len(parts))}
    return found


@contextmanager
def _flags(model: nn.Module) -> Iterator:
    """``flag(obj, value)`` sets transformers' initialised flag on a module or tensor; every one is put back as
    it was on exit (the flags of a loaded model stay meaningful to later transformers calls)."""
    missing = object()
    saved: dict[int, tuple[object, object]] = {}

    def flag(obj: object, value: bool) -> None:
        saved.setdefault(id(obj), (obj, getattr(obj, HF_INITIALIZED, missing)))
        setattr(obj, HF_INITIALIZED, value)

    try:
        yield flag
    finally:
        for obj, before in saved.values():
            if before is missing:
                delattr(obj, HF_INITIALIZED)
            else:
                setattr(obj, HF_INITIALIZED, before)
