"""One Wide FFN applied after training (Pires et al. 2023, "One Wide Feedforward is All You Need").

Pires et al. train encoder-decoder Transformers with one FF block shared by every encoder layer and no FF
block at all in the decoder layers (the decoder's FFs turned out to be the most redundant). Here the same
structure is made from a pretrained model, with the pieces the merge already has:

- the first stack (the encoder, or the only stack of a single-stack model) is merged into one tied block:
  the permute merge of a window covering the whole stack, with repair if configured, exactly as the merge
  builds its all-but-one model;
- every other stack (the decoder) loses its FF sublayers outright, as in :mod:`ffmerge.ffdrop`.

So the method has its own budget, not a fraction's: it removes everything the all-but-one merge removes plus
the one FF block the merge keeps in the decoder. For a single-stack model (a causal LM, a ViT) "one FF
shared by the whole stack" *is* the all-but-one permute merge, so building it there repeats that model; the
workflow builds it at fraction ``all-but-one`` and the default grid lists it for the encoder-decoder task only.

The "wide" form of the paper (the shared block widened to win back parameters) is not built here.
"""

from __future__ import annotations

from .experiments import ALL_BUT_ONE

METHOD = "onewide"


def onewide_layout(layers: dict[str, int], fraction: str) -> tuple[dict[str, tuple[int, int]], dict[str, list[int]]]:
    """``({shared stack: (0, n)}, {other stack: [every layer]})`` for a model of ``{stack: n_layers}``.

    The first stack is the encoder in every adapter (stacks are listed encoder first); only fraction
    ``all-but-one`` exists for this method, because its budget is fixed by the architecture.
    """
    if fraction != ALL_BUT_ONE:
        raise ValueError(
            f"onewide has one budget of its own (one shared encoder FF, no decoder FF); it is built at fraction "
            f"{ALL_BUT_ONE!r}, not {fraction!r}"
        )
    first, *rest = layers
    if layers[first] < 2:
        raise ValueError(f"onewide: stack {first} has {layers[first]} layer(s); there is nothing to share")
    return {first: (0, layers[first])}, {stack: list(range(layers[stack])) for stack in rest}
