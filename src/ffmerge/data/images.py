"""Deterministic image splits for classifier calibration, evaluation and fine-tuning.

As with text, merging is calibrated on one set of images and judged on others, so splits drawn from the
same pool must be disjoint and exactly reproducible (same seed -> byte-identical files). Each pool's images
are ordered by a seeded hash of their index (stable across Python, NumPy and torch versions, unlike a
shuffle) and handed out in :data:`SPLIT_ORDER`, so the test split depends only on the seed and its own
size, never on how many calibration or training images were asked for. A pool's length is all that the
choice needs: a Parquet split's comes from its files' footers, and only the chosen images are ever decoded.

Where the images come from (Fashion-MNIST, class folders, the ILSVRC2012 validation folder with its ground
truth, local or hub Parquet, streamed hub datasets) is :mod:`ffmerge.data.image_sources`; how they become
model inputs (the model's own image processor, or a resize and centre crop; the fine-tuning augmentation) is
:mod:`ffmerge.data.image_transforms`.

Images are decoded once (in parallel threads, one per torch thread), made into uint8 ``[3, S, S]`` and stored
in safetensors shards of :data:`SHARD_SIZE` images, so neither preparation nor training ever needs a whole
ImageNet split in memory. Sources read in storage order (Parquet row groups, streams) are first written to
staging shards in that order and then copied into the seeded order. With ``data.augment`` enabled, the train
split keeps each image's encoded bytes instead (``format: encoded``), so fine-tuning can crop the whole
source image anew for every batch. :class:`ImageSplit` reads either format back lazily;
:func:`load_image_split` loads a whole split.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ffmerge.data.image_sources import (  # noqa: F401  (re-exported: the package's image data API)
    DEFAULT_CROP_FRACTION,
    DEFAULT_POOLS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_POOLS,
    IMAGE_SUFFIXES,
    VALID_KINDS,
    ImageRef,
    Pool,
    load_pools,
    read_idx,
    split_pools,
)
from ffmerge.data.image_transforms import (  # noqa: F401
    HIGH_DEPTH_MODES,
    ModelProcessor,
    augment,
    augment_settings,
    check_mode,
    choose_transform,
    decode,
    to_pixels,
    transform_from_record,
    uniforms,
)
from ffmerge.data.text import SPLIT_ORDER, check_split_counts
from ffmerge.sources import SourceError, write_json
from ffmerge.workflow.atomic import atomic_output_dir

SPLITS_RECORD = "splits.json"
SHARD_SIZE = 2048
IMAGE_KEY, LABEL_KEY = "pixel_values", "labels"
# an encoded shard: the image files' bytes end to end, and where each starts (n + 1 offsets)
BYTES_KEY, OFFSETS_KEY = "image_bytes", "image_offsets"
STAGING_DIR = ".staging"
PIXELS, ENCODED = "pixels", "encoded"


# --------------------------------------------------------------------------------------------
# Preparing splits
# --------------------------------------------------------------------------------------------


def prepare_image_splits(
    source: dict,
    out_dir: str | Path,
    splits: dict[str, int],
    seed: int,
    image_size: int,
    extra: dict[str, Any] | None = None,
    *,
    model_dir: str | Path | None = None,
) -> dict:
    """Write ``{split}-{shard}.safetensors`` (uint8 images or encoded bytes, int64 labels) and ``splits.json``.

    ``splits`` gives the number of images per split. ``model_dir`` is the model's folder: its image processor,
    if it has one, makes the stored images (see :mod:`ffmerge.data.image_transforms`). ``extra`` is merged into
    the record (the task stores what it needs to know about the model, e.g. tokens per image and
    normalisation). Returns the record.
    """
    _check_counts(splits, image_size)
    pool_of = split_pools(source)
    augmentation = augment_settings(source)
    crop = float(source.get("crop_fraction", DEFAULT_CROP_FRACTION[source["kind"]]))
    transform = choose_transform(source, model_dir, image_size, crop)
    pools = load_pools(source, {pool_of[s] for s in splits})
    classes = _common_classes(pools)
    chosen = _assign(pools, pool_of, splits, seed)
    info: dict[str, Any] = {}
    with atomic_output_dir(out_dir, SPLITS_RECORD) as tmp:
        for split, indices in chosen.items():
            pool = pools[pool_of[split]]
            if split == "train" and augmentation is not None:
                info[split] = _write_split(tmp, split, pool, indices, _checked_bytes, len(classes), ENCODED)
            else:
                process = _pixels_by(transform)
                info[split] = _write_split(tmp, split, pool, indices, process, len(classes), PIXELS)
        if isinstance(transform, ModelProcessor):
            transform.save(tmp)
        record = {
            "seed": seed,
            "source": source,
            "image_size": image_size,
            "crop_fraction": crop,
            "transform": transform.describe(),
            "classes": classes,
            "sources": {name: pool.fingerprint for name, pool in pools.items()},
            "splits": info,
            **({"augment": augmentation} if augmentation else {}),
            **(extra or {}),
        }
        write_json(tmp / SPLITS_RECORD, record)
    return record


def _check_counts(splits: dict[str, int], image_size: int) -> None:
    check_split_counts(splits, "image")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")


def _common_classes(pools: dict[str, Pool]) -> list[str]:
    """All pools must agree on the label names, or a label index would mean different classes per split."""
    names = {tuple(p.classes) for p in pools.values()}
    if len(names) != 1:
        raise SourceError(f"the source's pools disagree on class names: {[p.classes[:5] for p in pools.values()]}")
    return list(names.pop())


def _assign(pools: dict[str, Pool], pool_of: dict[str, str], splits: dict[str, int], seed: int) -> dict[str, list]:
    """Disjoint index lists per split: each pool's seeded order, handed out in :data:`SPLIT_ORDER`."""
    order = {name: seeded_order(len(pool), seed, name) for name, pool in pools.items()}
    taken = dict.fromkeys(pools, 0)
    chosen = {}
    for split in (s for s in SPLIT_ORDER if s in splits):
        name = pool_of[split]
        start, stop = taken[name], taken[name] + splits[split]
        if stop > len(order[name]):
            raise SourceError(
                f"split {split!r} asks for {splits[split]} images but pool {name!r} has only "
                f"{len(order[name]) - start} left after the splits before it ({len(order[name])} in all); "
                "lower the split sizes"
            )
        chosen[split] = order[name][start:stop]
        taken[name] = stop
    return chosen


