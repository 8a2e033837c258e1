"""What the pipeline needs from a task: data, calibration batches, a metric, and a fine-tuning recipe.

The workflow is written once against this interface; a new task (vision, translation, speech) is one
module that implements it and one config entry, not a copy of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


class Scorer(Protocol):
    """A metric computed batch by batch in a fixed order, from sums that add up across batches.

    The window search relies on both properties: cached hidden states are replayed batch by batch,
    and a candidate can be scored on a first share of the batches and finished later.
    """

    n_batches: int

    def run(self, model: nn.Module, batches: range | None = None) -> dict[str, float]: ...

    def metric(self, sums: dict[str, float]) -> float: ...


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in a.keys() | b.keys()}


class Task:
    """Base class; ``cfg`` is the task's validated config block (see ``workflow/schemas/config.schema.yaml``)."""

    type: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    auto_class: ClassVar[str]
    budget_unit: ClassVar[str]
    """What one fine-tuning example is ("tokens", "images", ...): budgets are recorded in these units."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg

    def prepare_data(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def calibration_batches(self, data_dir: Path) -> Iterator[dict[str, Any]]:
        """Batches of model inputs plus ``token_masks`` ``{stack: bool [B, T]}`` of the real positions."""
        raise NotImplementedError

    def calibration_tokens(self, data_dir: Path) -> int | dict[str, int]:
        """Positions the feature cache takes from :meth:`calibration_batches`: one budget for every stack, or
        a count per stack (translation counts source tokens; the decoder takes the same pairs' targets)."""
        return self.cfg["features"]["tokens"]

    def metric_details(self) -> dict[str, Any]:
        """What the last :meth:`score` used beyond the metric's name (e.g. the sacrebleu signature), for result
        files; empty where there is nothing to add."""
        return {}

    def scorer(self, data_dir: Path, split: str, setting: str, device: torch.device) -> Scorer | None:
        """A batch-addressable scorer, or None when the metric cannot be split (e.g. corpus BLEU).

        ``setting`` names a config block ("selection" or "evaluation").
        """
        return None

    def score(self, model: nn.Module, data_dir: Path, split: str, setting: str, device: torch.device) -> float:
        """The task metric on ``split``."""
        scorer = self.scorer(data_dir, split, setting, device)
        if scorer is None:
            raise NotImplementedError(f"{type(self).__name__} must implement score() or scorer()")
        return scorer.metric(scorer.run(model))

    def training(self, data_dir: Path, device: torch.device) -> tuple[Callable, Callable[[int], Any]]:
        """``(loss_fn(model, batch), get_batch(step))`` for recovery fine-tuning."""
        raise NotImplementedError

    @staticmethod
    def training_outputs(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(task loss, logits, mask of counted logit positions or None)`` of a training batch, for distillation
        (:func:`ffmerge.finetune.distillation_loss`); ``loss_fn`` of :meth:`training` is its first item."""
        raise NotImplementedError

    def examples_per_step(self) -> int:
        """Fine-tuning examples (in ``budget_unit``) one optimizer step consumes."""
        return self.cfg["finetune"]["batch_size"]
