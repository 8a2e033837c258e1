"""The paper configuration's three model types through `snakemake`, on tiny local stand-ins.

`configs/paper.yaml` runs GPT-2 Large (Conv1D FF layers) on WikiText-103, ViT-B/16 with its ImageNet head on the
ILSVRC2012 validation images and OPUS-MT zh-en (Marian) on Tatoeba with BLEU, searching windows with one job per
start (`search.mode: per_window`). The hub is unreachable here, so this test builds random-weight models of the
same classes with real tokenizers and processors (a byte-level BPE GPT-2 tokenizer, a ViTImageProcessor, a
sentencepiece MarianTokenizer) and data in the layouts the paper config reads (a local copy of the hub's WikiText
repository with its config folders and README, a flat ILSVRC2012 val folder with LOC_val_solution.csv and
LOC_synset_mapping.txt plus train/<wnid>/ folders, a local copy of Tatoeba's parquet export plus a training TSV),
takes the paper config itself and shrinks only its budgets and grid, and runs the whole workflow: data, features,
per-window candidates, selection, compression, fine-tuning, int8, CKA and tables.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper.yaml"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # sorted, as LOC_synset_mapping.txt lists them
LAYERS = 6  # 1/3 removes 2 FF sublayers: merge windows of 3 layers, drop windows of 2
ZH_SUBJECTS = [("我", "I"), ("你", "you"), ("他", "he"), ("她", "she"), ("我们", "we"), ("他们", "they")]
ZH_VERBS = [("喜欢", "like"), ("看见", "see"), ("有", "have"), ("想要", "want")]
ZH_OBJECTS = [("猫", "cats"), ("狗", "dogs"), ("书", "books"), ("茶", "tea"), ("苹果", "apples")]


def _pairs() -> list[tuple[str, str]]:
    """Chinese -> English sentence pairs (120), as Tatoeba's zho-eng direction reads them."""
    return [
        (f"{zs}{zv}{zo}。", f"{es.capitalize()} {ev}{'s' if es in ('he', 'she') else ''} {eo}.")
        for zs, es in ZH_SUBJECTS
        for zv, ev in ZH_VERBS
        for zo, eo in ZH_OBJECTS
    ]


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def gpt2_folder(folder: Path, texts: list[str]) -> Path:
    """A random GPT-2 (Conv1D FF) with a byte-level BPE tokenizer trained on ``texts`` (vocab.json + merges.txt)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    scratch = folder.with_name(folder.name + "-bpe")
    scratch.mkdir(parents=True)
    bpe.save_model(str(scratch))
    vocab = json.loads((scratch / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (scratch / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    tokenizer = T.GPT2Tokenizer(vocab=vocab, merges=merges)
    assert len(tokenizer) == len(vocab) and tokenizer.decode(tokenizer("the river")["input_ids"]) == "the river"
    torch.manual_seed(0)
    config = T.GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=LAYERS, n_head=4,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    T.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vit_folder(folder: Path) -> Path:
    """A random ViT classifier (32 px, patch 8, one label per synset) with its ViTImageProcessor (-> 32 px)."""
    torch.manual_seed(0)
    config = T.ViTConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=len(WNIDS),
    )  # fmt: skip
    T.ViTForImageClassification(config).save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def marian_folder(folder: Path, pairs: list[tuple[str, str]]) -> Path:
    """A random MarianMT with a real MarianTokenizer: sentencepiece models trained on each side, shared vocab."""
    import sentencepiece as spm

    scratch = folder.with_name(folder.name + "-spm")
    scratch.mkdir(parents=True)
    for side, texts in (("source", [zh for zh, _ in pairs]), ("target", [en for _, en in pairs])):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(scratch / side), vocab_size=60, model_type="unigram",
            character_coverage=1.0, hard_vocab_limit=False, bos_id=-1, eos_id=1, unk_id=2, pad_id=-1,
            minloglevel=2,
        )  # fmt: skip
    pieces = []
    for side in ("source", "target"):
        model = spm.SentencePieceProcessor(model_file=str(scratch / f"{side}.model"))
        pieces += [model.id_to_piece(i) for i in range(model.get_piece_size()) if not model.is_control(i)]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)  # OPUS-MT's pad is the last id and starts decoding
    (scratch / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = T.MarianTokenizer(
        source_spm=str(scratch / "source.model"), target_spm=str(scratch / "target.model"),
        vocab=str(scratch / "vocab.json"), source_lang="zh", target_lang="en",
    )  # fmt: skip
    torch.manual_seed(0)
    config = T.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"],
        forced_eos_token_id=vocab["</s>"],
    )  # fmt: skip
    model = T.MarianMTModel(config)
    model.generation_config.num_beams = 2  # OPUS-MT publishes beam search in its generation config
    model.generation_config.max_length = 64
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------------
# Data, in the layouts configs/paper.yaml reads
# --------------------------------------------------------------------------------------------------------------


def wikitext_copy(root: Path, articles: list[str]) -> Path:
    """A local copy of the hub's `wikitext` repository: README configs + wikitext-103-raw-v1/{split}-*.parquet."""
    config = "wikitext-103-raw-v1"
    folder = root / "wikitext"
    (folder / config).mkdir(parents=True)
    thirds = {"train": articles[:-8], "validation": articles[-8:-4], "test": articles[-4:]}
    files = []
    for split, chunk in thirds.items():
        lines = [line for text in chunk for line in text]
        pq.write_table(pa.table({"text": lines}), folder / config / f"{split}-00000-of-00001.parquet")
        files.append(f"    - split: {split}\n      path: {config}/{split}-*")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: " + config + "\n  data_files:\n" + "\n".join(files) + "\n---\n# WikiText\n"
    )
    return folder


