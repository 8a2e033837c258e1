"""How stored images are made from source images, and how training images are augmented.

Evaluation images (calib, valid, test and an un-augmented train split) are made once, at preparation, by one
of two transforms, both ending in uint8 ``[3, S, S]`` (normalisation is applied when a batch is read):

- the model's own image processor (``AutoImageProcessor`` from the model folder, PIL backend, with its rescale
  and normalise steps switched off), so a hub classifier sees exactly the resize and crop it was evaluated with
  (google/vit-base-patch16-224: a 224 x 224 bilinear resize; DINOv2: shorter side 256, centre crop 224);
- the built-in resize/crop (:func:`to_pixels`: shorter side to ``S / crop_fraction``, bicubic, centre crop
  ``S``) for models that ship no processor, such as the DINOv2 converted from ONNX.

``data.image_processor`` chooses: ``auto`` (default: the model's processor when its folder has
``preprocessor_config.json``, else built-in), ``model`` (required) or ``builtin``.

Augmentation (``data.augment``, off by default) is the usual ImageNet fine-tuning recipe: a random resized
crop (area ``scale``, aspect ``ratio``, as torchvision's ``RandomResizedCrop``) of the *whole source image*,
resized to ``S`` (bilinear), and a horizontal flip with probability 1/2. The train split then keeps each
image's encoded bytes (JPEG as the source had it) and decodes them per batch. The random numbers come from
SHA-256 of ``(seed, step, position in batch, draw)``, so micro-batch ``i`` is a pure function of
``(seed, i)`` on any machine and library version (no RNG state to save or restore).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ffmerge.sources import SourceError

PROCESSOR_FILE = "preprocessor_config.json"
# the processor a record was prepared with is saved here, in the data folder, so splits can be decoded later
PROCESSOR_DIR = "image_processor"
PROCESSOR_CHOICES = ("auto", "model", "builtin")
AUGMENT_DEFAULTS: dict[str, Any] = {"enabled": False, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "flip": True}
RRC_ATTEMPTS = 10  # as torchvision's RandomResizedCrop

# 16/32-bit integer and float images: PIL's RGB conversion clips every value above 255 (a 16-bit scan becomes
# almost white) and keeps floats in [0, 1] as 0 or 1 (almost black), without a warning.
HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def check_mode(image: Image.Image, where: str) -> None:
    """Refuse images whose pixels do not fit 8 bits, instead of letting PIL clip them silently."""
    if image.mode in HIGH_DEPTH_MODES:
        raise SourceError(
            f"{where}: image mode {image.mode!r} (16/32-bit or float pixels) would be clipped to 8-bit RGB and lose "
            "its content. Convert the images to 8-bit grayscale or RGB first (e.g. ImageMagick: mogrify -depth 8 "
            "-normalize *.png, or PIL: scale to 0..255 and convert('L'))."
        )


def to_pixels(image: Image.Image, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """uint8 ``[3, size, size]``: shorter side to ``size / crop_fraction`` (bicubic), then a centre crop."""
    check_mode(image, "an image of the source")
    image = image.convert("RGB")
    width, height = image.size
    scale = size / crop_fraction / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def decode(data: bytes, where: str) -> Image.Image:
    """A loaded PIL image from encoded bytes (any format PIL reads), 8-bit modes only."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise SourceError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from exc
    check_mode(image, where)
    return image


# --------------------------------------------------------------------------------------------
# Evaluation transforms
# --------------------------------------------------------------------------------------------


class ResizeCrop:
    """The built-in transform: :func:`to_pixels` (shorter side to ``size / crop_fraction``, centre crop)."""

    def __init__(self, size: int, crop_fraction: float):
        self.size, self.crop_fraction = size, crop_fraction

    def __call__(self, image: Image.Image) -> np.ndarray:
        return to_pixels(image, self.size, self.crop_fraction)

    def describe(self) -> dict[str, Any]:
        return {"kind": "resize_crop", "image_size": self.size, "crop_fraction": self.crop_fraction}


class ModelProcessor:
    """A transformers image processor's resize and crop (no rescale, no normalisation): uint8 ``[3, S, S]``."""

    def __init__(self, processor: Any, size: int):
        self.processor, self.size = processor, size

    def __call__(self, image: Image.Image) -> np.ndarray:
        check_mode(image, "an image of the source")
        out = self.processor(images=image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="np")[
            "pixel_values"
        ]
        pixels = np.asarray(out)[0]
        if pixels.shape != (3, self.size, self.size):
            raise SourceError(
                f"the model's image processor ({type(self.processor).__name__}) makes images of shape "
                f"{tuple(pixels.shape)}, but the task's image_size is {self.size}: set image_size to the size it "
                "produces (its crop_size or size in preprocessor_config.json), or data.image_processor: builtin "
                "to resize and crop to image_size instead"
            )
        if pixels.dtype != np.uint8:  # a backend that resizes in floating point: round back to 8 bits
            pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(pixels)

    def describe(self) -> dict[str, Any]:
        return {"kind": "image_processor", "class": type(self.processor).__name__, "folder": PROCESSOR_DIR}

    def save(self, data_dir: Path) -> None:
        self.processor.save_pretrained(str(data_dir / PROCESSOR_DIR))


