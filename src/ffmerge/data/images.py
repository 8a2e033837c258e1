"""Deterministic image splits for classifier calibration, evaluation and fine-tuning.

As with text, merging is calibrated on one set of images and judged on others, so splits drawn from the
same pool must be disjoint and exactly reproducible (same seed -> byte-identical files). Each pool's images
are ordered by a seeded hash of their index (stable across Python, NumPy and torch versions, unlike a
shuffle) and handed out in :data:`SPLIT_ORDER`, so the test split depends only on the seed and its own
size, never on how many calibration or training images were asked for.

Images are decoded once, resized (shorter side to ``image_size / crop_fraction``, then a centre crop of
``image_size``), converted to RGB and stored as uint8 ``[N, 3, H, W]`` in safetensors shards of
:data:`SHARD_SIZE` images, so neither preparation nor training ever needs a whole ImageNet split in memory.
:class:`ImageSplit` reads them back lazily; :func:`load_image_split` loads a whole split.

Sources (``source["kind"]``):
- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (idx files); train and valid come from
  the 60k training file, test and calib from the 10k test file;
- ``hub``: a ``datasets`` image dataset (e.g. ``ILSVRC/imagenet-1k``); as in the paper, calib and test both
  come from the labelled ``validation`` split (disjoint), train and valid from ``train``;
- ``imagefolder``: ``path/<pool>/<class>/<image>`` on disk, pools as for ``hub``.
Any source may override the pool of each split with ``pools: {split: pool}``.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ffmerge.data.text import SPLIT_ORDER, check_split_counts
from ffmerge.sources import SourceError, looks_offline, sha256_file, write_json
from ffmerge.workflow.atomic import atomic_output_dir

SPLITS_RECORD = "splits.json"
VALID_KINDS = ("fashion_mnist", "hub", "imagefolder")
SHARD_SIZE = 2048
IMAGE_KEY, LABEL_KEY = "pixel_values", "labels"
DEFAULT_POOLS = {"test": "validation", "calib": "validation", "valid": "train", "train": "train"}
FASHION_MNIST_POOLS = {"test": "test", "calib": "test", "valid": "train", "train": "train"}
# ImageNet evaluation crops 224 of 256 px; Fashion-MNIST's 28 px objects fill the frame, so keep it whole
DEFAULT_CROP_FRACTION = {"fashion_mnist": 1.0, "hub": 0.875, "imagefolder": 0.875}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------
# Pools: where images come from
# --------------------------------------------------------------------------------------------


class Pool:
    """One source split: ``len`` images in a canonical (seed-free) order, their labels and a fingerprint."""

    name: str
    classes: list[str]
    fingerprint: dict[str, Any]

    def __len__(self) -> int:
        raise NotImplementedError

    def items(self, indices: Sequence[int]) -> Iterator[tuple[Image.Image, int]]:
        """The images and labels at ``indices``, in that order."""
        raise NotImplementedError


class ArrayPool(Pool):
    """Grayscale images held as a uint8 array (Fashion-MNIST: 47 MB for the whole training file)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], fingerprint: dict):
        self.name, self.images, self.labels = name, images, labels
        self.classes, self.fingerprint = list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def items(self, indices: Sequence[int]) -> Iterator[tuple[Image.Image, int]]:
        for i in indices:
            yield Image.fromarray(self.images[i]), int(self.labels[i])


class HubPool(Pool):
    """One split of a ``datasets`` dataset; only the selected rows are ever decoded."""

    def __init__(self, name: str, dataset: Any, image_field: str, label_field: str, fingerprint: dict):
        self.name, self.dataset = name, dataset
        self.image_field, self.label_field = image_field, label_field
        names = getattr(dataset.features.get(label_field), "names", None)  # a ClassLabel names its classes
        self.classes = list(names) if names else [str(i) for i in range(max(dataset[label_field]) + 1)]
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def items(self, indices: Sequence[int]) -> Iterator[tuple[Image.Image, int]]:
        for row in self.dataset.select(list(indices)):
            yield row[self.image_field], int(row[self.label_field])


