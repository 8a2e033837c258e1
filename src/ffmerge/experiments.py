"""The experiment grid as data: which windows exist for a fraction, and which compressed models to build.

Vocabulary used in paths and tables:
- fraction: share of FF sublayers removed, "1/3", "1/2" or "all-but-one"; written "1of3", "1of2" in paths.
- variant: "permute" or "vanilla" (merge, anchor first), "permute@middle" / "permute@last" (anchor ablation),
  "drop" (remove whole layers), "ffdrop" (delete FF sublayers only, the merge's exact-budget control),
  "tie_random" (the merge's tied structure with a freshly initialised shared block, :mod:`ffmerge.tie_random`),
  "onewide" (One Wide FFN after training: one FF shared by the first stack, none in the others,
  :mod:`ffmerge.onewide`; built at fraction "all-but-one" only), "group" (the merge of the layers with the most
  alike FF outputs, adjacent or not, :mod:`ffmerge.group`), "fips" (every FF block factorised into a shared
  basis and sparse factors within the merge's budget, :mod:`ffmerge.fips`), "wide" (One Wide FFN's wide form:
  one block per stack, as wide as the blocks the merge keeps, shared by every layer, :mod:`ffmerge.wide`),
  "base" (uncompressed).
- choice: "best" (sliding-window search on validation) or "randomN" (the paper's random-window control).
"""

from __future__ import annotations

import random
from fractions import Fraction

ALL_BUT_ONE = "all-but-one"
MERGE_METHODS = ("permute", "vanilla")
# the merge each method builds its tied blocks with (a method missing here merges nothing)
MERGES_WITH = {"permute": "permute", "vanilla": "vanilla", "onewide": "permute", "group": "permute", "wide": "permute"}
DELETE_METHODS = ("drop", "ffdrop")
# controls with no window search of their own: each builds the window another method's search chose (a search
# would rank windows by scores that mean nothing for them: a random block's score before fine-tuning)
# (group, fips, wide: built from the feature cache; they need only the permute search's fraction and features)
REUSED_SEARCH = {method: "permute" for method in ("tie_random", "onewide", "group", "fips", "wide")}
# methods with one budget of their own, built at this fraction only (whatever else experiments.fractions lists)
OWN_BUDGET = {"onewide": ALL_BUT_ONE}


def fraction_label(fraction: str) -> str:
    """Path-safe form of a fraction: "1/3" -> "1of3"."""
    return fraction.replace("/", "of")


def parse_fraction_label(label: str) -> str:
    return label.replace("of", "/") if label != ALL_BUT_ONE else label


def removed_count(n_layers: int, fraction: str) -> int:
    """FF sublayers removed from a stack of ``n_layers``: 1/3 of 30 -> 10, all-but-one of 30 -> 29."""
    if n_layers < 2:
        raise ValueError(
            f"a stack of {n_layers} layer(s) has no FF sublayer to remove while keeping one; compress a model with at "
            "least 2 layers per stack"
        )
    if fraction == ALL_BUT_ONE:
        return n_layers - 1
    removed = round(n_layers * Fraction(fraction))
    if not 1 <= removed <= n_layers - 1:
        what = "nothing" if removed < 1 else "every FF sublayer"
        raise ValueError(
            f"experiments.fractions: {fraction} of {n_layers} layers removes {removed} FF sublayers ({what}); use a "
            f"fraction between 1/{n_layers} and {n_layers - 1}/{n_layers}, or all-but-one"
        )
    return removed


def split_variant(variant: str) -> tuple[str, str]:
    """ "permute@middle" -> ("permute", "middle"); merges default to the first layer as anchor."""
    method, _, anchor = variant.partition("@")
    return method, anchor or "first"


def search_of(variant: str) -> str:
    """The window search a variant's model is built from: its own method's, except for anchor ablations (the window
    chosen with the first anchor) and the controls of :data:`REUSED_SEARCH` (the permute search's window)."""
    method, _ = split_variant(variant)
    return REUSED_SEARCH.get(method, method)


def window_size(method: str, n_layers: int, fraction: str) -> int:
    """Layers a window covers: merging k layers removes k-1 FF blocks; deleting removes the window itself."""
    removed = removed_count(n_layers, fraction)
    return removed if method in DELETE_METHODS else removed + 1


def window_starts(method: str, layers: dict[str, int], fraction: str) -> list[int]:
    """Every start at which the window fits all stacks (encoder and decoder move in sync)."""
    last = min(n - window_size(method, n, fraction) for n in layers.values())
    return list(range(last + 1))


def windows_at(method: str, layers: dict[str, int], fraction: str, start: int) -> dict[str, tuple[int, int]]:
    return {stack: (start, window_size(method, n, fraction)) for stack, n in layers.items()}


def random_starts(starts: list[int], best: int, count: int, seed: int) -> list[int]:
    """The paper's random-window control: ``count`` distinct starts other than the chosen one."""
    pool = [s for s in starts if s != best]
    random.Random(seed).shuffle(pool)  # one fixed order: randomN is the same start whatever the count asked
    return pool[:count]


def compressed_models(experiments: dict) -> list[tuple[str, str, str]]:
    """Every (variant, fraction label, choice) that the config asks to build, fine-tune and evaluate."""
    fractions = experiments["fractions"]
    methods = experiments["methods"]
    models = [(m, fraction_label(f), "best") for f in fractions for m in methods if m not in OWN_BUDGET]
    models += [(m, fraction_label(OWN_BUDGET[m]), "best") for m in methods if m in OWN_BUDGET]
    head = fraction_label(fractions[0])
    if "permute" in experiments["methods"]:
        models += [(f"permute@{a}", head, "best") for a in experiments["anchors"] if a != "first"]
        models += [("permute", head, f"random{r}") for r in range(experiments["random_windows"])]
    return models
