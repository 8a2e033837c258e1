"""Deterministic, disjoint sentence-pair splits from tiny TSV files and a fake Tatoeba hub dataset."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from ffmerge.data.translation import (
    SPLITS_RECORD,
    load_translation_split,
    prepare_translation_splits,
    read_translation_record,
)
from ffmerge.sources import SourceError

SPLITS = {"calib": 6, "valid": 8, "test": 10, "train": 12}


def pool_pairs(pool: str, n: int) -> list[tuple[str, str]]:
    """Chinese sources with unique markers; every third validation source has a second reference."""
    pairs = [(f"{pool}句子{i}。", f"{pool} sentence {i}.") for i in range(n)]
    if pool == "dev":
        pairs += [(f"{pool}句子{i}。", f"{pool} another sentence {i}.") for i in range(0, n, 3)]
    return pairs


def write_tsv(path: Path, pairs: list[tuple[str, str]], shuffle_seed: int | None = None) -> None:
    rows = list(pairs)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    path.write_text("".join(f"{s}\t{t}\n" for s, t in rows), encoding="utf-8")


@pytest.fixture
def pools() -> dict[str, list[tuple[str, str]]]:
    train = pool_pairs("train", 30) + [("test句子3。", "a training copy of a test sentence")]
    return {"train.tsv": train, "dev.tsv": pool_pairs("dev", 24), "test.tsv": pool_pairs("test", 10)}


@pytest.fixture
def local_source(tmp_path: Path, pools) -> dict:
    folder = tmp_path / "tsv"
    folder.mkdir()
    for name, pairs in pools.items():
        write_tsv(folder / name, pairs)
    return {"kind": "local", "path": str(folder)}


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_local_splits_are_exact_from_the_right_pools_and_share_no_source(local_source, pools, tmp_path):
    record = prepare_translation_splits(local_source, tmp_path / "out", SPLITS, seed=0)
    got = {split: load_translation_split(tmp_path / "out", split) for split in SPLITS}
    assert {split: len(pairs) for split, pairs in got.items()} == SPLITS
    pool_file = {"calib": "dev.tsv", "valid": "dev.tsv", "test": "test.tsv", "train": "train.tsv"}
    for split, pairs in got.items():
        assert set(pairs) <= set(pools[pool_file[split]]), split
    sources = {split: {s for s, _ in pairs} for split, pairs in got.items()}
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not sources[a] & sources[b], (a, b)
    assert "test句子3。" not in sources["train"]  # the whole test pool went to test, so its copy in train is dropped
    assert record["splits"]["calib"] == {
        "n_pairs": 6,
        "pool": "validation",
        "sha256": hashlib.sha256((tmp_path / "out" / "calib.jsonl").read_bytes()).hexdigest(),
    }
    assert record["pools"]["validation"] == {"n_pairs": 32, "n_sources": 24}
    assert read_translation_record(tmp_path / "out") == record


def test_same_seed_gives_byte_identical_files_whatever_the_input_order(local_source, pools, tmp_path):
    prepare_translation_splits(local_source, tmp_path / "a", SPLITS, seed=7)
    prepare_translation_splits(local_source, tmp_path / "b", SPLITS, seed=7)
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")

    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, (name, pairs) in enumerate(pools.items()):
        write_tsv(shuffled / name, pairs, shuffle_seed=i)
    prepare_translation_splits({"kind": "local", "path": str(shuffled)}, tmp_path / "c", SPLITS, seed=7)
    splits_only = {k: v for k, v in all_files(tmp_path / "a").items() if k != SPLITS_RECORD}
    assert splits_only == {k: v for k, v in all_files(tmp_path / "c").items() if k != SPLITS_RECORD}

    prepare_translation_splits(local_source, tmp_path / "d", SPLITS, seed=8)
    assert load_translation_split(tmp_path / "d", "valid") != load_translation_split(tmp_path / "a", "valid")


def test_earlier_splits_do_not_depend_on_later_counts(local_source, tmp_path):
    prepare_translation_splits(local_source, tmp_path / "a", SPLITS, seed=0)
    prepare_translation_splits(local_source, tmp_path / "b", {**SPLITS, "calib": 2, "train": 3}, seed=0)
    for split in ("test", "valid"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()


def test_a_too_small_pool_says_how_many_pairs_exist_and_writes_nothing(local_source, tmp_path):
    with pytest.raises(SourceError, match=r"'calib' asks for 20 .*pool 'validation' \(32 pairs\) has only \d+ left"):
        prepare_translation_splits(local_source, tmp_path / "out", {"valid": 20, "calib": 20}, seed=0)
    assert not (tmp_path / "out").exists()


def test_missing_pool_file_is_named_only_when_a_split_needs_it(local_source, tmp_path):
    (Path(local_source["path"]) / "dev.tsv").unlink()
    prepare_translation_splits(local_source, tmp_path / "ok", {"test": 3, "train": 3}, seed=0)
    with pytest.raises(SourceError, match=r"pool 'validation' \(used by splits valid, calib\) needs .*dev\.tsv"):
        prepare_translation_splits(local_source, tmp_path / "out", {"calib": 3}, seed=0)


def test_malformed_tsv_line_is_reported_with_file_and_line(local_source, tmp_path):
    path = Path(local_source["path"]) / "test.tsv"
    path.write_text("好\tgood\n\nno tab here\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"test\.tsv:3: expected 'source<TAB>target', found 0 tabs"):
        prepare_translation_splits(local_source, tmp_path / "out", {"test": 1}, seed=0)


def test_unknown_split_and_missing_split_file_are_explained(local_source, tmp_path):
    with pytest.raises(ValueError, match="Unknown split names.*'dev'"):
        prepare_translation_splits(local_source, tmp_path / "out", {"dev": 3}, seed=0)
    prepare_translation_splits(local_source, tmp_path / "out", {"test": 3}, seed=0)
    with pytest.raises(FileNotFoundError, match="No split 'train'.*available: test"):
        load_translation_split(tmp_path / "out", "train")


# --------------------------------------------------------------------------------------------
# Hub sources (a fake `datasets.load_dataset`; the real hub is unreachable here)
# --------------------------------------------------------------------------------------------


def tatoeba_rows(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Helsinki-NLP/tatoeba_mt layout for config eng-zho: English is the sourceString."""
    return {
        "sourceLang": ["eng"] * len(pairs),
        "targetlang": ["cmn_Hans"] * len(pairs),
        "sourceString": [en for _, en in pairs],
        "targetString": [zh for zh, _ in pairs],
    }