def _articles(n: int) -> list[list[str]]:
    """WikiText-style articles: rows with their own newline, a ' = Title = ' row first, blank rows between."""
    words = "the river city old new bridge north south people music park station history road market".split()
    articles = []
    for k in range(n):
        body = " ".join(words[(k * 7 + j) % len(words)] for j in range(60))
        articles.append([f" = Article {k} = \n", "\n", f" {body} . \n", "\n", f" {body[::-1]} . \n"])
    return articles


def imagenet_copy(root: Path, n_val: int = 20, n_train: int = 6) -> dict:
    """ILSVRC2012 as released: flat val/ with LOC_val_solution.csv, LOC_synset_mapping.txt, train/<wnid>/."""
    val, train = root / "val", root / "train"
    val.mkdir(parents=True)

    def jpeg(path: Path, k: int) -> None:
        Image.new("RGB", (40, 30), ((37 * k) % 256, (91 * k) % 256, (53 * k) % 256)).save(path, quality=95)

    rows = []
    for k in range(n_val):
        name = f"ILSVRC2012_val_{k + 1:08d}"
        jpeg(val / f"{name}.JPEG", k)
        wnid = WNIDS[k % len(WNIDS)]
        rows.append(f"{name},{wnid} 1 2 3 4\n")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(rows))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))
    for c, wnid in enumerate(WNIDS):
        (train / wnid).mkdir(parents=True)
        for i in range(n_train):
            jpeg(train / wnid / f"{wnid}_{i}.JPEG", 100 + 10 * c + i)
    return {
        "kind": "ilsvrc_val",
        "path": str(val),
        "labels": str(root / "LOC_val_solution.csv"),
        "synsets": str(root / "LOC_synset_mapping.txt"),
        "train_path": str(train),
    }


def tatoeba_copy(root: Path, pairs: list[tuple[str, str]]) -> dict:
    """A local copy of Helsinki-NLP/tatoeba_mt's parquet export (eng-zho/{validation,test}/0000.parquet, English as
    sourceString) plus the training pairs as a TSV (Tatoeba on the hub has no training split)."""
    export = root / "tatoeba_mt"
    held_out = {"validation": pairs[:40], "test": pairs[40:80]}
    for split, chunk in held_out.items():
        (export / "eng-zho" / split).mkdir(parents=True)
        table = pa.table(
            {
                "sourceLang": ["eng"] * len(chunk),
                "targetlang": ["cmn_Hans"] * len(chunk),
                "sourceString": [en for _, en in chunk],
                "targetString": [zh for zh, _ in chunk],
            }
        )
        pq.write_table(table, export / "eng-zho" / split / "0000.parquet")
    (root / "train").mkdir()
    (root / "train" / "train.tsv").write_text("".join(f"{zh}\t{en}\n" for zh, en in pairs[80:]), encoding="utf-8")
    return {
        "kind": "hub",
        "path": str(export),
        "name": "eng-zho",
        "direction": "zho-eng",
        "train_source": {"kind": "local", "path": str(root / "train")},
    }


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------

TASKS = {"lm": "gpt2-large-wikitext103", "vision": "vit-b16-imagenet", "mt": "opus-mt-zh-en-tatoeba"}
GRID = {"fractions": ["1/3"], "methods": ["permute", "drop"], "anchors": ["first"], "random_windows": 0}


