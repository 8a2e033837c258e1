"""Where images come from: one *pool* per source split, read lazily, with only the chosen rows decoded.

A pool has ``len`` images in a canonical (seed-free) order and hands out the images at requested indices as
:class:`ImageRef` objects (a file, encoded bytes or an in-memory image, decoded only when needed). Sources
(``source["kind"]``):

- ``fashion_mnist``: the Debian package ``dataset-fashion-mnist`` (idx files); pools ``train`` and ``test``.
- ``imagefolder``: ``path/<pool>/<class>/<image>``; classes are the sorted folder names.
- ``ilsvrc_val``: the ILSVRC2012 release as image-net.org (or Kaggle's ImageNet localisation challenge) ships it:
  the flat validation folder ``path/ILSVRC2012_val_00000001.JPEG`` ... ``00050000.JPEG`` (pool ``validation``)
  labelled by ``LOC_val_solution.csv`` (synset ids) or the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (1-based ILSVRC2012_IDs, read through the devkit's ``data/meta.mat``), and optionally ``train_path``, the
  training images in one folder per synset (pool ``train``). Class ``i`` is the ``i``-th synset of
  ``LOC_synset_mapping.txt`` (the synset ids sorted, which is the order of torchvision's ImageFolder and of the
  ``id2label`` of the hub's ImageNet classifiers) or, without it, of the sorted synset ids of ``meta.mat``.
- ``parquet``: a local copy of a hub dataset's Parquet export, ``path/<config>/<split>/0000.parquet`` ...
  (``name`` is the config folder, ``default`` when present), image column a ``{bytes, path}`` struct and an
  integer label column (class names from the files' ``huggingface`` schema metadata). Row counts come from the
  files' footers; only the row groups holding chosen rows are read.
- ``hub``: a ``datasets`` dataset on the hub (or a local folder) resolved with ``datasets.load_dataset_builder``
  (nothing downloaded but the card). Parquet data files (any dataset published as Parquet, or the hub's export
  at ``revision: refs/convert/parquet``) are read like ``parquet`` above, over ``hf://`` range requests; other
  formats (e.g. WebDataset shards) are streamed once when the dataset card gives the split's row count. A
  dataset defined by a loading script (ILSVRC/imagenet-1k on its main branch) is refused by ``datasets`` >= 4;
  that and every other hub failure (gated, not logged in, offline, no such revision) stops with the fix.

Pools follow the kind's default (:data:`DEFAULT_POOLS`: calib and test from ``validation``, valid and train
from ``train``, as in the paper) unless ``pools: {split: pool}`` overrides them.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import gzip
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ffmerge.data.image_transforms import check_mode, decode
from ffmerge.data.translation import PARQUET_REVISION, hub_load_arguments
from ffmerge.sources import SourceError, looks_offline, sha256_file

VALID_KINDS = ("fashion_mnist", "hub", "imagefolder", "parquet", "ilsvrc_val")
DEFAULT_POOLS = {"test": "validation", "calib": "validation", "valid": "train", "train": "train"}
FASHION_MNIST_POOLS = {"test": "test", "calib": "test", "valid": "train", "train": "train"}
# ImageNet evaluation crops 224 of 256 px; Fashion-MNIST's 28 px objects fill the frame, so keep it whole
DEFAULT_CROP_FRACTION = {
    "fashion_mnist": 1.0,
    "hub": 0.875,
    "imagefolder": 0.875,
    "parquet": 0.875,
    "ilsvrc_val": 0.875,
}
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
ILSVRC_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.(?:jpe?g|png)", re.IGNORECASE)
ILSVRC_LABEL_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")
ILSVRC_SYNSET_FILES = ("LOC_synset_mapping.txt",)
ILSVRC_META_FILES = ("meta.mat", "ILSVRC2012_devkit_t12/data/meta.mat")
ILSVRC_CLASSES = 1000
WNID = re.compile(r"n\d{8}")
# Where to get ImageNet without the hub (named by every failure to load it)
LOCAL_IMAGE_HINT = (
    "Without the hub, point data at a local copy: the ILSVRC2012 validation folder {kind: ilsvrc_val, path: "
    "DIR/val, labels: LOC_val_solution.csv, synsets: LOC_synset_mapping.txt, train_path: DIR/train} (image-net.org "
    "or Kaggle's imagenet-object-localization-challenge), a downloaded Parquet export {kind: parquet, path: DIR} "
    "(hf download REPO --repo-type dataset --revision refs/convert/parquet --local-dir DIR), or class folders "
    "{kind: imagefolder, path: DIR} (DIR/<pool>/<class>/<image>). See docs/pipeline.md, 'Image data'."
)


# --------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------


class ImageRef:
    """One source image before decoding: a file (``path``), encoded bytes (``data``) or a PIL ``image``."""

    __slots__ = ("where", "path", "data", "image")

    def __init__(self, where: str, *, path: Path | str | None = None, data: bytes | None = None, image=None):
        self.where, self.path, self.data, self.image = where, path, data, image

    def open(self) -> Image.Image:
        """The decoded image (8-bit modes only; see :func:`check_mode`)."""
        if self.image is not None:
            check_mode(self.image, self.where)
            return self.image
        return decode(self.encoded(), self.where)

    def encoded(self) -> bytes:
        """The image file's bytes as the source has them (an in-memory image is written as PNG, losslessly)."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return _read_bytes(self.path)
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