class FolderPool(Pool):
    """``root/<class>/<file>`` image files, sorted by class then relative path."""

    def __init__(self, name: str, root: Path, classes: Sequence[str]):
        self.name, self.root, self.classes = name, root, list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.files = [
            (path, index[path.parent.name])
            for c in self.classes
            if (root / c).is_dir()
            for path in sorted((root / c).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        listing = "\n".join(f"{p.relative_to(root)}\t{p.stat().st_size}" for p, _ in self.files)
        self.fingerprint = {"folder": str(root), "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def __len__(self) -> int:
        return len(self.files)

    def items(self, indices: Sequence[int]) -> Iterator[tuple[Image.Image, int]]:
        for i in indices:
            path, label = self.files[i]
            with Image.open(path) as image:
                image.load()
                check_mode(image, str(path))
                yield image, label


def load_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    """The pools ``needed`` by the requested splits, for a source of any kind."""
    kind = source.get("kind")
    loaders = {"fashion_mnist": _fashion_mnist_pools, "hub": _hub_pools, "imagefolder": _folder_pools}
    if kind not in loaders:
        raise SourceError(f"Unknown image source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
    return loaders[kind](source, needed)


def split_pools(source: dict) -> dict[str, str]:
    """Which pool each split draws from: the kind's default, overridden by ``source["pools"]``."""
    base = FASHION_MNIST_POOLS if source.get("kind") == "fashion_mnist" else DEFAULT_POOLS
    return {**base, **source.get("pools", {})}


def _fashion_mnist_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    folder = Path(source.get("path", FASHION_MNIST_DIR))
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (folder / f).is_file()]
    if missing:
        raise SourceError(
            f"Fashion-MNIST files {missing} not found in {folder}. Install them with: "
            "apt-get install dataset-fashion-mnist (or set data.path to a folder holding the idx .gz files)"
        )
    unknown = needed - set(FASHION_MNIST_FILES)
    if unknown:
        raise SourceError(f"Fashion-MNIST has pools {sorted(FASHION_MNIST_FILES)}, not {sorted(unknown)}")
    pools = {}
    for name in sorted(needed):
        image_file, label_file = (folder / f for f in FASHION_MNIST_FILES[name])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise SourceError(f"{image_file} / {label_file}: shapes {images.shape} and {labels.shape} do not match")
        fingerprint = {f.name: sha256_file(f) for f in (image_file, label_file)}
        pools[name] = ArrayPool(name, images, labels, FASHION_MNIST_CLASSES, fingerprint)
    return pools


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format: zero bytes, a type code, the rank, big-endian dims, then the data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise SourceError(f"{path} is not an unsigned-byte IDX file (header {data[:4].hex()})")
    rank = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def _hub_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError("Hub image sources need the 'datasets' package: pip install 'ffmerge[data]'") from exc
    path, name, revision = source["path"], source.get("name"), source.get("revision")
    extra = {k: source[k] for k in ("data_dir", "data_files") if k in source}
    pools = {}
    for pool in sorted(needed):
        try:
            dataset = datasets.load_dataset(path, name, split=pool, revision=revision, **extra)
        except (OSError, ConnectionError) as exc:
            if looks_offline(exc):
                raise SourceError(
                    f"Could not load dataset {path!r} from the Hugging Face hub: this machine looks offline and "
                    "the dataset is not cached. Use {kind: fashion_mnist} (apt-get install dataset-fashion-mnist) "
                    "or {kind: imagefolder, path: ...}, or run where the hub is reachable (ImageNet also needs "
                    "its terms accepted and a token)."
                ) from exc
            raise SourceError(f"Could not load split {pool!r} of dataset {path!r}: {exc}") from exc
        fingerprint = {"dataset": path, "name": name, "revision": revision, "fingerprint": dataset._fingerprint}
        image_field, label_field = source.get("image_field", "image"), source.get("label_field", "label")
        missing = {image_field, label_field} - set(dataset.column_names)
        if missing:
            raise SourceError(f"{path} split {pool!r} lacks columns {sorted(missing)}; has {dataset.column_names}")
        pools[pool] = HubPool(pool, dataset, image_field, label_field, fingerprint)
    return pools


def _folder_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    root = Path(source["path"])
    absent = sorted(p for p in needed if not (root / p).is_dir())
    if absent:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise SourceError(
            f"image folder {root} lacks pool folders {absent} (has: {', '.join(present) or 'nothing'}); "
            "expected <path>/<pool>/<class>/<image>, or map splits to the folders present with pools: {split: folder}"
        )
    classes = sorted({d.name for p in needed for d in (root / p).iterdir() if d.is_dir()})
    return {p: FolderPool(p, root / p, classes) for p in sorted(needed)}


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
) -> dict:
    """Write ``{split}-{shard}.safetensors`` (uint8 images, int64 labels) and ``splits.json`` into ``out_dir``.

    ``splits`` gives the number of images per split. ``extra`` is merged into the record (the task stores
    what it needs to know about the model, e.g. tokens per image and normalisation). Returns the record.
    """
    _check_counts(splits, image_size)
    pool_of = split_pools(source)
    pools = load_pools(source, {pool_of[s] for s in splits})
    classes = _common_classes(pools)
    crop = float(source.get("crop_fraction", DEFAULT_CROP_FRACTION[source["kind"]]))
    chosen = _assign(pools, pool_of, splits, seed)
    info: dict[str, Any] = {}
    with atomic_output_dir(out_dir, SPLITS_RECORD) as tmp:
        for split, indices in chosen.items():
            pool = pools[pool_of[split]]
            info[split] = _write_split(tmp, split, pool, indices, image_size, crop, len(classes))
        record = {
            "seed": seed,
            "source": source,
            "image_size": image_size,
            "crop_fraction": crop,
            "classes": classes,
            "sources": {name: pool.fingerprint for name, pool in pools.items()},
            "splits": info,
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


def _write_split(
    out: Path, split: str, pool: Pool, indices: list[int], size: int, crop: float, n_classes: int
) -> dict[str, Any]:
    """Decode, resize and store one split shard by shard; return its entry of the record."""
    shards, counts = [], np.zeros(n_classes, dtype=np.int64)
    for number, start in enumerate(range(0, len(indices), SHARD_SIZE)):
        part = indices[start : start + SHARD_SIZE]
        pixels, labels = [], []
        for image, label in pool.items(part):
            pixels.append(to_pixels(image, size, crop))
            labels.append(label)
        if min(labels) < 0 or max(labels) >= n_classes:
            raise SourceError(f"split {split!r}: labels {min(labels)}..{max(labels)} outside 0..{n_classes - 1}")
        name = f"{split}-{number:05d}.safetensors"
        tensors = {IMAGE_KEY: torch.from_numpy(np.stack(pixels)), LABEL_KEY: torch.tensor(labels, dtype=torch.int64)}
        save_file(tensors, str(out / name))
        shards.append(name)
        counts += np.bincount(labels, minlength=n_classes)
    return {"n_images": len(indices), "pool": pool.name, "shards": shards, "class_counts": counts.tolist()}


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
    """A stored split, read lazily shard by shard (labels are loaded at once; they are small)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.dir = Path(data_dir)
        record = read_image_record(self.dir)
        if split not in record["splits"]:
            raise FileNotFoundError(f"No split {split!r} in {data_dir}; available: {', '.join(record['splits'])}")
        self.classes: list[str] = record["classes"]
        self._handles = [safe_open(str(self.dir / name), framework="pt") for name in record["splits"][split]["shards"]]
        sizes = [h.get_slice(LABEL_KEY).get_shape()[0] for h in self._handles]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.labels = torch.cat([h.get_tensor(LABEL_KEY) for h in self._handles])

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, start: int, stop: int) -> torch.Tensor:
        """uint8 ``[stop - start, 3, H, W]`` of a contiguous range, reading only the shards it spans."""
        parts = []
        while start < stop:
            shard = bisect.bisect_right(self._starts, start) - 1
            end = min(stop, self._starts[shard + 1])
            offset = self._starts[shard]
            parts.append(self._handles[shard].get_slice(IMAGE_KEY)[start - offset : end - offset])
            start = end
        return torch.cat(parts)

    def gather(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 images at arbitrary ``indices`` (a training batch), in that order."""
        return torch.cat([self.images(i, i + 1) for i in indices])

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