def paper_config(root: Path) -> dict:
    """configs/paper.yaml with local models and data, tiny budgets and a 1/3-only grid; everything else as shipped
    (per-window search, int8, the fine-tuned baseline, the tasks' types, metrics and scoring settings)."""
    config = yaml.safe_load(PAPER.read_text())
    config["results_dir"] = str(root / "results")
    config["device"] = "cpu"
    pairs = _pairs()
    articles = _articles(40)
    lm, vision, mt = (config["tasks"][TASKS[k]] for k in ("lm", "vision", "mt"))

    lm["model"] = {"kind": "local", "path": str(gpt2_folder(root / "gpt2", ["".join(a) for a in articles]))}
    lm["data"] = {"kind": "hub", "path": str(wikitext_copy(root / "hub", articles)), "name": "wikitext-103-raw-v1"}
    lm["splits"] = {"calib": 256, "valid": 256, "test": 256, "train": 2048}
    lm["features"] = {**lm["features"], "tokens": 256, "batch_size": 2, "seq_len": 64}
    lm["selection"] = lm["evaluation"] = {"window": 64, "stride": 32, "batch_size": 2}

    vision["model"] = {"kind": "local", "path": str(vit_folder(root / "vit"))}
    vision["data"] = imagenet_copy(root / "imagenet")
    vision["image_size"] = 32
    vision["splits"] = {"calib": 4, "valid": 6, "test": 8, "train": 16}
    vision["features"] = {**vision["features"], "tokens": 64, "batch_size": 4}
    vision["selection"] = vision["evaluation"] = {"batch_size": 8}

    mt["model"] = {"kind": "local", "path": str(marian_folder(root / "marian", pairs))}
    mt["data"] = tatoeba_copy(root / "tatoeba", pairs)
    mt["splits"] = {"calib": 12, "valid": 6, "test": 8, "train": 24}
    mt["features"] = {**mt["features"], "tokens": 40, "batch_size": 4}
    mt["selection"] = mt["evaluation"] = {"batch_size": 8, "max_new_tokens": 16, "num_beams": None}

    for task in (lm, vision, mt):
        assert "search" not in task  # the schema's default, per_window: one candidate job per window start
        task["experiments"] = {**task["experiments"], **GRID}
        # the paper's recipe (schedule, warm-up, decay, precision fp16, ViT's loader workers) at a tiny size
        tiny = {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "eval_every": 1, "checkpoint_every": 1}
        task["finetune"] = {**task["finetune"], **tiny}
    assert vision["finetune"]["loader_workers"] > 0
    assert {task["finetune"]["precision"] for task in (lm, vision, mt)} == {"fp16"}
    lm["finetune"]["seq_len"] = 64
    return config


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, request) -> Iterator[tuple[Path, dict, str]]:
    root = tmp_path_factory.mktemp("paper")
    failed_before = request.session.testsfailed
    config = paper_config(root)
    # resume states on a scratch path named through the job's environment, as on a cluster ("$TMPDIR/...")
    config["scratch_dir"] = str(root / "scratch" / "$FFMERGE_TEST_NODE")
    started = time.perf_counter()
    run = run_paper_config(root, config, cores=2, env={"FFMERGE_TEST_NODE": "node7"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    print(f"paper-type run: {time.perf_counter() - started:.0f} s")
    yield Path(config["results_dir"]), config, output
    # pytest's "failed" retention removes a module fixture's folder only under its own basetemp, not --basetemp
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root)


def run_paper_config(root: Path, config: dict, cores: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """snakemake on ``config`` (written to root/config.yaml), offline, working directory root/wd."""
    import os

    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, allow_unicode=True))
    env_hub = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf-cache")}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(configfile)]
    command += ["-d", str(root / "wd"), "--cores", str(cores)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env_hub, **(env or {})})


def _table9(results: Path, task: str) -> pd.DataFrame:
    return pd.read_csv(results / task / "tables" / "table9.csv")


def _eval(results: Path, task: str, *parts: str) -> dict:
    return json.loads((results / task / "eval" / Path(*parts)).read_text())


