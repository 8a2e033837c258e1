"""Image classification: top-1 accuracy, as in the paper's ViT-B/16 ImageNet experiments.

Calibration features come from whole images: every position the encoder sees (the CLS token, the patch
tokens and any register tokens) is a real token, so a batch of B images contributes B x T tokens and the
token masks are all true. How many tokens an image yields depends on the model (patch size, registers),
so :meth:`ImageClassificationTask.prepare_data` reads it from the model's config and stores it, together
with the model's pixel normalisation, in the data record that every later step reads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig

from ..data.images import (
    ImageSplit,
    model_normalization,
    normalize,
    prepare_image_splits,
    read_image_record,
)
from ..finetune import TrainingOutputs
from .base import Task

ENCODER_STACK = "encoder"


class ImageClassificationTask(Task):
    type = "image_classification"
    metric = "accuracy"
    higher_is_better = True
    auto_class = "AutoModelForImageClassification"
    budget_unit = "images"

    @staticmethod
    def training_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> TrainingOutputs:
        return classification_outputs(model, batch)

    def prepare_data(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Image splits plus what the model needs to read them: tokens per image and pixel normalisation."""
        image_size = self.cfg["image_size"]
        extra = {
            "tokens_per_image": tokens_per_image(AutoConfig.from_pretrained(model_dir), image_size),
            "normalization": model_normalization(model_dir),
        }
        return prepare_image_splits(
            self.cfg["data"], out_dir, self.cfg["splits"], self.cfg["seed"], image_size, extra, model_dir=model_dir
        )

    def calibration_batches(self, data_dir: Path) -> Iterator[dict[str, Any]]:
        """Just enough calibration images for ``features.tokens`` tokens, every position a real token."""
        settings = self.cfg["features"]
        record = read_image_record(data_dir)
        per_image = _recorded(record, "tokens_per_image", data_dir)
        split = ImageSplit(data_dir, "calib")
        n_images = math.ceil(settings["tokens"] / per_image)
        if n_images > len(split):
            raise ValueError(
                f"features.tokens = {settings['tokens']} needs {n_images} calibration images of {per_image} tokens, "
                f"but the calib split has {len(split)}; raise splits.calib to at least {n_images}"
            )
        for start in range(0, n_images, settings["batch_size"]):
            stop = min(start + settings["batch_size"], n_images)
            yield {
                "pixel_values": _inputs(split.images(start, stop), record),
                "token_masks": {ENCODER_STACK: torch.ones(stop - start, per_image, dtype=torch.bool)},
            }

    def scorer(self, data_dir: Path, split: str, setting: str, device: torch.device) -> AccuracyScorer:
        """Top-1 accuracy in percent over the whole split, batch by batch (``setting`` gives the batch size)."""
        stored = ImageSplit(data_dir, split)
        return AccuracyScorer(
            stored, read_image_record(data_dir), batch_size=self.cfg[setting]["batch_size"], device=device
        )

    def training(self, data_dir: Path, device: torch.device) -> tuple[Callable, Callable[[int], Any]]:
        """Cross-entropy on epoch-shuffled training batches; batch i is a pure function of (seed, i)."""
        record = read_image_record(data_dir)
        get_batch = image_batches(
            ImageSplit(data_dir, "train"), record, batch_size=self.cfg["finetune"]["batch_size"], seed=self.cfg["seed"]
        )
        return classification_loss, get_batch


