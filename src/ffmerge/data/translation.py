"""Deterministic sentence-pair splits for translation: calibration, selection, test and fine-tuning.

The paper's translation experiments (OPUS-MT zh->en on Tatoeba) calibrate merging on validation sentences,
choose the merge window on a 2,000-sentence validation subset, report BLEU on test and fine-tune on the
Tatoeba Challenge training data. The splits must be exactly reproducible (same seed -> byte-identical
files) and disjoint: a source sentence used for calibration must never be scored during selection, or
window choices would reward memorisation of the calibration data.

Pairs are grouped by source sentence (Tatoeba gives several references for one sentence), so one source
sentence lands in one split only, across all splits; pools are ordered by a seeded hash of the source
text, which does not depend on the input order or on Python's ``random``.

Output per split: ``{split}.jsonl`` with ``{"source": ..., "target": ...}`` lines, plus ``splits.json``
(source, seed, counts, sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
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
    pools, inputs = load_pools(source, needed)
    chosen, available = _assign(pools, splits, seed)
    record = {
        "seed": seed,
        "source": source,
        "inputs": inputs,
        "pools": {name: {"n_pairs": len(pairs), "n_sources": available[name]} for name, pairs in pools.items()},
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
    path = Path(data_dir) / f"{split}{SPLIT_SUFFIX}"
    if not path.exists():
        present = sorted(p.stem for p in Path(data_dir).glob(f"*{SPLIT_SUFFIX}"))
        raise FileNotFoundError(f"No split {split!r} in {data_dir}; available: {', '.join(present) or 'none'}")
    with path.open(encoding="utf-8") as fh:
        return [(row["source"], row["target"]) for row in map(json.loads, fh)]


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


# --------------------------------------------------------------------------------------------
# Local TSV files
# --------------------------------------------------------------------------------------------


def _local_pools(source: dict, needed: set[str]) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    folder = Path(source["path"])
    files = {**LOCAL_FILES, **source.get("files", {})}
    pools, inputs = {}, {}
    for pool in sorted(needed):
        path = folder / files[pool]
        if not path.is_file():
            users = ", ".join(s for s in SPLIT_ORDER if POOL_OF[s] == pool)
            raise SourceError(
                f"Translation pool {pool!r} (used by splits {users}) needs {path}, which does not exist; "
                f"expected one 'source<TAB>target' pair per line. Files per pool: {files}"
            )
        pools[pool] = _clean(read_tsv(path))
        inputs[pool] = {"file": files[pool], "sha256": sha256_file(path)}
    return pools, inputs


def read_tsv(path: Path) -> list[Pair]:
    """``source<TAB>target`` lines; blank lines are skipped, any other line without exactly one tab is an error."""
    pairs = []
    with path.open(encoding="utf-8", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("\t")
            if len(fields) != 2:
                raise SourceError(
                    f"{path}:{number}: expected 'source<TAB>target', found {len(fields) - 1} tabs: {text[:80]!r}"
                )
            pairs.append((fields[0], fields[1]))
    return pairs


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
        if names[pool] not in dataset:
            hint = " Point 'train_source' at the training data (e.g. {kind: local, ...})." if pool == "train" else ""
            raise SourceError(
                f"Dataset {source['path']!r} ({source.get('name')}) has no split {names[pool]!r} for pool "
                f"{pool!r}; it has: {', '.join(dataset)}. Map pools to splits with 'splits: {{{pool}: ...}}'.{hint}"
            )
        pools[pool] = hub_pairs(dataset[names[pool]], source)
    return pools, {"revision": source.get("revision"), "hub_splits": {p: names[p] for p in sorted(needed)}}


def _load_hub_dataset(source: dict) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError("Hub translation sources need the 'datasets' package: pip install 'ffmerge[data]'") from exc
    path, name = source["path"], source.get("name")
    try:
        return datasets.load_dataset(path, name, revision=source.get("revision"))
    except OSError as exc:
        if looks_offline(exc):
            raise SourceError(
                f"Could not load dataset {path!r} ({name}) from the Hugging Face hub: this machine looks "
                "offline (HF_HUB_OFFLINE is set or the network is unreachable) and the dataset is not "
                "cached. Export the pairs as TSV files elsewhere and use {kind: local, path: DIR} "
                "(train.tsv, dev.tsv, test.tsv with 'source<TAB>target' lines), or run where the hub is "
                "reachable. (export HF_HUB_OFFLINE=1 to fail fast instead of retrying the network)"
            ) from exc
        raise SourceError(f"Could not load dataset {path!r} ({name}) from the hub: {exc}") from exc
    except RuntimeError as exc:
        if "scripts are no longer supported" in str(exc):
            raise SourceError(
                f"Dataset {path!r} is defined by a loading script, which this 'datasets' version refuses; "
                "read the hub's Parquet export instead with 'revision: refs/convert/parquet'."
            ) from exc
        raise


def hub_pairs(split: Any, source: dict) -> list[Pair]:
    """``(source, target)`` strings of one dataset split, in the translation direction the source asks for.

    Three row layouts: explicit ``columns: {source: A, target: B}``; Tatoeba (``sourceString`` /
    ``targetString``, the language order given by the config name, e.g. ``eng-zho``: a ``direction`` of
    ``zho-eng`` reads ``targetString`` as source); or a ``translation`` dict keyed by language codes.
    """
    columns = list(split.column_names)
    if "columns" in source:
        src, tgt = source["columns"]["source"], source["columns"]["target"]
        missing = [c for c in (src, tgt) if c not in columns]
        if missing:
            raise SourceError(f"columns {missing} not in dataset {source['path']!r}; it has: {', '.join(columns)}")
        return _clean(zip(split[src], split[tgt], strict=True))
    if set(TATOEBA_COLUMNS) <= set(columns):
        src, tgt = _tatoeba_columns(source)
        return _clean(zip(split[src], split[tgt], strict=True))
    if "translation" in columns:
        src_lang, tgt_lang = _direction(source)
        return _clean((row[src_lang], row[tgt_lang]) for row in split["translation"])
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
    out = []
    for src, tgt in pairs:
        src, tgt = str(src or "").strip(), str(tgt or "").strip()
        if src and tgt:
            out.append((src, tgt))
    return out


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

    def key(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{text}".encode()).digest()

    return [(src, sorted(by_source[src])) for src in sorted(by_source, key=key)]


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