@pytest.mark.e2e
def test_every_paper_task_has_its_table_with_every_method(paper_run):
    results, config, _ = paper_run
    for task in TASKS.values():
        table = _table9(results, task)
        variants = set(zip(table["variant"], table["fraction"].astype(str), strict=True))
        assert {("base", "0"), ("permute", "1/3"), ("drop", "1/3")} <= variants, (task, variants)
        assert table[["test_before_ft", "test"]].map(math.isfinite).all().all(), table
        # the per-window search ran: one candidate file per window start of each search
        for method, starts in (("permute", LAYERS - 2), ("drop", LAYERS - 1)):
            candidates = list((results / task / "candidates" / method / "1of3").glob("start*.json"))
            assert len(candidates) == starts, (task, method, candidates)
        assert (results / task / "int8" / "permute" / "1of3" / "best.json").is_file()
        assert (results / task / "int8" / "base.json").is_file()
        int8 = pd.read_csv(results / task / "tables" / "int8.csv")
        assert set(zip(int8["variant"], int8["int8"], strict=True)) == {
            (v, q) for v in ("base", "permute") for q in (False, True)
        }, (task, int8)
        assert int8["test"].map(math.isfinite).all(), int8
        ratios = int8.pivot(index="variant", columns="int8", values="ratio")
        assert (ratios[True] < ratios[False]).all(), (task, ratios)  # int8 linears: smaller files
        assert (results / task / "cka" / "ff_out.csv").is_file()
        # every model job recorded where it computed: this machine's CPU, in fp32 although the paper config asks
        # for fp16 training (autocast applies on CUDA only), and Table 9 shows it
        cpu = {"type": "cpu", "name": None, "precision": "fp32"}
        records = [json.loads(p.read_text()) for p in (results / task / "eval").rglob("*.json")]
        assert len(records) >= 5 and all(r["device"] == cpu for r in records), task
        assert all(r["finetune"]["device"] == cpu for r in records if r.get("finetune")), task
        for path in (results / task / "candidates").rglob("start*.json"):
            assert json.loads(path.read_text())["device"] == cpu, path
        assert json.loads((results / task / "selection" / "permute" / "1of3.json").read_text())["device"] == cpu
        assert json.loads((results / task / "int8" / "base.json").read_text())["device"]["precision"] == "int8"
        assert (table["device"] == "cpu fp32").all(), table
        # the fine-tunes kept their resume state under scratch_dir, expanded in the job, never under results
        logs = [p.read_text() for p in (results / "logs" / task / "finetune").rglob("*.log")]
        scratch = Path(config["scratch_dir"].replace("$FFMERGE_TEST_NODE", "node7")) / task / "finetune"
        assert len(logs) >= 3 and all(f"resume state in {scratch}/" in log for log in logs), task
        assert not (results / task / "work" / "finetune").exists()


@pytest.mark.e2e
def test_gpt2_merge_ties_conv1d_ff_weights(paper_run):
    results, _, _ = paper_run
    task = TASKS["lm"]
    base = _eval(results, task, "base", "pre.json")["size"]["parameters"]
    merged = _eval(results, task, "permute", "1of3", "best", "pre.json")
    per_ff = 32 * 128 + 128 + 128 * 32 + 32  # c_fc and c_proj (Conv1D, n_inner = 4 * n_embd) with biases
    assert merged["size"]["parameters"] == base - 2 * per_ff
    assert merged["windows"] and merged["size"]["ff_blocks_removed"] == 2
    assert _eval(results, task, "permute", "1of3", "best", "post.json")["metric"] == "ppl"


@pytest.mark.e2e
def test_vit_keeps_its_imagenet_head_and_scores_accuracy(paper_run):
    from ffmerge.checkpoint import load_model

    results, _, _ = paper_run
    task = TASKS["vision"]
    model = load_model(results / task / "models" / "permute" / "1of3" / "best" / "finetuned")
    assert type(model).__name__ == "ViTForImageClassification"
    assert tuple(model.classifier.weight.shape) == (len(WNIDS), 32)
    post = _eval(results, task, "permute", "1of3", "best", "post.json")
    assert post["metric"] == "accuracy" and 0 <= post["test"] <= 100
    base = _eval(results, task, "base", "pre.json")["size"]["parameters"]
    assert post["size"]["parameters"] == base - 2 * (32 * 64 + 64 + 64 * 32 + 32)


@pytest.mark.e2e
def test_marian_bleu_carries_its_signature_into_results_and_tables(paper_run):
    results, _, _ = paper_run
    task = TASKS["mt"]
    for parts in (("base", "pre.json"), ("permute", "1of3", "best", "post.json")):
        record = _eval(results, task, *parts)
        assert record["metric"] == "bleu"
        assert "tok:" in record["metric_signature"] and "version:" in record["metric_signature"]
        assert record["metric_tokenize"]
        assert record["decoding"]["num_beams"] == 2  # the model's generation config (num_beams: null)
    table = _table9(results, task)
    assert table["metric_signature"].str.contains("tok:").all()
    merged = _eval(results, task, "permute", "1of3", "best", "pre.json")
    assert set(merged["windows"]) == {"encoder", "decoder"}  # each stack merged on its own
    base = _eval(results, task, "base", "pre.json")["size"]["parameters"]
    per_ff = 32 * 64 + 64 + 64 * 32 + 32  # fc1 and fc2 with biases
    assert merged["size"]["ff_blocks_removed"] == 4 and merged["size"]["parameters"] == base - 4 * per_ff