def tokens_per_image(config: Any, image_size: int) -> int:
    """Encoder positions per square image: CLS + register tokens + one per whole patch."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if image_size < patch:
        raise ValueError(
            f"image_size {image_size} is smaller than the model's patch size {patch}: the image would have no patch; "
            f"set the task's image_size to at least {patch} (a multiple of {patch} uses every pixel)"
        )
    return 1 + getattr(config, "num_register_tokens", 0) + (image_size // patch) ** 2


class AccuracyScorer:
    """Top-1 accuracy over fixed batches of a split, as sums (correct, count) that add up across batches.

    The window search replays cached hidden states batch by batch and may score a candidate on a first
    share of the batches before finishing it, so batch ``i`` is always the same images.
    """

    def __init__(
        self, split: ImageSplit, record: Mapping[str, Any], *, batch_size: int, device: torch.device | None = None
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.record, self.batch_size, self.device = split, record, batch_size, device
        self.n_batches = math.ceil(len(split) / batch_size)

    def run(self, model: nn.Module, batches: range | None = None) -> dict[str, float]:
        """``{"correct", "count"}`` over ``batches`` (all by default), in their fixed order."""
        _check_labels(model, self.split)
        device = self.device if self.device is not None else next(model.parameters()).device
        correct, count = 0, 0
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for index in range(self.n_batches) if batches is None else batches:
                    start = index * self.batch_size
                    stop = min(start + self.batch_size, len(self.split))
                    pixels = _inputs(self.split.images(start, stop), self.record).to(device)
                    predicted = model(pixel_values=pixels).logits.argmax(dim=-1).cpu()
                    correct += int((predicted == self.split.labels[start:stop]).sum())
                    count += stop - start
        finally:
            model.train(was_training)
        return {"correct": correct, "count": count}

    @staticmethod
    def metric(sums: dict[str, float]) -> float:
        return 100.0 * sums["correct"] / sums["count"]


def top1_accuracy(
    model: nn.Module, split: ImageSplit, record: Mapping[str, Any], *, batch_size: int, device: torch.device
) -> float:
    """Percentage of the split's images whose highest logit is the true label."""
    scorer = AccuracyScorer(split, record, batch_size=batch_size, device=device)
    return scorer.metric(scorer.run(model))


def image_batches(
    split: ImageSplit, record: Mapping[str, Any], *, batch_size: int, seed: int
) -> Callable[[int], dict[str, torch.Tensor]]:
    """``get_batch(i)``: micro-batch ``i`` of a sequence of epochs, each a seeded permutation of the split.

    Position ``p = i * batch_size + k`` is image ``perm[epoch(p)][p mod N]``; the permutation of an epoch
    depends only on ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would.
    When the data was prepared with ``data.augment`` (``record["augment"]``), each image is a random resized
    crop of its source image, flipped at random, with numbers drawn from ``(seed, i)``: still a pure function.
    """
    n = len(split)
    if batch_size < 1 or n < 1:
        raise ValueError(f"need batch_size >= 1 and a non-empty train split, got {batch_size} and {n} images")

    @functools.lru_cache(maxsize=2)
    def permutation(epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        return torch.randperm(n, generator=generator)

    augment = record.get("augment")

    def get_batch(step: int) -> dict[str, torch.Tensor]:
        positions = range(step * batch_size, (step + 1) * batch_size)
        indices = [int(permutation(p // n)[p % n]) for p in positions]
        pixels = split.augmented(indices, augment, seed=seed, step=step) if augment else split.gather(indices)
        return {"pixel_values": _inputs(pixels, record), "labels": split.labels[indices]}

    return get_batch


def classification_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> TrainingOutputs:
    """Mean cross-entropy of the logits against the labels, and the logits."""
    logits = model(pixel_values=batch["pixel_values"]).logits
    return F.cross_entropy(logits, batch["labels"]), logits, None


def classification_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the logits against the labels."""
    return classification_outputs(model, batch)[0]


def _epoch_seed(seed: int, epoch: int) -> int:
    """Hash (seed, epoch) so neighbouring epochs never get correlated permutations, unlike seed + epoch."""
    return int(np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0])


def _inputs(pixels: torch.Tensor, record: Mapping[str, Any]) -> torch.Tensor:
    norm = record.get("normalization") or {}
    if "mean" not in norm or "std" not in norm:
        raise ValueError("the data record has no pixel normalisation; rerun prepare_data with this version")
    return normalize(pixels, norm["mean"], norm["std"])


def _recorded(record: Mapping[str, Any], key: str, data_dir: Path) -> Any:
    if key not in record:
        raise ValueError(f"{data_dir}/splits.json has no {key!r}; it was not prepared by this task, rerun prepare_data")
    return record[key]


def _check_labels(model: nn.Module, split: ImageSplit) -> None:
    """A classifier with another label set would score near chance without any error; say so instead."""
    n_labels = getattr(model.config, "num_labels", None)
    if n_labels is not None and n_labels != len(split.classes):
        raise ValueError(
            f"the model predicts {n_labels} classes but the data has {len(split.classes)}; "
            "use a classifier trained on these classes (e.g. the linear probe of ffmerge.probe)"
        )