def test_tatoeba_hub_source_reads_zh_to_en_and_takes_train_from_train_source(
    monkeypatch, local_source, pools, tmp_path
):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict(tatoeba_rows(pools["dev.tsv"])),
            "test": datasets.Dataset.from_dict(tatoeba_rows(pools["test.tsv"])),
        }
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or data)
    source = {
        "kind": "hub",
        "path": "Helsinki-NLP/tatoeba_mt",
        "name": "eng-zho",
        "revision": "refs/convert/parquet",
        "direction": "zho-eng",
        "train_source": local_source,
    }
    record = prepare_translation_splits(source, tmp_path / "hub", SPLITS, seed=0)
    assert calls == [(("Helsinki-NLP/tatoeba_mt", "eng-zho"), {"revision": "refs/convert/parquet"})]
    prepare_translation_splits(local_source, tmp_path / "local", SPLITS, seed=0)
    for split in SPLITS:  # same pairs as the TSV files hold, so the same splits
        assert load_translation_split(tmp_path / "hub", split) == load_translation_split(tmp_path / "local", split)
    assert load_translation_split(tmp_path / "hub", "test")[0][0].endswith("。")  # Chinese is the source side
    assert record["inputs"]["hub_splits"] == {"test": "test", "validation": "validation"}
    assert record["inputs"]["train_source"]["train"]["file"] == "train.tsv"

    with pytest.raises(SourceError, match="no split 'train' for pool 'train'.*train_source"):
        prepare_translation_splits({**source, "train_source": None}, tmp_path / "x", SPLITS, seed=0)


def test_hub_direction_must_match_the_tatoeba_pair_and_translation_dicts_work(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    tatoeba = datasets.DatasetDict({"test": datasets.Dataset.from_dict(tatoeba_rows([("你好", "hello")]))})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: tatoeba)
    source = {"kind": "hub", "path": "Helsinki-NLP/tatoeba_mt", "name": "eng-zho", "direction": "zho-deu"}
    with pytest.raises(SourceError, match="direction 'zho-deu' does not match the Tatoeba config 'eng-zho'"):
        prepare_translation_splits(source, tmp_path / "a", {"test": 1}, seed=0)
    prepare_translation_splits({**source, "direction": "eng-zho"}, tmp_path / "b", {"test": 1}, seed=0)
    assert load_translation_split(tmp_path / "b", "test") == [("hello", "你好")]

    wmt = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"translation": [{"zh": "你好", "en": "hello"}]})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: wmt)
    prepare_translation_splits({"kind": "hub", "path": "wmt19", "direction": "zh-en"}, tmp_path / "c", {"test": 1}, 0)
    assert load_translation_split(tmp_path / "c", "test") == [("你好", "hello")]


def test_offline_hub_explains_and_suggests_local_tsv(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    # The HF libraries read HF_HUB_OFFLINE when imported; set both the variable and their copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    source = {"kind": "hub", "path": "ffmerge-test/not-cached-tatoeba", "name": "eng-zho", "direction": "zho-eng"}
    with pytest.raises(SourceError, match=r"looks offline.*HF_HUB_OFFLINE.*kind: local.*dev\.tsv"):
        prepare_translation_splits(source, tmp_path / "out", {"test": 1}, seed=0)