def load_processor(folder: str | Path) -> Any | None:
    """The image processor saved in ``folder`` (PIL backend: the same pixels on every machine), or None."""
    folder = Path(folder)
    if not (folder / PROCESSOR_FILE).is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    except (TypeError, ValueError, KeyError):  # a processor without a PIL backend: its default one
        return AutoImageProcessor.from_pretrained(str(folder))


def choose_transform(
    source: Mapping[str, Any], model_dir: str | Path | None, size: int, crop_fraction: float
) -> ResizeCrop | ModelProcessor:
    """The evaluation transform that ``data.image_processor`` asks for (see the module docstring)."""
    choice = source.get("image_processor", "auto")
    if choice not in PROCESSOR_CHOICES:
        raise SourceError(f"data.image_processor must be one of {', '.join(PROCESSOR_CHOICES)}, got {choice!r}")
    processor = load_processor(model_dir) if model_dir is not None and choice != "builtin" else None
    if processor is not None:
        return ModelProcessor(processor, size)
    if choice == "model":
        where = f"{model_dir}/{PROCESSOR_FILE}" if model_dir is not None else "the model folder"
        raise SourceError(
            f"data.image_processor is 'model' but {where} does not exist (the model ships no image processor); "
            "use image_processor: auto or builtin (shorter side to image_size / crop_fraction, centre crop)"
        )
    return ResizeCrop(size, crop_fraction)


def transform_from_record(data_dir: str | Path, record: Mapping[str, Any]) -> ResizeCrop | ModelProcessor:
    """The transform a prepared data folder was made with (to decode its encoded split for evaluation)."""
    described = record.get("transform") or {"kind": "resize_crop"}
    size = record["image_size"]
    if described["kind"] == "image_processor":
        processor = load_processor(Path(data_dir) / described["folder"])
        if processor is None:
            raise FileNotFoundError(f"{data_dir}/{described['folder']} is missing; rerun prepare_data")
        return ModelProcessor(processor, size)
    return ResizeCrop(size, record.get("crop_fraction", described.get("crop_fraction", 1.0)))


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def augment_settings(source: Mapping[str, Any]) -> dict[str, Any] | None:
    """``data.augment`` with defaults filled in, or None when augmentation is off."""
    given = source.get("augment") or {}
    settings = {**AUGMENT_DEFAULTS, **given}
    if not settings["enabled"]:
        return None
    for key, low_limit in (("scale", 0.0), ("ratio", 0.0)):
        low, high = (float(v) for v in settings[key])
        if not (low_limit < low <= high) or (key == "scale" and high > 1.0):
            bound = "0 < low <= high <= 1" if key == "scale" else "0 < low <= high"
            raise SourceError(f"data.augment.{key} must be [low, high] with {bound}, got {settings[key]}")
        settings[key] = [low, high]
    return {"scale": settings["scale"], "ratio": settings["ratio"], "flip": bool(settings["flip"])}


def uniforms(seed: int, step: int, position: int) -> Iterator[float]:
    """Endless uniform [0, 1) numbers for one image of one batch: SHA-256 of (seed, step, position, draw)."""
    draw = 0
    while True:
        digest = hashlib.sha256(f"{seed}\0augment\0{step}\0{position}\0{draw}".encode()).digest()
        for offset in range(0, 32, 8):
            yield int.from_bytes(digest[offset : offset + 8], "big") / 2**64
        draw += 1


def crop_box(width: int, height: int, scale: list[float], ratio: list[float], u: Iterator[float]) -> tuple:
    """torchvision's RandomResizedCrop parameters: ``(left, top, right, bottom)`` of a box covering a random
    share ``scale`` of the area with a log-uniform aspect ``ratio``; after ten misses, the largest centred box
    whose aspect lies within ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RRC_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * next(u))
        aspect = math.exp(log_low + (log_high - log_low) * next(u))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(next(u) * (height - h + 1)), height - h)
            left = min(int(next(u) * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def augment(image: Image.Image, size: int, settings: Mapping[str, Any], u: Iterator[float]) -> np.ndarray:
    """uint8 ``[3, size, size]``: a random resized crop of ``image`` and (with ``flip``) a coin-flip mirror."""
    image = image.convert("RGB")
    flip = settings["flip"] and next(u) < 0.5
    box = crop_box(image.width, image.height, settings["scale"], settings["ratio"], u)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()
