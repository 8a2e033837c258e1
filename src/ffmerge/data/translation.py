"""Deterministic sentence-pair splits for translation: calibration, selection, test and fine-tuning.

The paper's translation experiments (OPUS-MT zh->en on Tatoeba) calibrate merging on validation sentences,
choose the merge window on a 2,000-sentence validation subset, report BLEU on test and fine-tune on the
Tatoeba Challenge training data. The splits must be exactly reproducible (same seed -> byte-identical
files) and disjoint: a source sentence used for calibration must never be scored during selection, or
window choices would reward memorisation of the calibration data.

Pairs are grouped by source sentence (Tatoeba gives several references for one sentence), so one source
sentence lands in one split only, across all splits; pools are ordered by a seeded hash of the source
text, which does not depend on the input order or on Python's ``random``.

The training pool (the Tatoeba Challenge's tens of millions of pairs) is never held whole: it is read once,
line by line (a TSV, optionally gzipped) or in Arrow batches (a hub split), keeping only the groups that can
still be among the first ``splits.train`` pairs in the seeded order (a bounded "bottom-k" sample). The
result is exactly what sorting the whole pool would give, at a memory cost of about ``splits.train`` pairs.

Hub sources: Helsinki-NLP/tatoeba_mt is defined by a loading script that current ``datasets`` refuses, so
it is read from the hub's Parquet export (``revision: refs/convert/parquet``). That branch holds one folder
per config (``eng-zho/test/0000.parquet``) and ``datasets`` sees it as plain data files with one
``default`` config, so the config is selected as ``data_dir`` (``name`` is used as ``data_dir`` for that
revision, and for a local folder that holds a ``name`` subfolder: a downloaded copy of the export).

Output per split: ``{split}.jsonl`` with ``{"source": ..., "target": ...}`` lines, plus ``splits.json``
(source, seed, counts, sha256 of every file).
"""

from __future__ import annotations

import array
import gzip
import hashlib
import heapq
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ffmerge.data.text import SPLIT_ORDER, check_split_counts
from ffmerge.sources import SourceError, atomic_output_dir, looks_offline, sha256_file, write_json

SPLITS_RECORD = "splits.json"
VALID_KINDS = ("hub", "local")
# Splits that share a pool take their sentences in this order, so the test split depends only on the seed
# and its own size, never on how many calibration or training pairs are asked for.
# Which pool feeds each split: calibration and selection both come from validation data (as in the paper).
POOL_OF = {"calib": "validation", "valid": "validation", "test": "test", "train": "train"}
# ``local`` kind: one TSV file per pool, ``source<TAB>target`` per line.
LOCAL_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
# ``hub`` kind: the dataset split read for each pool, unless the source overrides it with ``splits``.
HUB_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
# Tatoeba Challenge rows (Helsinki-NLP/tatoeba_mt): the config "eng-zho" holds English in sourceString.
TATOEBA_COLUMNS = ("sourceString", "targetString")
SPLIT_SUFFIX = ".jsonl"
# The hub branch that holds a dataset's Parquet export, one folder per config: CONFIG/SPLIT/0000.parquet
PARQUET_REVISION = "refs/convert/parquet"
# Pools read as a stream and sampled on the fly (never held whole); each feeds exactly one split.
STREAMED_POOLS = ("train",)
HUB_BATCH_ROWS = 10_000
# How to get the Tatoeba Challenge training pairs (named when the training file is missing)
TRAIN_DATA_HINT = (
    "The Tatoeba Challenge training data is not on the hub: download the language pair's release from "
    "https://github.com/Helsinki-NLP/Tatoeba-Challenge (data/README.md links one archive per pair, e.g. eng-zho "
    "with train.src.gz / train.trg.gz), then write source<TAB>target lines with the source language first, e.g. "
    "paste <(zcat train.trg.gz) <(zcat train.src.gz) > train.tsv for zho-eng (check which side is Chinese), or keep "
    "it gzipped and set files: {train: train.tsv.gz}. The file is read as a stream; see docs/slurm.md."
)