class Pool:
    """One source split: ``len`` images in a canonical (seed-free) order, their labels and a fingerprint."""

    name: str
    classes: list[str]
    fingerprint: dict[str, Any]
    # whether :meth:`read` hands images out in the requested order (random access) or in storage order
    in_order = True

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, ImageRef, int]]:
        """``(position in indices, image, label)`` for every index; see :attr:`in_order`."""
        raise NotImplementedError


class ArrayPool(Pool):
    """Grayscale images held as a uint8 array (Fashion-MNIST: 47 MB for the whole training file)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], fingerprint: dict):
        self.name, self.images, self.labels = name, images, labels
        self.classes, self.fingerprint = list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, ImageRef, int]]:
        for k, i in enumerate(indices):
            yield k, ImageRef(f"{self.name} image {i}", image=Image.fromarray(self.images[i])), int(self.labels[i])


class FileListPool(Pool):
    """Image files with known labels, in a fixed order."""

    def __init__(self, name: str, files: list[tuple[Path, int]], classes: Sequence[str], fingerprint: dict):
        self.name, self.files, self.classes, self.fingerprint = name, files, list(classes), fingerprint

    def __len__(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, ImageRef, int]]:
        for k, i in enumerate(indices):
            path, label = self.files[i]
            yield k, ImageRef(str(path), path=path), label


class FolderPool(FileListPool):
    """``root/<class>/<file>`` image files, sorted by class then relative path."""

    def __init__(self, name: str, root: Path, classes: Sequence[str]):
        index = {c: i for i, c in enumerate(classes)}
        files = [
            (path, index[path.parent.name])
            for c in classes
            if (root / c).is_dir()
            for path in sorted((root / c).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        super().__init__(name, files, classes, {"folder": str(root), "listing_sha256": _listing_sha256(root, files)})
        self.root = root


def _listing_sha256(root: Path, files: list[tuple[Path, int]]) -> str:
    listing = "\n".join(f"{p.relative_to(root)}\t{p.stat().st_size}" for p, _ in files)
    return hashlib.sha256(listing.encode()).hexdigest()


class ParquetPool(Pool):
    """Parquet files of one split (a hub export's ``CONFIG/SPLIT/0000.parquet`` ..., local or ``hf://``).

    The length comes from the files' footers; :meth:`read` opens each file once, reads only the row groups
    that hold requested rows (only the image and label columns) and hands rows out in storage order.
    ``explain`` turns a failure to read a file into a :class:`SourceError` that names the fix.
    """

    in_order = False

    def __init__(
        self,
        name: str,
        files: Sequence[str],
        image_field: str,
        label_field: str,
        explain: Callable[[Exception, str], SourceError] | None = None,
    ):
        self.name, self.files = name, list(files)
        self.image_field, self.label_field = image_field, label_field
        self._explain = explain or _parquet_read_error
        self._groups: list[tuple[int, int, int]] = []  # (file index, row group, first row in the pool)
        entries, names, total = [], None, 0
        for number, file in enumerate(self.files):
            with self._opened(file) as parquet:
                columns = parquet.schema_arrow.names
                missing = [c for c in (image_field, label_field) if c not in columns]
                if missing:
                    raise SourceError(
                        f"{file} lacks columns {missing}; it has {columns}. Set data.image_field / data.label_field"
                    )
                meta = parquet.metadata
                for group in range(meta.num_row_groups):
                    self._groups.append((number, group, total))
                    total += meta.row_group(group).num_rows
                file_names = _class_names(parquet, label_field)
                entries.append({"file": file, "rows": meta.num_rows})
            if names is not None and file_names != names:
                raise SourceError(f"{file} names other classes than {self.files[0]}: the files are not one split")
            names = file_names
        self._starts = [start for _, _, start in self._groups]
        self._length = total
        self.classes = names if names else []
        self.fingerprint = {"files": entries}

    def __len__(self) -> int:
        return self._length

    def count_classes(self) -> int:
        """For files without ClassLabel names: the largest label + 1, from column statistics where present."""
        largest = -1
        for file in self.files:
            with self._opened(file) as parquet:
                largest = max(largest, _label_max(parquet, self.label_field))
        return largest + 1

    @contextlib.contextmanager
    def _opened(self, file: str) -> Iterator[Any]:
        import pyarrow.parquet as pq

        try:
            with contextlib.ExitStack() as stack:
                if _is_url(file):
                    import fsspec

                    fs, path = fsspec.core.url_to_fs(file)
                    handle = stack.enter_context(fs.open(path, "rb"))
                    parquet = pq.ParquetFile(handle)
                else:
                    parquet = pq.ParquetFile(file)
                stack.callback(parquet.close)
                yield parquet
        except SourceError:
            raise
        except Exception as exc:  # pyarrow, fsspec and HTTP errors alike
            raise self._explain(exc, file) from exc

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, ImageRef, int]]:
        by_group: dict[int, list[tuple[int, int]]] = {}
        for k, i in enumerate(indices):
            group = bisect.bisect_right(self._starts, i) - 1
            by_group.setdefault(group, []).append((i - self._starts[group], k))
        by_file: dict[int, list[int]] = {}
        for group in sorted(by_group):
            by_file.setdefault(self._groups[group][0], []).append(group)
        columns = [self.image_field, self.label_field]
        for number, groups in sorted(by_file.items()):
            file = self.files[number]
            with self._opened(file) as parquet:
                for group in groups:
                    rows = sorted(by_group[group])
                    try:
                        table = parquet.read_row_group(self._groups[group][1], columns=columns)
                    except Exception as exc:
                        raise self._explain(exc, file) from exc
                    table = table.take([row for row, _ in rows])
                    images, labels = (table.column(c).to_pylist() for c in columns)
                    for (row, k), image, label in zip(rows, images, labels, strict=True):
                        where = f"{file} (row group {self._groups[group][1]}, row {row})"
                        yield k, _struct_image(image, where), _label(label, where)


def _class_names(parquet: Any, label_field: str) -> list[str] | None:
    """ClassLabel names from the ``huggingface`` schema metadata that ``datasets`` writes, if any."""
    try:
        from datasets import Features
    except ImportError:
        return None
    try:
        feature = Features.from_arrow_schema(parquet.schema_arrow).get(label_field)
    except Exception:  # metadata of another writer
        return None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _label_max(parquet: Any, label_field: str) -> int:
    meta, schema = parquet.metadata, parquet.schema  # statistics are kept per leaf column (a struct has several)
    column = [schema.column(i).path for i in range(len(schema))].index(label_field)
    largest = -1
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if stats is not None and stats.has_min_max:
            largest = max(largest, int(stats.max))
        else:
            values = parquet.read_row_group(group, columns=[label_field]).column(0).to_pylist()
            largest = max([largest, *(int(v) for v in values if v is not None)])
    return largest


def _struct_image(value: Any, where: str) -> ImageRef:
    """An image cell: ``datasets``' ``{bytes, path}`` struct or plain bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return ImageRef(where, data=value["bytes"])
        if value.get("path"):
            return ImageRef(f"{where}: {value['path']}", path=value["path"])
    elif isinstance(value, bytes | bytearray):
        return ImageRef(where, data=bytes(value))
    elif isinstance(value, Image.Image):
        return ImageRef(where, image=value)
    raise SourceError(f"{where}: the image cell holds no image bytes ({type(value).__name__})")


def _label(value: Any, where: str) -> int:
    if value is None:
        raise SourceError(f"{where}: the label is missing (null)")
    return int(value)


def _is_url(file: str | Path) -> bool:
    return "://" in str(file)


def _read_bytes(path: Path | str) -> bytes:
    if _is_url(path):
        import fsspec

        with fsspec.open(str(path), "rb") as fh:
            return fh.read()
    return Path(path).read_bytes()


def _parquet_read_error(exc: Exception, file: str) -> SourceError:
    return SourceError(f"could not read the Parquet file {file}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# Loading the pools of a source
# --------------------------------------------------------------------------------------------


def load_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    """The pools ``needed`` by the requested splits, for a source of any kind."""
    kind = source.get("kind")
    loaders = {
        "fashion_mnist": _fashion_mnist_pools,
        "hub": _hub_pools,
        "imagefolder": _folder_pools,
        "parquet": _parquet_pools,
        "ilsvrc_val": _ilsvrc_pools,
    }
    if kind not in loaders:
        raise SourceError(f"Unknown image source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
    pools = loaders[kind](source, needed)
    for pool in pools.values():
        if isinstance(pool, ParquetPool) and not pool.classes:
            pool.classes = [str(i) for i in range(pool.count_classes())]
    return pools


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
    pools = {p: FolderPool(p, root / p, classes) for p in sorted(needed)}
    for pool in pools.values():
        if not len(pool):
            _explain_empty_folder(pool.root)
    return pools


def _explain_empty_folder(folder: Path) -> None:
    """A pool folder without images in class folders: say what it holds instead."""
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose and all(ILSVRC_VAL_NAME.fullmatch(name) for name in loose[:100]):
        raise SourceError(
            f"{folder} holds {len(loose)} images named like the ILSVRC2012 validation set ({loose[0]}) directly, "
            "not in class folders, so kind imagefolder finds no labelled image. Use {kind: ilsvrc_val, path: "
            f"{folder}, labels: LOC_val_solution.csv (or the devkit's ILSVRC2012_validation_ground_truth.txt with "
            "devkit_meta: meta.mat), synsets: LOC_synset_mapping.txt}; train_path: the train folder if needed"
        )
    if loose:
        raise SourceError(
            f"{folder} holds {len(loose)} images ({loose[0]}, ...) directly, not in class folders: imagefolder "
            "reads <path>/<pool>/<class>/<image>, the class being the folder name; sort them into class folders"
        )
    raise SourceError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}) in class folders")


# --------------------------------------------------------------------------------------------
# Parquet: local copies and the hub
# --------------------------------------------------------------------------------------------


def local_parquet_files(source: dict, pool: str) -> list[str]:
    """The Parquet files of ``pool`` in a ``kind: parquet`` source (``data_files`` overrides the layout)."""
    root = Path(source["path"])
    data_files = source.get("data_files")
    if isinstance(data_files, dict) and pool in data_files:
        patterns = data_files[pool] if isinstance(data_files[pool], list) else [data_files[pool]]
        files = sorted({str(p) for pattern in patterns for p in root.glob(pattern) if p.is_file()})
        if not files:
            raise SourceError(f"data_files pattern(s) {patterns} for pool {pool!r} match no file under {root}")
        return files
    config = parquet_config_dir(source)
    files = sorted(str(p) for p in (config / pool).glob("*.parquet"))
    if files:
        return files
    if (config / f"partial-{pool}").is_dir():
        raise SourceError(_partial_message(str(config / f"partial-{pool}"), pool))
    present = sorted(p.name for p in config.iterdir() if p.is_dir()) if config.is_dir() else []
    raise SourceError(
        f"no Parquet files for pool {pool!r} in {config / pool} (folders there: {', '.join(present) or 'none'}). "
        "kind parquet reads the hub export's layout <path>/<config>/<split>/NNNN.parquet (config: data.name, "
        "default 'default' when that folder exists); map splits to the folders present with pools: {split: "
        "folder}, or list files with data_files: {pool: GLOB}"
    )


def parquet_config_dir(source: dict) -> Path:
    """The folder holding the split folders of a ``kind: parquet`` source."""
    root = Path(source["path"])
    name = source.get("name") or source.get("data_dir")
    if name:
        return root / name
    return root / "default" if (root / "default").is_dir() else root


def _parquet_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    root = Path(source["path"])
    if not root.is_dir():
        raise SourceError(f"Parquet folder {root} does not exist. {LOCAL_IMAGE_HINT}")
    image_field, label_field = source.get("image_field", "image"), source.get("label_field", "label")
    return {
        pool: ParquetPool(pool, local_parquet_files(source, pool), image_field, label_field) for pool in sorted(needed)
    }


def _partial_message(where: str, pool: str) -> str:
    return (
        f"{where}: the hub's Parquet export of split {pool!r} is partial (the dataset viewer converts only the "
        "first 5 GB of a big split, into a partial-SPLIT folder), so it is a biased slice, not the split. "
        + LOCAL_IMAGE_HINT
    )


def _hub_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError("Hub image sources need the 'datasets' package: pip install 'ffmerge[data]'") from exc
    args, kwargs = hub_load_arguments(source)
    try:
        builder = datasets.load_dataset_builder(*args, **kwargs)
    except (OSError, ConnectionError, RuntimeError, ValueError) as exc:
        raise hub_error(exc, source) from exc
    files = {str(split): sorted(map(str, found)) for split, found in (builder.config.data_files or {}).items()}
    image_field, label_field = source.get("image_field", "image"), source.get("label_field", "label")
    pools: dict[str, Pool] = {}
    for pool in sorted(needed):
        if pool not in files:
            raise SourceError(
                f"dataset {source['path']!r} has no split {pool!r} (it has: {', '.join(files) or 'none'}); map "
                f"splits to its splits with pools: {{split: SPLIT}}"
            )
        partial = [f for f in files[pool] if f"/partial-{pool}/" in f.replace(os.sep, "/")]
        if partial:
            raise SourceError(_partial_message(partial[0], pool))
        if all(f.endswith(".parquet") for f in files[pool]):
            explain = lambda exc, file: hub_error(exc, source, file)  # noqa: E731
            pools[pool] = ParquetPool(pool, files[pool], image_field, label_field, explain)
            pools[pool].fingerprint |= {"dataset": source["path"], "revision": source.get("revision")}
        else:
            pools[pool] = _streamed_pool(builder, pool, files[pool], source, image_field, label_field)
    return pools


def _streamed_pool(
    builder: Any, pool: str, files: list[str], source: dict, image_field: str, label_field: str
) -> StreamedPool:
    import datasets

    splits = builder.info.splits or {}
    n_rows = splits[pool].num_examples if pool in splits else None
    if not n_rows:
        raise SourceError(
            f"split {pool!r} of {source['path']!r} is stored as {Path(files[0]).suffix or 'non-Parquet'} files, "
            "which can only be streamed, and the dataset card gives no row count for it (dataset_info.splits), "
            "which choosing the images needs up front. Use the hub's Parquet export (revision: "
            f"{PARQUET_REVISION}) or a local copy. {LOCAL_IMAGE_HINT}"
        )
    try:
        stream = builder.as_streaming_dataset(split=pool)
    except (OSError, ConnectionError, RuntimeError, ValueError) as exc:
        raise hub_error(exc, source) from exc
    features = stream.features or builder.info.features or {}
    if isinstance(features.get(image_field), datasets.Image):
        stream = stream.cast_column(image_field, datasets.Image(decode=False))
    names = getattr(features.get(label_field), "names", None)
    if not names:
        raise SourceError(
            f"the label column {label_field!r} of {source['path']!r} names no classes (no ClassLabel in the dataset "
            "card), which a streamed split needs up front; use its Parquet export or a local copy"
        )
    fingerprint = {"dataset": source["path"], "revision": source.get("revision"), "files": files, "rows": n_rows}
    return StreamedPool(pool, stream, n_rows, image_field, label_field, names, fingerprint, source)


class StreamedPool(Pool):
    """A split read as one stream (``datasets`` streaming): the chosen rows are picked out in one pass."""

    in_order = False

    def __init__(self, name, stream, n_rows, image_field, label_field, classes, fingerprint, source):
        self.name, self.stream, self.n_rows = name, stream, n_rows
        self.image_field, self.label_field = image_field, label_field
        self.classes, self.fingerprint, self.source = list(classes), fingerprint, source

    def __len__(self) -> int:
        return self.n_rows

    def read(self, indices: Sequence[int]) -> Iterator[tuple[int, ImageRef, int]]:
        wanted = {i: k for k, i in enumerate(indices)}
        last, seen = max(wanted, default=-1), -1
        try:
            for seen, row in enumerate(self.stream):
                if seen in wanted:
                    where = f"{self.source['path']} split {self.name!r} row {seen}"
                    yield (
                        wanted[seen],
                        _struct_image(row[self.image_field], where),
                        _label(row[self.label_field], where),
                    )
                if seen >= last:
                    return
        except (OSError, ConnectionError, RuntimeError) as exc:
            raise hub_error(exc, self.source) from exc
        raise SourceError(
            f"split {self.name!r} of {self.source['path']!r} ended after {seen + 1} rows, but its dataset card "
            f"says {self.n_rows}: the card is out of date; use the Parquet export or a local copy"
        )


def hub_error(exc: BaseException, source: dict, file: str | None = None) -> SourceError:
    """A hub failure as a :class:`SourceError` that names the fix."""
    path, revision = source["path"], source.get("revision")
    what = f"dataset {path!r}" + (f" (revision {revision})" if revision else "") + (f", file {file}" if file else "")
    text = f"{type(exc).__name__}: {exc}"
    chain = _exception_chain(exc)
    if isinstance(exc, RuntimeError) and "scripts are no longer supported" in str(exc):
        return SourceError(
            f"{what} is defined by a loading script ({str(exc).rsplit(' ', 1)[-1]}), which datasets >= 4 refuses "
            f"to run. Read the hub's Parquet export instead: revision: {PARQUET_REVISION} (e.g. {{kind: hub, path: "
            f"{path}, revision: {PARQUET_REVISION}}}; check that it is complete, big splits are cut at 5 GB). "
            + LOCAL_IMAGE_HINT
        )
    if any(type(e).__name__ == "GatedRepoError" for e in chain) or "gated" in str(exc).lower():
        return SourceError(
            f"{what} is gated on the Hugging Face hub ({exc}). Accept its terms on https://huggingface.co/datasets/"
            f"{path} while signed in, then log in on this machine: hf auth login (huggingface-cli login with older "
            "huggingface_hub) or export HF_TOKEN=<a read token>. " + LOCAL_IMAGE_HINT
        )
    if looks_offline(exc):
        return SourceError(
            f"could not reach {what} on the Hugging Face hub: this machine looks offline (HF_HUB_OFFLINE is set or "
            f"the network is unreachable) and the dataset is not cached ({text}). Run prepare_data where the hub "
            "is reachable (export HF_HUB_OFFLINE=1 to fail fast instead of retrying). " + LOCAL_IMAGE_HINT
        )
    if any(type(e).__name__ == "RevisionNotFoundError" for e in chain) or (
        "Revision" in str(exc) and "doesn't exist" in str(exc)
    ):
        return SourceError(
            f"{what}: no such revision ({exc}). The Parquet export branch {PARQUET_REVISION} exists only for "
            "datasets the hub's viewer could convert. " + LOCAL_IMAGE_HINT
        )
    if any(type(e).__name__ in ("RepositoryNotFoundError", "DatasetNotFoundError") for e in chain) or (
        isinstance(exc, FileNotFoundError) and "://" not in path
    ):
        return SourceError(
            f"could not find {what} ({text}): check data.path (a hub id such as ILSVRC/imagenet-1k, or a local "
            "folder), name and revision; a private or gated dataset also needs hf auth login (or HF_TOKEN). "
            + LOCAL_IMAGE_HINT
        )
    return SourceError(f"could not load {what}: {text}. " + LOCAL_IMAGE_HINT)


def _exception_chain(exc: BaseException | None) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


# --------------------------------------------------------------------------------------------
# ILSVRC2012: the flat validation folder and its ground truth
# --------------------------------------------------------------------------------------------


def _ilsvrc_pools(source: dict, needed: set[str]) -> dict[str, Pool]:
    unknown = sorted(needed - {"validation", "train"})
    if unknown:
        raise SourceError(
            f"kind ilsvrc_val has pools 'validation' (the flat folder in path) and 'train' (train_path), not "
            f"{unknown}; map splits with pools: {{split: validation | train}}"
        )
    wnids = ilsvrc_synsets(source)
    pools: dict[str, Pool] = {}
    if "validation" in needed:
        pools["validation"] = ilsvrc_val_pool(source, wnids)
    if "train" in needed:
        pools["train"] = ilsvrc_train_pool(source, wnids)
    return pools


def ilsvrc_file(source: dict, key: str, defaults: Sequence[str]) -> Path | None:
    """``source[key]`` (relative to the working directory; it must exist), else the first of ``defaults``
    found in the validation folder or its parent, else None."""
    root = Path(source["path"])
    if source.get(key):
        path = Path(source[key])
        if not path.is_file():
            raise SourceError(f"data.{key}: {path} does not exist")
        return path
    for folder in (root, root.parent):
        for name in defaults:
            if (folder / name).is_file():
                return folder / name
    return None


def ilsvrc_synsets(source: dict) -> list[str]:
    """The synset ids in class-index order: LOC_synset_mapping.txt's order, else meta.mat's leaves sorted, else
    (a full LOC_val_solution.csv names all 1000) the solution's synsets sorted."""
    mapping = ilsvrc_file(source, "synsets", ILSVRC_SYNSET_FILES)
    if mapping is not None:
        wnids = [line.split(maxsplit=1)[0] for line in mapping.read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = [w for w in wnids if not WNID.fullmatch(w)]
        if bad or len(set(wnids)) != len(wnids) or not wnids:
            raise SourceError(
                f"{mapping} is not a synset list (one 'nXXXXXXXX description' line per class, each synset once, "
                f"like LOC_synset_mapping.txt); first bad entry: {bad[:1] or 'a repeated synset'}"
            )
        return wnids
    meta = ilsvrc_file(source, "devkit_meta", ILSVRC_META_FILES)
    if meta is not None:
        return sorted(devkit_meta(meta).values())
    labels = ilsvrc_file(source, "labels", ILSVRC_LABEL_FILES)
    if labels is not None and labels.suffix.lower() == ".csv":
        wnids = sorted(set(loc_solution(labels).values()))
        if len(wnids) == ILSVRC_CLASSES:
            return wnids
    raise SourceError(
        f"kind ilsvrc_val needs the list of the {ILSVRC_CLASSES} synsets in class-index order: set synsets: "
        "LOC_synset_mapping.txt (Kaggle's imagenet-object-localization-challenge; one 'nXXXXXXXX description' line "
        "per class, sorted by synset id as torchvision and the hub's ImageNet models number them), or devkit_meta: "
        "the devkit's ILSVRC2012_devkit_t12/data/meta.mat"
    )


def devkit_meta(path: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset id of the 1000 leaf synsets in the devkit's ``data/meta.mat`` (MATLAB, read with
    scipy as torchvision does)."""
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        rows = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"], strict=True)
        table = {int(i): str(w) for i, w, children in rows if int(children) == 0}
    except Exception as exc:  # scipy raises ValueError, KeyError, TypeError... on other files
        raise SourceError(
            f"{path} is not the ILSVRC2012 devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID and "
            f"num_children): {type(exc).__name__}: {exc}"
        ) from exc
    if not table:
        raise SourceError(f"{path} lists no leaf synsets (num_children 0)")
    return table


def loc_solution(path: Path) -> dict[int, str]:
    """Image number -> synset id from Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the
    string starting with the synset id)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise SourceError(f"{path}: expected the header ImageId,PredictionString (LOC_val_solution.csv)")
        table = {}
        for line, row in enumerate(reader, start=2):
            match = re.fullmatch(r"ILSVRC2012_val_(\d{8})", row["ImageId"] or "")
            parts = (row["PredictionString"] or "").split()
            if not match or not parts or not WNID.fullmatch(parts[0]):
                raise SourceError(f"{path}:{line}: expected ILSVRC2012_val_NNNNNNNN,nXXXXXXXX ..., got {row}")
            table[int(match.group(1))] = parts[0]
    return table


def devkit_ground_truth(path: Path, source: dict) -> dict[int, str]:
    """Image number -> synset id from the devkit's ground truth (line k: the ILSVRC2012_ID of image k)."""
    meta = ilsvrc_file(source, "devkit_meta", ILSVRC_META_FILES)
    if meta is None:
        raise SourceError(
            f"{path} gives the devkit's ILSVRC2012_IDs (1-based, in the devkit's own order, not the sorted-synset "
            "order models use), which only the devkit's meta.mat maps to synsets: set devkit_meta: "
            "ILSVRC2012_devkit_t12/data/meta.mat, or use Kaggle's LOC_val_solution.csv instead"
        )
    id_to_wnid = devkit_meta(meta)
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split(), start=1):
        if not line.isdigit() or int(line) not in id_to_wnid:
            raise SourceError(f"{path}:{number}: {line!r} is not an ILSVRC2012_ID of {meta} (1..{len(id_to_wnid)})")
        table[number] = id_to_wnid[int(line)]
    return table


