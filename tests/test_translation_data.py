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
    # the Parquet export has one folder per config and no configs of its own: the config is read as data_dir
    assert calls == [(("Helsinki-NLP/tatoeba_mt",), {"revision": "refs/convert/parquet", "data_dir": "eng-zho"})]
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


# --------------------------------------------------------------------------------------------
# The hub's Parquet export layout (one folder per config), as a local copy written here
# --------------------------------------------------------------------------------------------


def write_parquet_export(root: Path, configs: dict[str, dict[str, list[tuple[str, str]]]]) -> Path:
    """The refs/convert/parquet layout: CONFIG/SPLIT/0000.parquet with Tatoeba's columns."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for config, splits in configs.items():
        for split, pairs in splits.items():
            (root / config / split).mkdir(parents=True)
            pq.write_table(pa.table(tatoeba_rows(pairs)), root / config / split / "0000.parquet")
    return root


@pytest.fixture
def export_copy(tmp_path, pools, monkeypatch) -> Path:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    other = {"validation": [("Hallo Welt", "hello world")] * 3, "test": [("Guten Tag", "good day")] * 3}
    zho = {"validation": pools["dev.tsv"], "test": pools["test.tsv"]}
    return write_parquet_export(tmp_path / "tatoeba_mt", {"eng-deu": other, "eng-zho": zho})


def test_local_copy_of_the_parquet_export_reads_the_named_config(export_copy, local_source, tmp_path):
    source = {"kind": "hub", "path": str(export_copy), "name": "eng-zho", "direction": "zho-eng"}
    source["train_source"] = local_source
    prepare_translation_splits(source, tmp_path / "copy", SPLITS, seed=0)
    prepare_translation_splits(local_source, tmp_path / "from_tsv", SPLITS, seed=0)
    for split in SPLITS:  # the eng-zho folder only (never eng-deu), Chinese as the source side
        assert load_translation_split(tmp_path / "copy", split) == load_translation_split(tmp_path / "from_tsv", split)
    # the same selection written out as data_dir, or as data_files per split
    by_dir = {**source, "data_dir": "eng-zho", "name": "eng-zho"}
    prepare_translation_splits(by_dir, tmp_path / "dir", {"test": 10}, seed=0)
    files = {"validation": "eng-zho/validation/*.parquet", "test": "eng-zho/test/*.parquet"}
    prepare_translation_splits({**source, "data_files": files}, tmp_path / "files", {"test": 10}, seed=0)
    expected = load_translation_split(tmp_path / "from_tsv", "test")
    assert load_translation_split(tmp_path / "dir", "test") == load_translation_split(tmp_path / "files", "test")
    assert load_translation_split(tmp_path / "dir", "test") == expected


def test_parquet_export_failures_name_the_fix(export_copy, tmp_path):
    from ffmerge.data.translation import hub_load_arguments

    hub = {"kind": "hub", "path": "Helsinki-NLP/tatoeba_mt", "name": "eng-zho", "direction": "zho-eng"}
    assert hub_load_arguments(hub) == (("Helsinki-NLP/tatoeba_mt", "eng-zho"), {})  # a scripted/configured repo
    parquet = {**hub, "revision": "refs/convert/parquet"}
    assert hub_load_arguments(parquet) == (
        ("Helsinki-NLP/tatoeba_mt",),
        {"revision": "refs/convert/parquet", "data_dir": "eng-zho"},
    )
    # a config the copy does not hold: datasets falls back to config names and has only 'default'
    missing = {"kind": "hub", "path": str(export_copy), "name": "eng-jpn", "direction": "jpn-eng"}
    with pytest.raises(SourceError, match=r"no config 'eng-jpn'.*BuilderConfig.*data_dir: eng-jpn.*hf download"):
        prepare_translation_splits(missing, tmp_path / "a", {"test": 1}, seed=0)
    with pytest.raises(SourceError, match=r"Could not find the data.*data_dir.*one folder per config"):
        prepare_translation_splits({**missing, "data_dir": "eng-jpn"}, tmp_path / "b", {"test": 1}, seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------
# The training pool is streamed: sampled while read, never held whole
# --------------------------------------------------------------------------------------------


def test_streamed_sample_equals_sorting_the_whole_pool():
    from ffmerge.data.translation import _seeded_groups, _take, sample_groups

    rng = random.Random(3)
    pairs = [(f"s{rng.randrange(400)}", f"t{rng.randrange(5)}") for _ in range(3000)]  # repeats and 1-5 targets
    skip = {f"s{i}" for i in range(0, 400, 7)}
    for wanted in (1, 2, 17, 250, 1500):
        groups, n_read = sample_groups(iter(pairs), seed=5, wanted=wanted, skip=skip)
        full = [(s, t) for s, t in _seeded_groups(pairs, seed=5) if s not in skip]
        assert n_read == len(pairs)
        assert _take(groups, wanted) == _take(full, wanted), wanted
        # what is kept is the shortest prefix that reaches the count, not the pool
        assert sum(len(t) for _, t in groups[:-1]) < wanted <= sum(len(t) for _, t in groups) or wanted > 1400


def test_training_pool_is_read_as_a_gzip_stream_with_bounded_memory(tmp_path, pools):
    import gzip
    import tracemalloc

    from ffmerge.data import translation

    folder = tmp_path / "tsv"
    folder.mkdir()
    write_tsv(folder / "dev.tsv", pools["dev.tsv"])
    write_tsv(folder / "test.tsv", pools["test.tsv"])
    lines = "".join(f"训练句子{i}。\ttraining sentence number {i} of many.\n" for i in range(60_000))
    (folder / "train.tsv.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    source = {"kind": "local", "path": str(folder), "files": {"train": "train.tsv.gz"}}
    tracemalloc.start()
    try:
        record = prepare_translation_splits(source, tmp_path / "out", {"test": 4, "train": 20}, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    as_lists = 60_000 * 2 * 100  # the pool as Python lists: 120,000 str objects of ~100 bytes each, ~12 MB
    assert peak < as_lists / 4, peak
    train = load_translation_split(tmp_path / "out", "train")
    assert len(train) == 20 and all(s.startswith("训练句子") for s, _ in train)
    assert record["pools"]["train"] == {"n_pairs": 60_000, "n_sources": None, "streamed": True}
    # the same sample as the in-memory rule gives (sorting the whole pool by the seeded hash)
    whole = translation._seeded_groups(list(translation.iter_tsv(folder / "train.tsv.gz")), seed=0)
    assert train == translation._take(whole, 20)


def test_missing_training_file_names_the_key_and_how_to_get_the_data(local_source, tmp_path):
    from ffmerge.workflow.preflight import ConfigError, translation_data_warnings

    (Path(local_source["path"]) / "train.tsv").unlink()
    with pytest.raises(SourceError, match=r"pool 'train'.*train\.tsv.*Tatoeba-Challenge.*paste"):
        prepare_translation_splits(local_source, tmp_path / "out", SPLITS, seed=0)
    hub = {"kind": "hub", "path": "Helsinki-NLP/tatoeba_mt", "name": "eng-zho", "revision": "refs/convert/parquet"}
    task = {"type": "translation", "splits": SPLITS, "data": {**hub, "train_source": local_source}}
    (warning,) = translation_data_warnings("mt", task)
    assert "tasks.mt.data.train_source.path" in warning and "train.tsv" in warning and "Tatoeba-Challenge" in warning
    assert translation_data_warnings("mt", {**task, "splits": {"test": 2}}) == []  # no train split, no file needed
    (Path(local_source["path"]) / "dev.tsv").unlink()
    with pytest.raises(ConfigError, match=r"tasks\.mt\.data\.path: .*dev\.tsv \(the 'validation' pool\)"):
        translation_data_warnings("mt", {**task, "data": local_source})
    copy = {**hub, "path": str(tmp_path / "no-copy"), "revision": None}
    with pytest.raises(ConfigError, match=r"tasks\.mt\.data: local dataset folder .*no-copy"):
        translation_data_warnings("mt", {**task, "data": copy})


def test_train_split_is_opened_lazily_for_fine_tuning(local_source, tmp_path):
    from ffmerge.data.translation import PairFile, open_translation_split

    prepare_translation_splits(local_source, tmp_path / "out", SPLITS, seed=0)
    pairs = open_translation_split(tmp_path / "out", "train")
    assert isinstance(pairs, PairFile)
    expected = load_translation_split(tmp_path / "out", "train")
    assert len(pairs) == len(expected) == SPLITS["train"]
    assert (
        [pairs[i] for i in range(len(pairs))] == expected and pairs[-1] == expected[-1] and pairs[2:5] == expected[2:5]
    )
    assert all(isinstance(v, int) for v in vars(pairs)["_offsets"])  # offsets only, no text in memory
    with pytest.raises(FileNotFoundError, match="No split 'dev'"):
        open_translation_split(tmp_path / "out", "dev")