Pair = tuple[str, str]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def prepare_translation_splits(source: dict, out_dir: str | Path, splits: dict[str, int], seed: int) -> dict:
    """Write ``{split}.jsonl`` and ``splits.json`` into ``out_dir``; return the record.

    Nothing is written unless every split can be filled: a pool that is too small stops the run with
    the number of pairs it has.
    """
    check_split_counts(splits, "sentence-pair")
    needed = {POOL_OF[split] for split in splits}
    streamed = needed & set(STREAMED_POOLS)
    pools, inputs = load_pools(source, needed - streamed)
    chosen, available = _assign(pools, {s: n for s, n in splits.items() if POOL_OF[s] not in streamed}, seed)
    pool_record = {name: {"n_pairs": len(pairs), "n_sources": available[name]} for name, pairs in pools.items()}
    for pool in sorted(streamed):  # after the other pools, so their sources can be skipped while reading
        split = next(s for s in SPLIT_ORDER if s in splits and POOL_OF[s] == pool)
        pairs, stream_inputs = stream_pool(source, pool)
        used = {src for taken in chosen.values() for src, _ in taken}
        groups, n_read = sample_groups(pairs, seed, splits[split], used)
        taken = _take(groups, splits[split])
        if len(taken) < splits[split]:
            raise SourceError(_too_small(split, pool, len(taken), splits[split], n_read, chosen))
        chosen[split] = taken
        _merge_inputs(inputs, stream_inputs)
        # distinct sources of a streamed pool are not counted (that would hold them all)
        pool_record[pool] = {"n_pairs": n_read, "n_sources": None, "streamed": True}
    chosen = {s: chosen[s] for s in SPLIT_ORDER if s in chosen}
    record = {
        "seed": seed,
        "source": source,
        "inputs": inputs,
        "pools": pool_record,
        "splits": {},
    }
    with atomic_output_dir(out_dir, SPLITS_RECORD) as tmp:
        for split, pairs in chosen.items():
            path = tmp / f"{split}{SPLIT_SUFFIX}"
            path.write_bytes(_jsonl(pairs))
            record["splits"][split] = {"n_pairs": len(pairs), "pool": POOL_OF[split], "sha256": sha256_file(path)}
        write_json(tmp / SPLITS_RECORD, record)
    return record


def load_translation_split(data_dir: str | Path, split: str) -> list[Pair]:
    """``(source, target)`` pairs of one prepared split, in file order."""
    with _split_path(data_dir, split).open(encoding="utf-8") as fh:
        return [(row["source"], row["target"]) for row in map(json.loads, fh)]


def _split_path(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}{SPLIT_SUFFIX}"
    if not path.exists():
        present = sorted(p.stem for p in Path(data_dir).glob(f"*{SPLIT_SUFFIX}"))
        raise FileNotFoundError(f"No split {split!r} in {data_dir}; available: {', '.join(present) or 'none'}")
    return path