def ilsvrc_val_pool(source: dict, wnids: list[str]) -> FileListPool:
    root = Path(source["path"])
    if not root.is_dir():
        raise SourceError(f"ILSVRC2012 validation folder {root} does not exist. {LOCAL_IMAGE_HINT}")
    numbered = {}
    for path in root.iterdir():
        match = ILSVRC_VAL_NAME.fullmatch(path.name)
        if match and path.is_file():
            numbered[int(match.group(1))] = path
    if not numbered:
        subfolders = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
        hint = (
            f" It holds folders ({', '.join(subfolders)}, ...): class folders are kind imagefolder."
            if subfolders
            else ""
        )
        raise SourceError(f"{root} holds no ILSVRC2012_val_NNNNNNNN.JPEG file.{hint}")
    labels_file = ilsvrc_file(source, "labels", ILSVRC_LABEL_FILES)
    if labels_file is None:
        raise SourceError(
            f"no ground truth for the ILSVRC2012 validation images in {root}: set labels: LOC_val_solution.csv "
            "(Kaggle's imagenet-object-localization-challenge) or the devkit's ILSVRC2012_validation_ground_truth.txt "
            "(with devkit_meta: meta.mat)"
        )
    if labels_file.suffix.lower() == ".csv":
        truth = loc_solution(labels_file)
    else:
        truth = devkit_ground_truth(labels_file, source)
    unlabelled = sorted(set(numbered) - set(truth))
    missing = sorted(set(truth) - set(numbered))
    if unlabelled:
        raise SourceError(
            f"{len(unlabelled)} of the {len(numbered)} images in {root} have no label in {labels_file} (first: "
            f"{numbered[unlabelled[0]].name}): the ground truth does not belong to these images"
        )
    if missing:
        raise SourceError(
            f"{labels_file} labels {len(truth)} images but {root} holds {len(numbered)} (missing e.g. "
            f"ILSVRC2012_val_{missing[0]:08d}.JPEG): an incomplete copy? Extract ILSVRC2012_img_val.tar again"
        )
    index = {w: i for i, w in enumerate(wnids)}
    unknown = sorted({w for w in truth.values() if w not in index})
    if unknown:
        raise SourceError(f"{labels_file} names synsets not in the synset list ({unknown[:3]}); use the matching list")
    files = [(numbered[n], index[truth[n]]) for n in sorted(numbered)]
    fingerprint = {
        "folder": str(root),
        "listing_sha256": _listing_sha256(root, files),
        "labels": {labels_file.name: sha256_file(labels_file)},
    }
    return FileListPool("validation", files, wnids, fingerprint)


def ilsvrc_train_pool(source: dict, wnids: list[str]) -> FolderPool:
    if not source.get("train_path"):
        raise SourceError(
            "kind ilsvrc_val reads the validation images from path; the splits drawing from pool 'train' (valid "
            "and train by default) need train_path: the ILSVRC2012 training images in one folder per synset "
            "(ILSVRC2012_img_train.tar with each class tar extracted: DIR/n01440764/*.JPEG), or map them to the "
            "validation images with pools: {valid: validation, train: validation}"
        )
    root = Path(source["train_path"])
    if not root.is_dir():
        raise SourceError(f"data.train_path: {root} does not exist. {LOCAL_IMAGE_HINT}")
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    absent = [w for w in wnids if w not in folders]
    extra = sorted(folders - set(wnids))
    if absent or extra:
        raise SourceError(
            f"{root} must hold one folder per synset of the synset list ({len(wnids)}); missing {len(absent)} "
            f"(e.g. {absent[:2]}), unexpected {len(extra)} (e.g. {extra[:2]}). Were the class tars extracted into "
            "folders named by synset id?"
        )
    pool = FolderPool("train", root, wnids)
    if not len(pool):
        _explain_empty_folder(root)
    return pool