def seeded_order(n: int, seed: int, pool: str) -> list[int]:
    """Indices ``0..n-1`` sorted by ``sha256(seed, pool, index)``: a shuffle no library upgrade can change."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\0{pool}\0{i}".encode()).digest())


def _pixels_by(transform: Callable) -> Callable[[ImageRef], np.ndarray]:
    return lambda ref: transform(ref.open())


def _checked_bytes(ref: ImageRef) -> bytes:
    """The image's encoded bytes, decoded once now so that a broken or 16-bit file stops preparation, not a
    fine-tuning job hours later."""
    data = ref.encoded()
    decode(data, ref.where)
    return data


def decode_workers() -> int:
    """Threads that decode images: one per torch thread (the job's CPUs; PIL releases the GIL)."""
    return max(1, torch.get_num_threads())


def parallel_map(function: Callable, items: Iterator, workers: int) -> Iterator:
    """``function(item)`` for every item, in order, computed by ``workers`` threads a bounded window ahead."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as executor:
        window: deque = deque()
        for item in items:
            window.append(executor.submit(function, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _write_split(
    out: Path, split: str, pool: Pool, indices: list[int], process: Callable, n_classes: int, fmt: str
) -> dict[str, Any]:
    """Decode (or copy) and store one split shard by shard; return its entry of the record."""
    labelled = ((k, ref, _check_label(label, split, pool, n_classes, ref)) for k, ref, label in pool.read(indices))
    rows = parallel_map(lambda item: (item[0], process(item[1]), item[2]), labelled, decode_workers())
    if pool.in_order:
        shards, labels = _write_in_order(out, split, rows, fmt)
    else:
        shards, labels = _write_staged(out, split, rows, fmt, len(indices), pool)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)
    entry = {"n_images": len(indices), "pool": pool.name, "shards": shards, "class_counts": counts.tolist()}
    return entry | ({"format": ENCODED} if fmt == ENCODED else {})


def _check_label(label: int, split: str, pool: Pool, n_classes: int, ref: ImageRef) -> int:
    if label < 0:
        raise SourceError(
            f"split {split!r}: {ref.where} of pool {pool.name!r} has label {label} (unlabelled; ImageNet's test "
            "labels are not public): draw the split from a labelled pool, e.g. pools: {test: validation}"
        )
    if label >= n_classes:
        raise SourceError(f"split {split!r}: {ref.where} has label {label}, outside 0..{n_classes - 1}")
    return label


def _write_in_order(out: Path, split: str, rows: Iterator, fmt: str) -> tuple[list[str], list[int]]:
    shards, labels, values, shard_labels = [], [], [], []
    for _, value, label in rows:
        values.append(value)
        shard_labels.append(label)
        if len(values) == SHARD_SIZE:
            shards.append(_save_shard(out, f"{split}-{len(shards):05d}.safetensors", values, shard_labels, fmt))
            labels += shard_labels
            values, shard_labels = [], []
    if values:
        shards.append(_save_shard(out, f"{split}-{len(shards):05d}.safetensors", values, shard_labels, fmt))
        labels += shard_labels
    return shards, labels


def _write_staged(out: Path, split: str, rows: Iterator, fmt: str, n: int, pool: Pool) -> tuple[list[str], list[int]]:
    """Rows that arrive in storage order: stage them in that order, then copy them into positions 0..n-1."""
    staging = out / STAGING_DIR
    staging.mkdir(exist_ok=True)
    located: list[tuple[int, int] | None] = [None] * n
    staged, values, labels = [], [], []
    for k, value, label in rows:
        located[k] = (len(staged), len(values))
        values.append(value)
        labels.append(label)
        if len(values) == SHARD_SIZE:
            staged.append(staging / _save_shard(staging, f"{split}-{len(staged):05d}.safetensors", values, labels, fmt))
            values, labels = [], []
    if values:
        staged.append(staging / _save_shard(staging, f"{split}-{len(staged):05d}.safetensors", values, labels, fmt))
    if any(place is None for place in located):
        delivered = sum(place is not None for place in located)
        raise SourceError(f"pool {pool.name!r} delivered {delivered} of the {n} images asked for split {split!r}")
    readers = [ShardReader(path) for path in staged]
    shards, all_labels = [], []
    for start in range(0, n, SHARD_SIZE):
        places = located[start : start + SHARD_SIZE]
        values = [readers[s].value(r) for s, r in places]
        shard_labels = [int(readers[s].labels[r]) for s, r in places]
        shards.append(_save_shard(out, f"{split}-{len(shards):05d}.safetensors", values, shard_labels, fmt))
        all_labels += shard_labels
    del readers
    for path in staged:
        path.unlink()
    staging.rmdir()
    return shards, all_labels


def _save_shard(folder: Path, name: str, values: list, labels: list[int], fmt: str) -> str:
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if fmt == PIXELS:
        tensors = {IMAGE_KEY: torch.from_numpy(np.stack(values)), LABEL_KEY: label_tensor}
    else:
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
        data = np.frombuffer(b"".join(values), dtype=np.uint8).copy()
        tensors = {BYTES_KEY: torch.from_numpy(data), OFFSETS_KEY: torch.from_numpy(offsets), LABEL_KEY: label_tensor}
    save_file(tensors, str(folder / name))
    return name


class ShardReader:
    """One shard of either format, read row by row."""

    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="pt")
        self.labels = self.handle.get_tensor(LABEL_KEY)
        keys = set(self.handle.keys())
        self.format = ENCODED if BYTES_KEY in keys else PIXELS
        self.offsets = self.handle.get_tensor(OFFSETS_KEY).tolist() if self.format == ENCODED else None

    def __len__(self) -> int:
        return len(self.labels)

    def value(self, row: int) -> np.ndarray | bytes:
        """Row ``row``: uint8 pixels ``[3, H, W]`` or the encoded image's bytes."""
        if self.format == PIXELS:
            return self.handle.get_slice(IMAGE_KEY)[row : row + 1][0].numpy()
        return self.handle.get_slice(BYTES_KEY)[self.offsets[row] : self.offsets[row + 1]].numpy().tobytes()


# --------------------------------------------------------------------------------------------
# Reading splits
# --------------------------------------------------------------------------------------------


def read_image_record(data_dir: str | Path) -> dict:
    """Content of ``splits.json`` (classes, counts, seed, source fingerprints, task extras)."""
    path = Path(data_dir) / SPLITS_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {data_dir} holds no prepared image splits; rerun prepare_data")
    return json.loads(path.read_text(encoding="utf-8"))


class ImageSplit:
    """A stored split, read lazily shard by shard (labels are loaded at once; they are small).

    An ``encoded`` split (the train split of an augmented task) is decoded on demand: :meth:`images` and
    :meth:`gather` with the transform the data was prepared with, :meth:`augmented` with a random resized
    crop and flip drawn from ``(seed, step)``.
    """

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        record = read_image_record(self.dir)
        if split not in record["splits"]:
            raise FileNotFoundError(f"No split {split!r} in {data_dir}; available: {', '.join(record['splits'])}")
        self.record, self.name = record, split
        self.classes: list[str] = record["classes"]
        self.format = record["splits"][split].get("format", PIXELS)
        self._shards = [ShardReader(self.dir / name) for name in record["splits"][split]["shards"]]
        self._handles = [shard.handle for shard in self._shards]
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s in self._shards])]).tolist()
        self.labels = torch.cat([shard.labels for shard in self._shards])
        self._transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def _locate(self, index: int) -> tuple[ShardReader, int]:
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._shards[shard], index - self._starts[shard]

    def images(self, start: int, stop: int) -> torch.Tensor:
        """uint8 ``[stop - start, 3, H, W]`` of a contiguous range, reading only the shards it spans."""
        if self.format == ENCODED:
            return self.gather(range(start, stop))
        parts = []
        while start < stop:
            shard = bisect.bisect_right(self._starts, start) - 1
            end = min(stop, self._starts[shard + 1])
            offset = self._starts[shard]
            parts.append(self._handles[shard].get_slice(IMAGE_KEY)[start - offset : end - offset])
            start = end
        return torch.cat(parts)

    def encoded(self, index: int) -> bytes:
        """The stored file bytes of image ``index`` of an encoded split."""
        if self.format != ENCODED:
            raise ValueError(f"split {self.name!r} of {self.dir} stores pixels, not encoded images")
        shard, row = self._locate(index)
        return shard.value(row)

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images at arbitrary ``indices`` (a training batch), in that order."""
        if self.format != ENCODED:
            return torch.cat([self.images(i, i + 1) for i in indices])
        if self._transform is None:
            self._transform = transform_from_record(self.dir, self.record)
        transform, where = self._transform, f"{self.dir} split {self.name}"
        work = ((self.encoded(i), i) for i in indices)
        arrays = parallel_map(
            lambda item: transform(decode(item[0], f"{where} image {item[1]}")), work, decode_workers()
        )
        return torch.from_numpy(np.stack(list(arrays)))

    def augmented(self, indices: Sequence[int], settings: dict[str, Any], *, seed: int, step: int) -> torch.Tensor:
        """uint8 ``[len(indices), 3, S, S]``: the images at ``indices``, each randomly cropped and flipped with
        numbers drawn from ``(seed, step, position in the batch)`` (see :mod:`ffmerge.data.image_transforms`)."""
        if self.format != ENCODED:
            raise ValueError(
                f"split {self.name!r} of {self.dir} stores centre-cropped pixels, which cannot be cropped anew; "
                "augmentation needs data.augment.enabled when prepare_data runs (rerun it)"
            )
        size, where = self.record["image_size"], f"{self.dir} split {self.name}"
        work = ((self.encoded(i), i, k) for k, i in enumerate(indices))

        def one(item: tuple[bytes, int, int]) -> np.ndarray:
            data, index, position = item
            return augment(decode(data, f"{where} image {index}"), size, settings, uniforms(seed, step, position))

        return torch.from_numpy(np.stack(list(parallel_map(one, work, decode_workers()))))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` in stored order."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield self.images(start, stop), self.labels[start:stop]


def load_image_split(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split: uint8 images ``[N, 3, H, W]`` and int64 labels ``[N]``."""
    stored = ImageSplit(data_dir, split)
    return stored.images(0, len(stored)), stored.labels


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images -> float32 model inputs: scale to [0, 1], then per-channel ``(x - mean) / std``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (pixels.to(torch.float32) / 255.0 - mean_t) / std_t


def model_normalization(model_dir: str | Path) -> dict[str, Any]:
    """The mean/std the model was trained with, from its saved image processor; ImageNet's if it has none.

    (Google's ViT uses 0.5/0.5, DINOv2 ImageNet's; the converted ONNX backbone ships no processor.)
    """
    path = Path(model_dir) / "preprocessor_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if "image_mean" in config and "image_std" in config:
            return {"mean": list(config["image_mean"]), "std": list(config["image_std"]), "from": path.name}
    return {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD), "from": "imagenet default"}