class PairFile(Sequence):
    """The ``(source, target)`` pairs of a prepared split file, read on demand: only each line's byte offset is
    held (8 bytes a pair), so a fine-tuning job can sample a multi-million-pair train split without loading it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offsets = array.array("q")
        position = 0
        with self.path.open("rb") as fh:
            for line in fh:
                if line.strip():
                    self._offsets.append(position)
                position += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with self.path.open("rb") as fh:
            fh.seek(self._offsets[index])
            row = json.loads(fh.readline())
        return row["source"], row["target"]


def open_translation_split(data_dir: str | Path, split: str) -> PairFile:
    """Like :func:`load_translation_split`, but the pairs stay on disk until indexed."""
    return PairFile(_split_path(data_dir, split))


def read_translation_record(data_dir: str | Path) -> dict:
    """Content of ``splits.json`` (source, seed, pool sizes, per-split counts and sha256)."""
    return json.loads((Path(data_dir) / SPLITS_RECORD).read_text(encoding="utf-8"))


def load_pools(source: dict, needed: set[str]) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """Sentence pairs per pool (only the ``needed`` ones) and what was read, for the record.

    A hub dataset without training data (Tatoeba's benchmark has only validation and test) takes its
    ``train`` pool from ``train_source``, a nested source block of either kind.
    """
    kind = source.get("kind")
    loaders = {"local": _local_pools, "hub": _hub_pools}
    if kind not in loaders:
        raise SourceError(f"Unknown translation source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")
    delegated = {"train"} & needed if source.get("train_source") else set()  # null in a config = absent
    pools, inputs = loaders[kind](source, needed - delegated)
    if delegated:
        train_pools, train_inputs = load_pools(source["train_source"], delegated)
        pools["train"], inputs["train_source"] = train_pools["train"], train_inputs
    return pools, inputs


def stream_pool(source: dict, pool: str) -> tuple[Iterator[Pair], dict[str, Any]]:
    """Cleaned pairs of one pool as a one-pass iterator (never a list), and what is read, for the record.

    ``train_source`` (when set) provides the ``train`` pool, as in :func:`load_pools`.
    """
    if pool == "train" and source.get("train_source"):
        pairs, inputs = stream_pool(source["train_source"], pool)
        return pairs, {"train_source": inputs}
    kind = source.get("kind")
    if kind == "local":
        path, name = _local_file(source, pool)
        return _clean_iter(iter_tsv(path)), {pool: {"file": name, "sha256": sha256_file(path)}}
    if kind == "hub":
        dataset, names = _load_hub_dataset(source), {**HUB_SPLITS, **source.get("splits", {})}
        _check_hub_split(dataset, names, pool, source)
        inputs = {"revision": source.get("revision"), "hub_splits": {pool: names[pool]}}
        return _clean_iter(iter_hub_pairs(dataset[names[pool]], source)), inputs
    raise SourceError(f"Unknown translation source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")


def _merge_inputs(inputs: dict[str, Any], more: dict[str, Any]) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(inputs.get(key), dict):
            _merge_inputs(inputs[key], value)
        else:
            inputs[key] = value


# --------------------------------------------------------------------------------------------
# Local TSV files
# --------------------------------------------------------------------------------------------


def _local_pools(source: dict, needed: set[str]) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    pools, inputs = {}, {}
    for pool in sorted(needed):
        path, name = _local_file(source, pool)
        pools[pool] = _clean(iter_tsv(path))
        inputs[pool] = {"file": name, "sha256": sha256_file(path)}
    return pools, inputs


def _local_file(source: dict, pool: str) -> tuple[Path, str]:
    """The TSV file of ``pool`` in a local source, which must exist."""
    path = local_pool_path(source, pool)
    if not path.is_file():
        users = ", ".join(s for s in SPLIT_ORDER if POOL_OF[s] == pool)
        files = {**LOCAL_FILES, **source.get("files", {})}
        raise SourceError(
            f"Translation pool {pool!r} (used by splits {users}) needs {path}, which does not exist; "
            f"expected one 'source<TAB>target' pair per line (a .gz file is read as gzip). Files per pool: {files}"
            + (f". {TRAIN_DATA_HINT}" if pool == "train" else "")
        )
    return path, path.name


def local_pool_path(source: dict, pool: str) -> Path:
    """Where a ``kind: local`` translation source keeps ``pool`` (``files`` overrides the default names)."""
    return Path(source["path"]) / {**LOCAL_FILES, **source.get("files", {})}[pool]


def iter_tsv(path: Path) -> Iterator[Pair]:
    """``source<TAB>target`` lines, one at a time (gzip when the name ends in .gz); blank lines are skipped, any
    other line without exactly one tab is an error."""
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("\t")
            if len(fields) != 2:
                raise SourceError(
                    f"{path}:{number}: expected 'source<TAB>target', found {len(fields) - 1} tabs: {text[:80]!r}"
                )
            yield fields[0], fields[1]


def read_tsv(path: Path) -> list[Pair]:
    """All pairs of a (small) TSV file; see :func:`iter_tsv`."""
    return list(iter_tsv(path))


# --------------------------------------------------------------------------------------------
# Hugging Face hub datasets
# --------------------------------------------------------------------------------------------


def _hub_pools(source: dict, needed: set[str]) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    if not needed:
        return {}, {}
    dataset = _load_hub_dataset(source)
    names = {**HUB_SPLITS, **source.get("splits", {})}
    pools = {}
    for pool in sorted(needed):
        _check_hub_split(dataset, names, pool, source)
        pools[pool] = hub_pairs(dataset[names[pool]], source)
    return pools, {"revision": source.get("revision"), "hub_splits": {p: names[p] for p in sorted(needed)}}


def _check_hub_split(dataset: Any, names: dict[str, str], pool: str, source: dict) -> None:
    if names[pool] not in dataset:
        hint = " Point 'train_source' at the training data (e.g. {kind: local, ...})." if pool == "train" else ""
        raise SourceError(
            f"Dataset {source['path']!r} ({source.get('name')}) has no split {names[pool]!r} for pool "
            f"{pool!r}; it has: {', '.join(dataset)}. Map pools to splits with 'splits: {{{pool}: ...}}'.{hint}"
        )


def hub_load_arguments(source: dict) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of ``datasets.load_dataset`` for a hub (or local-folder) source.

    ``data_files`` or ``data_dir`` in the source are passed as given. Otherwise, for the hub's Parquet export
    (``revision: refs/convert/parquet``) or a local folder holding a ``name`` subfolder (a downloaded copy of
    that export), the config ``name`` is the folder to read (``data_dir``): ``datasets`` reads such a layout as
    plain data files with a single ``default`` config, and ``load_dataset(path, "eng-zho")`` would fail with
    "BuilderConfig 'eng-zho' not found". Any other source is loaded by config name.
    """
    path, name, revision = source["path"], source.get("name"), source.get("revision")
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if source.get("data_files") is not None:
        return (path,), {**kwargs, "data_files": source["data_files"]}
    data_dir = source.get("data_dir")
    if data_dir is None and name and (revision == PARQUET_REVISION or (Path(path) / name).is_dir()):
        data_dir = name
    if data_dir is not None:
        return (path,), {**kwargs, "data_dir": data_dir}
    return (path, name), kwargs


def _export_hint(path: str, name: str | None) -> str:
    config = name or "CONFIG"
    return (
        f"The Parquet export keeps one folder per config ({config}/validation/0000.parquet, {config}/test/...): "
        f"use 'revision: {PARQUET_REVISION}' with 'name: {config}' (read as data_dir: {config}), or set "
        f"'data_dir: {config}' or 'data_files: {{validation: {config}/validation/*.parquet, test: "
        f"{config}/test/*.parquet}}'. For a local copy: hf download {path} --repo-type dataset --revision "
        f"{PARQUET_REVISION} --include '{config}/*' --local-dir DIR, then 'path: DIR' with the same name."
    )


def _load_hub_dataset(source: dict) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError("Hub translation sources need the 'datasets' package: pip install 'ffmerge[data]'") from exc
    path, name = source["path"], source.get("name")
    args, kwargs = hub_load_arguments(source)
    where = ", ".join([*(f"{a!r}" for a in args[1:]), *(f"{k}={v!r}" for k, v in kwargs.items())])
    try:
        return datasets.load_dataset(*args, **kwargs)
    except ValueError as exc:
        if "BuilderConfig" in str(exc) and "not found" in str(exc):
            raise SourceError(
                f"Dataset {path!r} has no config {name!r} in the layout read ({where}): {exc}. "
                + _export_hint(path, name)
            ) from exc
        raise SourceError(f"Could not load dataset {path!r} ({where}): {exc}") from exc
    except OSError as exc:
        if not looks_offline(exc) and isinstance(exc, FileNotFoundError):
            raise SourceError(
                f"Could not find the data of {path!r} ({where}): {exc}. Check 'path', 'name', 'revision' and "
                "'data_dir' / 'data_files'. " + _export_hint(path, name)
            ) from exc
        if looks_offline(exc):
            raise SourceError(
                f"Could not load dataset {path!r} ({name}) from the Hugging Face hub: this machine looks "
                "offline (HF_HUB_OFFLINE is set or the network is unreachable) and the dataset is not "
                "cached. Export the pairs as TSV files elsewhere and use {kind: local, path: DIR} "
                "(train.tsv, dev.tsv, test.tsv with 'source<TAB>target' lines), or run where the hub is "
                "reachable. (export HF_HUB_OFFLINE=1 to fail fast instead of retrying the network) "
                + _export_hint(path, name)
            ) from exc
        raise SourceError(f"Could not load dataset {path!r} ({where}) from the hub: {exc}") from exc
    except RuntimeError as exc:
        if "scripts are no longer supported" in str(exc):
            raise SourceError(
                f"Dataset {path!r} is defined by a loading script, which this 'datasets' version refuses; "
                "read the hub's Parquet export instead with 'revision: refs/convert/parquet'. "
                + _export_hint(path, name)
            ) from exc
        raise


def hub_pairs(split: Any, source: dict) -> list[Pair]:
    """``(source, target)`` strings of one dataset split, in the translation direction the source asks for.

    Three row layouts: explicit ``columns: {source: A, target: B}``; Tatoeba (``sourceString`` /
    ``targetString``, the language order given by the config name, e.g. ``eng-zho``: a ``direction`` of
    ``zho-eng`` reads ``targetString`` as source); or a ``translation`` dict keyed by language codes.
    """
    return _clean(iter_hub_pairs(split, source))


def iter_hub_pairs(split: Any, source: dict, batch_rows: int = HUB_BATCH_ROWS) -> Iterator[tuple[Any, Any]]:
    """Raw ``(source, target)`` values of a dataset split, read ``batch_rows`` rows at a time (see
    :func:`hub_pairs` for the layouts); the split is never turned into Python lists whole."""
    src, tgt, translation = _hub_columns(split, source)
    for batch in split.iter(batch_size=batch_rows):
        if translation:
            yield from ((row[src], row[tgt]) for row in batch["translation"])
        else:
            yield from zip(batch[src], batch[tgt], strict=True)


def _hub_columns(split: Any, source: dict) -> tuple[str, str, bool]:
    """Source and target column names, or (with the last item True) language keys of a ``translation`` dict."""
    columns = list(split.column_names)
    if "columns" in source:
        src, tgt = source["columns"]["source"], source["columns"]["target"]
        missing = [c for c in (src, tgt) if c not in columns]
        if missing:
            raise SourceError(f"columns {missing} not in dataset {source['path']!r}; it has: {', '.join(columns)}")
        return src, tgt, False
    if set(TATOEBA_COLUMNS) <= set(columns):
        return (*_tatoeba_columns(source), False)
    if "translation" in columns:
        return (*_direction(source), True)
    raise SourceError(
        f"Cannot tell source and target columns of {source['path']!r} (columns: {', '.join(columns)}); "
        "add 'columns: {source: COLUMN, target: COLUMN}' to the data source"
    )


def _tatoeba_columns(source: dict) -> tuple[str, str]:
    config_pair = tuple(str(source.get("name", "")).split("-"))
    direction = _direction(source)
    if direction == config_pair:
        return TATOEBA_COLUMNS
    if direction[::-1] == config_pair:
        return TATOEBA_COLUMNS[::-1]
    raise SourceError(
        f"direction {'-'.join(direction)!r} does not match the Tatoeba config {source.get('name')!r}: use "
        "the config's language pair in either order, e.g. name: eng-zho with direction: zho-eng"
    )


def _direction(source: dict) -> tuple[str, str]:
    parts = tuple(str(source.get("direction", "")).split("-"))
    if len(parts) != 2 or not all(parts):
        raise SourceError(
            f"hub translation source {source.get('path')!r} needs 'direction: SRC-TGT' (e.g. zho-eng), "
            f"got {source.get('direction')!r}"
        )
    return parts


def _clean(pairs: Iterable[tuple[Any, Any]]) -> list[Pair]:
    """Pairs with both sides non-empty, surrounding whitespace removed (Tatoeba rows carry none, TSVs may)."""
    return list(_clean_iter(pairs))


def _clean_iter(pairs: Iterable[tuple[Any, Any]]) -> Iterator[Pair]:
    for src, tgt in pairs:
        src, tgt = str(src or "").strip(), str(tgt or "").strip()
        if src and tgt:
            yield src, tgt


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


def _assign(
    pools: dict[str, list[Pair]], splits: dict[str, int], seed: int
) -> tuple[dict[str, list[Pair]], dict[str, int]]:
    """Hand each split whole source-sentence groups from its seeded pool, in :data:`SPLIT_ORDER`.

    A source sentence already given to an earlier split is skipped in every later pool (so even a
    training pool that overlaps the test set cannot leak it); the last group of a split is cut to meet
    the count exactly and its remainder dropped.
    """
    groups = {name: _seeded_groups(pairs, seed) for name, pairs in pools.items()}
    available = {name: len(g) for name, g in groups.items()}
    cursors = dict.fromkeys(groups, 0)
    used: set[str] = set()
    chosen: dict[str, list[Pair]] = {}
    for split in (s for s in SPLIT_ORDER if s in splits):
        pool = POOL_OF[split]
        taken: list[Pair] = []
        while len(taken) < splits[split] and cursors[pool] < len(groups[pool]):
            source_text, targets = groups[pool][cursors[pool]]
            cursors[pool] += 1
            if source_text in used:
                continue
            used.add(source_text)
            taken += [(source_text, t) for t in targets[: splits[split] - len(taken)]]
        if len(taken) < splits[split]:
            raise SourceError(_too_small(split, pool, len(taken), splits[split], len(pools[pool]), chosen))
        chosen[split] = taken
    return chosen, available


def _seeded_groups(pairs: list[Pair], seed: int) -> list[tuple[str, list[str]]]:
    """Unique pairs grouped by source sentence, groups ordered by ``sha256(seed, source)``, targets sorted."""
    by_source: dict[str, set[str]] = {}
    for src, tgt in pairs:
        by_source.setdefault(src, set()).add(tgt)
    return [(src, sorted(by_source[src])) for src in sorted(by_source, key=lambda text: _order_key(seed, text))]


def _order_key(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest(), "big")


def sample_groups(
    pairs: Iterable[Pair], seed: int, wanted: int, skip: set[str] = frozenset()
) -> tuple[list[tuple[str, list[str]]], int]:
    """The first source groups in :func:`_seeded_groups` order that hold ``wanted`` unique pairs, read in one pass.

    Sources in ``skip`` (given to another split) are left out. Only the groups that can still belong to that
    prefix are kept (a max-heap on the order key evicts the last group whenever the others hold enough pairs),
    so memory stays near ``wanted`` pairs however long ``pairs`` is; the result equals taking those groups
    from ``_seeded_groups`` of the whole input. Returns the groups and the number of pairs read.
    """
    kept: dict[str, set[str]] = {}
    heap: list[tuple[int, str]] = []  # (-key, source): the root is the kept group that comes last
    total = n_read = 0
    for src, tgt in pairs:
        n_read += 1
        if src in skip:
            continue
        targets = kept.get(src)
        if targets is None:
            key = _order_key(seed, src)
            if total >= wanted and key > -heap[0][0]:
                continue  # the groups before it already hold enough pairs (so it was never kept)
            targets = kept[src] = set()
            heapq.heappush(heap, (-key, src))
        if tgt in targets:
            continue
        targets.add(tgt)
        total += 1
        while len(heap) > 1 and total - len(kept[heap[0][1]]) >= wanted:
            total -= len(kept.pop(heapq.heappop(heap)[1]))
    order = sorted(kept, key=lambda text: _order_key(seed, text))
    return [(src, sorted(kept[src])) for src in order], n_read


def _take(groups: list[tuple[str, list[str]]], wanted: int) -> list[Pair]:
    """Whole groups in order, the last one cut to meet ``wanted`` exactly (as :func:`_assign` does)."""
    taken: list[Pair] = []
    for src, targets in groups:
        if len(taken) >= wanted:
            break
        taken += [(src, t) for t in targets[: wanted - len(taken)]]
    return taken


def _too_small(split: str, pool: str, got: int, wanted: int, pool_size: int, chosen: dict[str, list[Pair]]) -> str:
    before = {s: len(p) for s, p in chosen.items() if POOL_OF[s] == pool}
    after = f" after earlier splits took {before}" if before else ""
    return (
        f"Split {split!r} asks for {wanted} sentence pairs, but pool {pool!r} ({pool_size} pairs) has only {got} "
        f"left{after} (source sentences already used by another split are skipped); lower the count or use a "
        "larger source."
    )


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _jsonl(pairs: list[Pair]) -> bytes:
    lines = (json.dumps({"source": s, "target": t}, ensure_ascii=False, sort_keys=True) for s, t in pairs)
    return "".join(f"{line}\n" for line in lines).encode("utf-8")
