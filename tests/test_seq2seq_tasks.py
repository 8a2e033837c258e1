"""Encoder-decoder tasks: speech splits, WER/BLEU, and the Marian / Whisper task recipes on tiny models.

Models are random-weight Marian and Whisper built from configs; their tokenizers are byte-level
(one token per byte, no merges) so they build offline in milliseconds, and the Whisper feature
extractor is shrunk to a 1 s window of 32 frames so the tiny encoder (16 positions) can read it.
Translation split files come from a small stand-in for ``ffmerge.data.translation`` (only its
interface matters here); speech splits use the real ``ffmerge.data.speech`` and the real espeak-ng.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from scipy.io import wavfile
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ffmerge.data import speech
from ffmerge.data.speech import (
    SAMPLE_RATE,
    load_speech_split,
    prepare_speech_splits,
    speakable_sentences,
    split_sentences,
)
from ffmerge.data.translation import load_translation_split
from ffmerge.features import cache_features
from ffmerge.metrics.generation import bleu, normalize_english, wer
from ffmerge.sources import SourceError, prepare_model
from ffmerge.tasks import seq2seq
from ffmerge.tasks.seq2seq import IGNORE_INDEX, SpeechRecognitionTask, TranslationTask

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>"]
NO_TIMESTAMPS = "<|notimestamps|>"
TINY = dict(d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=56, encoder_layers=2, decoder_layers=2)
HEADS = dict(encoder_attention_heads=4, decoder_attention_heads=4)
# Tiny Whisper front end: 1 s windows, hop 500 -> 32 frames -> 16 encoder positions of 1,000 samples each
HOP, WINDOW_SECONDS, POSITIONS = 500, 1, 16

DEV_PAIRS = [
    ("un chat noir dort sur le canape", "a black cat sleeps on the sofa"),
    ("le chien court vite dans le parc", "the dog runs fast in the park"),
    ("il pleut beaucoup en automne ici", "it rains a lot here in autumn"),
    ("nous mangeons du pain chaque matin", "we eat bread every morning"),
    ("la mer est calme ce soir", "the sea is calm this evening"),
    ("elle lit un livre tres long", "she reads a very long book"),
    ("le soleil brille sur la ville", "the sun shines on the town"),
    ("ils chantent bien ensemble le dimanche", "they sing well together on sundays"),
]
TRAIN_PAIRS = [
    ("le train part", "the train leaves"),
    ("les enfants jouent dans le jardin", "the children play in the garden"),
    ("il fait froid", "it is cold"),
    ("mon frere aime la musique", "my brother likes music"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_wer_is_corpus_level_percent_after_normalisation():
    # one substitution ("the" -> "a") in six reference words
    assert wer(["the cat sat on a mat"], ["The cat sat on the mat."]) == pytest.approx(100 / 6)
    # corpus WER = (1 sub + 1 del) / (2 + 8) words, not the mean of the sentence rates (50 %)
    assert wer(["x", "a b c d e f g h"], ["p q", "a b c d e f g h"]) == pytest.approx(20.0)
    # case, punctuation, apostrophes, hyphens and spacing do not count as errors
    assert wer(["well known   isnt it"], ["Well-known, isn't it?"]) == 0.0
    assert normalize_english("Hello,  World — again!") == "hello world again"
    assert wer([""], ["two words"]) == 100.0
    with pytest.raises(ValueError, match="empty after normalisation"):
        wer(["a"], ["?!"])
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        wer(["a"], ["a", "b"])


def test_bleu_matches_hand_computation_and_names_its_signature():
    # n-gram precisions 5/6, 4/5, 3/4, 2/3 and no brevity penalty: BLEU = (1/3) ** (1/4)
    score, signature = bleu(["a b c d e f"], ["a b c d e g"])
    assert score == pytest.approx(100 * (1 / 3) ** 0.25)
    assert "tok:13a" in signature and "nrefs:1" in signature
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"])[0] == pytest.approx(100.0)
    # brevity penalty exp(1 - 6/4) on a hypothesis whose four n-gram orders are all perfect
    score, _ = bleu(["the cat sat on"], ["the cat sat on the mat"])
    assert score == pytest.approx(100 * math.exp(1 - 6 / 4))
    assert "tok:zh" in bleu(["猫坐着"], ["猫坐着"], tokenize="zh")[1]


# ------------------------------------------------------------------------------------------------
# Speech data
# ------------------------------------------------------------------------------------------------


def test_sentence_split_keeps_initials_and_filters_unspeakable_sentences():
    text = 'The term was coined by Hasbro to market G.I. Joe to boys. Dr. Smith said "hi there." Then he left! Ok'
    assert split_sentences(text) == [
        "The term was coined by Hasbro to market G.I. Joe to boys.",
        'Dr. Smith said "hi there."',
        "Then he left!",
        "Ok",
    ]
    lead = (
        "Rivers carry water from the hills to the sea. It was built in 1964 by the local people. "
        "NASA sent a probe to the outer planets last year. Short one. "
        "The word comes from Greek \u1f51\u03c0\u03bf and means an actor on a stage. "
        "Many rivers in the north freeze in the long cold winter months. And a cut-off fragment without end"
    )
    assert speakable_sentences(lead, min_words=6, max_words=25) == [
        "Rivers carry water from the hills to the sea.",
        "Many rivers in the north freeze in the long cold winter months.",
    ]


def _write_wav(path: Path, n_samples: int, rate: int = SAMPLE_RATE, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    wavfile.write(path, rate, (rng.standard_normal(n_samples) * 3000).astype(np.int16))


@pytest.fixture
def local_corpus(tmp_path: Path) -> dict:
    """Twelve clips in six two-clip groups ("speakers"), one at 8 kHz and one longer than 30 s."""
    root = tmp_path / "corpus"
    root.mkdir()
    lines = []
    for i in range(12):
        n = 2500 + 700 * i
        rate = 8000 if i == 3 else SAMPLE_RATE
        _write_wav(root / f"clip{i:02d}.wav", n if rate == SAMPLE_RATE else n // 2, rate, seed=i)
        lines.append(f"clip{i:02d}.wav\t{_transcript(i)}\tspeaker{i // 2}")
    _write_wav(root / "long.wav", 31 * SAMPLE_RATE, seed=99)
    lines.append("long.wav\ttoo long to transcribe\tspeaker0")
    (root / "transcripts.tsv").write_text("# file\ttext\tgroup\n" + "\n".join(lines) + "\n")
    return {"kind": "local", "path": str(root)}


def _transcript(i: int) -> str:
    return f"sentence number {i}" + " more" * (i % 3)


def _groups(folder: Path, split: str) -> set[str]:
    return {json.loads(line)["group"] for line in (folder / f"{split}.jsonl").read_text().splitlines()}


def test_local_speech_splits_are_deterministic_disjoint_and_16k(local_corpus, tmp_path):
    counts = {"test": 3, "valid": 2, "calib": 2, "train": 2}
    record = prepare_speech_splits(local_corpus, tmp_path / "a", counts, seed=3, speech={})
    prepare_speech_splits(local_corpus, tmp_path / "b", counts, seed=3, speech={})
    for name in ["splits.json"] + [f"{s}{ext}" for s in counts for ext in (".audio.npy", ".jsonl")]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert {s: record["splits"][s]["n_utterances"] for s in counts} == counts
    groups = {s: _groups(tmp_path / "a", s) for s in counts}
    assert sum(len(g) for g in groups.values()) == len(set().union(*groups.values())), groups
    clips = {text: audio for s in counts for audio, text in load_speech_split(tmp_path / "a", s)}
    assert len(clips) == sum(counts.values())
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in clips.values())
    for i in range(12):
        if _transcript(i) in clips:  # the 8 kHz clip was resampled to the same length at 16 kHz
            assert len(clips[_transcript(i)]) == 2500 + 700 * i
    original = wavfile.read(Path(local_corpus["path"]) / "clip00.wav")[1] / 32768.0
    if _transcript(0) in clips:
        np.testing.assert_allclose(clips[_transcript(0)], original, atol=1e-6)
    assert "too long to transcribe" not in clips
    with pytest.raises(SourceError, match="lower the count"):
        prepare_speech_splits(local_corpus, tmp_path / "d", {"test": 13}, seed=3, speech={})


FAKE_WIKI = "ffmerge_fake_speech_wiki"
WIKI_LEADS = {
    "Alpha": "Rivers carry fresh water from the hills down to the sea. Cut off",
    "Beta": "The old castle stands on a hill above the town. Its walls are made of grey stone.",
    "Gamma": "Bees collect nectar from flowers during the warm summer days.",
    "Delta": "The library lends books and music to everyone in the city.",
}


@pytest.fixture
def wiki_speech_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    package = tmp_path / "site" / FAKE_WIKI
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    entries = {t: {"title": t, "extract": e, "description": "", "topic": ""} for t, e in WIKI_LEADS.items()}
    (package / "data" / "leads.json").write_text(json.dumps(entries))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"kind": "espeak_wiki", "package": FAKE_WIKI, "file": "data/leads.json"}


def test_espeak_wiki_splits_speak_each_sentence_reproducibly(wiki_speech_source, tmp_path):
    counts = {"test": 2, "valid": 1, "calib": 1}
    settings = {"voice": "en-us", "rate": 160}
    record = prepare_speech_splits(wiki_speech_source, tmp_path / "a", counts, seed=0, speech=settings)
    prepare_speech_splits(wiki_speech_source, tmp_path / "b", counts, seed=0, speech=settings)
    assert (tmp_path / "a" / "test.audio.npy").read_bytes() == (tmp_path / "b" / "test.audio.npy").read_bytes()
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    assert record["speech"]["espeak_version"] in version and record["speech"]["voice"] == "en-us"
    assert record["speech"]["rate"] == 160 and record["speech"]["sample_rate"] == SAMPLE_RATE
    sentences = {s: [text for _, text in load_speech_split(tmp_path / "a", s)] for s in counts}
    every = [t for texts in sentences.values() for t in texts]
    assert set(every) <= {s for lead in WIKI_LEADS.values() for s in speakable_sentences(lead, 6, 25)}
    # Beta's two sentences form one document: if one is in a split, the other is not in another split
    beta = set(speakable_sentences(WIKI_LEADS["Beta"], 6, 25))
    assert sum(bool(beta & set(texts)) for texts in sentences.values()) <= 1
    for audio, text in load_speech_split(tmp_path / "a", "test"):
        seconds = len(audio) / SAMPLE_RATE
        words_per_minute = len(text.split()) / seconds * 60
        assert 60 < words_per_minute < 200, (text, seconds)  # spoken at about the asked rate, with pauses
        assert float(np.sqrt(np.mean(audio**2))) > 0.01  # not silence


def test_missing_espeak_names_the_debian_package(wiki_speech_source, tmp_path, monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(SourceError, match="apt-get install espeak-ng"):
        prepare_speech_splits(wiki_speech_source, tmp_path / "x", {"test": 1}, seed=0, speech={})


# ------------------------------------------------------------------------------------------------
# Tiny models and prepared data folders
# ------------------------------------------------------------------------------------------------


def _byte_level(specials: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(ALPHABET + specials)}


def marian_folder(path: Path) -> Path:
    """A random Marian model plus a byte-level tokenizer that ends every sequence with ``</s>``."""
    vocab = _byte_level(["<pad>", "</s>", "<unk>"])
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T.MarianConfig(
        vocab_size=len(vocab),
        **TINY,
        **HEADS,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["<pad>"],  # as in OPUS-MT: the pad token starts decoding
        forced_eos_token_id=vocab["</s>"],
    )
    T.MarianMTModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def whisper_folder(path: Path, seconds: int = WINDOW_SECONDS) -> Path:
    """A random English-only Whisper with a byte-level Whisper tokenizer and a shrunk feature extractor."""
    vocab = _byte_level(WHISPER_SPECIALS + [NO_TIMESTAMPS])
    tokenizer = T.WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:] + [NO_TIMESTAMPS]})
    tokenizer.set_prefix_tokens(predict_timestamps=False)
    extractor = T.WhisperFeatureExtractor(
        feature_size=8, sampling_rate=SAMPLE_RATE, hop_length=HOP, chunk_length=seconds, n_fft=1000
    )
    torch.manual_seed(0)
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = T.WhisperConfig(
        vocab_size=len(vocab),
        **TINY,
        **HEADS,
        num_mel_bins=8,
        max_source_positions=POSITIONS * seconds,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
    )
    T.WhisperForConditionalGeneration(config).save_pretrained(path)
    T.WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _write_tsv(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{src}\t{tgt}\n" for src, tgt in pairs), encoding="utf-8")


SETTINGS = {"batch_size": 3, "max_new_tokens": 12, "num_beams": 1}


def _cfg(task_type: str, data: dict, splits: dict[str, int], tokens: int) -> dict:
    return {
        "type": task_type,
        "data": data,
        "seed": 0,
        "splits": splits,
        "features": {"tokens": tokens, "batch_size": 2},
        "selection": SETTINGS,
        "evaluation": SETTINGS,
        "finetune": {"batch_size": 4},
    }


@pytest.fixture
def translation(tmp_path) -> tuple[TranslationTask, Path, Path]:
    """The real ffmerge.data.translation on tiny local TSV files (calib and valid from dev.tsv)."""
    corpus = tmp_path / "pairs"
    corpus.mkdir()
    _write_tsv(corpus / "dev.tsv", DEV_PAIRS)
    _write_tsv(corpus / "train.tsv", TRAIN_PAIRS)
    model_dir = marian_folder(tmp_path / "marian")
    source = {"kind": "local", "path": str(corpus)}
    task = TranslationTask(_cfg("translation", source, {"calib": 6, "valid": 2, "train": 4}, tokens=100))
    task.prepare_data(model_dir, tmp_path / "mt_data")
    return task, model_dir, tmp_path / "mt_data"


@pytest.fixture
def recognition(tmp_path, local_corpus) -> tuple[SpeechRecognitionTask, Path, Path]:
    model_dir = whisper_folder(tmp_path / "whisper")
    cfg = _cfg("speech_recognition", local_corpus, {"calib": 4, "valid": 2, "test": 2, "train": 4}, tokens=10)
    task = SpeechRecognitionTask(cfg)
    task.prepare_data(model_dir, tmp_path / "asr_data")
    return task, model_dir, tmp_path / "asr_data"


def test_audio_window_cuts_the_position_table_and_the_padding_together(tmp_path):
    full_dir = whisper_folder(tmp_path / "whisper", seconds=2)
    source = {"kind": "local", "path": str(full_dir), "auto_class": "AutoModelForSpeechSeq2Seq"}
    cut_dir = prepare_model({**source, "audio_window_s": 1}, tmp_path / "cut")
    full = T.WhisperForConditionalGeneration.from_pretrained(full_dir).eval()
    cut = T.WhisperForConditionalGeneration.from_pretrained(cut_dir).eval()
    extractor = T.WhisperProcessor.from_pretrained(cut_dir).feature_extractor

    assert (full.config.max_source_positions, cut.config.max_source_positions) == (2 * POSITIONS, POSITIONS)
    assert extractor.chunk_length == 1 and extractor.n_samples == SAMPLE_RATE
    full_state, cut_state = full.state_dict(), cut.state_dict()
    table = "model.encoder.embed_positions.weight"
    torch.testing.assert_close(cut_state[table], full_state[table][:POSITIONS], rtol=0, atol=0)
    assert all(torch.equal(cut_state[k], v) for k, v in full_state.items() if k != table)
    # the extractor pads a short clip to the cut window, which is what the cut encoder accepts
    clip = np.random.default_rng(0).standard_normal(SAMPLE_RATE // 2).astype(np.float32)
    features = extractor([clip], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    assert features.shape[-1] == 2 * POSITIONS
    with torch.no_grad():
        assert cut.model.encoder(features).last_hidden_state.shape[1] == POSITIONS
        with pytest.raises(ValueError, match="expects the mel input features"):
            full.model.encoder(features)


def test_audio_window_refuses_other_models_and_windows_longer_than_the_models(tmp_path):
    marian = marian_folder(tmp_path / "marian")
    with pytest.raises(SourceError, match="Whisper models only"):
        prepare_model(
            {"kind": "local", "path": str(marian), "auto_class": "AutoModelForSeq2SeqLM", "audio_window_s": 1},
            tmp_path / "m",
        )
    whisper = whisper_folder(tmp_path / "whisper")
    source = {"kind": "local", "path": str(whisper), "auto_class": "AutoModelForSpeechSeq2Seq", "audio_window_s": 2}
    with pytest.raises(SourceError, match="longer than the model's own window of 1 s"):
        prepare_model(source, tmp_path / "w")


def _load(task, model_dir: Path) -> torch.nn.Module:
    return getattr(T, task.auto_class).from_pretrained(model_dir).eval()


# ------------------------------------------------------------------------------------------------
# Calibration batches
# ------------------------------------------------------------------------------------------------


def test_prepared_folder_holds_splits_preprocessor_and_decoder_ids(translation, recognition):
    for task, model_dir, data_dir in (translation, recognition):
        record = json.loads((data_dir / seq2seq.TASK_RECORD).read_text())
        config = T.AutoConfig.from_pretrained(model_dir)
        assert record["decoder_start_token_id"] == config.decoder_start_token_id
        assert record["pad_token_id"] == config.pad_token_id
        assert (data_dir / seq2seq.PREPROCESSOR_DIR).is_dir() and (data_dir / seq2seq.SPLITS_DIR).is_dir()
        task.prepare_data(model_dir, data_dir)  # a rerun replaces its own folder
    assert json.loads((recognition[2] / seq2seq.TASK_RECORD).read_text())["multilingual"] is False


def test_translation_calibration_counts_source_tokens_and_takes_the_same_pairs_targets(translation):
    task, _, data_dir = translation
    tokenizer = T.AutoTokenizer.from_pretrained(data_dir / seq2seq.PREPROCESSOR_DIR)
    batches = list(task.calibration_batches(data_dir))
    pairs = load_translation_split(data_dir / seq2seq.SPLITS_DIR, "calib")
    budget = task.cfg["features"]["tokens"]
    n_src = [len(tokenizer(source).input_ids) for source, _ in pairs]
    n_tgt = [len(tokenizer(text_target=target).input_ids) for _, target in pairs]  # target tokens + </s>
    # the pairs whose source tokens reach the budget; the last one's source is cut, its target kept whole
    used = next(k for k in range(1, len(pairs) + 1) if sum(n_src[:k]) >= budget)
    assert used < len(pairs), "the fixture must hold more source tokens than the budget"
    rows = []
    for batch in batches:
        assert "labels" not in batch
        masks = batch["token_masks"]
        assert not (masks["encoder"] & ~batch["attention_mask"].bool()).any()  # never a padding position
        rows += [(int(e.sum()), d.tolist()) for e, d in zip(masks["encoder"], masks["decoder"], strict=True)]
    assert sum(e for e, _ in rows) == budget  # exactly the budget, counted on the source side
    for r, (n_encoder, decoder) in enumerate(rows):
        if r < used:
            assert n_encoder == (n_src[r] if r < used - 1 else budget - sum(n_src[: used - 1]))
            assert decoder == [True] * n_tgt[r] + [False] * (len(decoder) - n_tgt[r])  # the same pair's target
        else:  # the rest of the last batch: not calibration data on either side
            assert n_encoder == 0 and not any(decoder)
    assert len(batches) == -(-used // 2)  # no batch after the budget was reached
    assert task.calibration_tokens(data_dir) == {"encoder": budget, "decoder": sum(n_tgt[:used])}
    task.cfg["features"]["tokens"] = sum(n_src) + 1
    with pytest.raises(ValueError, match=r"calib split's 6 sentence pairs hold \d+ source tokens.*splits\.calib"):
        task.calibration_tokens(data_dir)


def test_speech_calibration_marks_encoder_positions_that_hold_audio(recognition):
    task, _, data_dir = recognition
    clips = load_speech_split(data_dir / seq2seq.SPLITS_DIR, "calib")
    batches = list(task.calibration_batches(data_dir))
    rows = [row for batch in batches for row in batch["token_masks"]["encoder"]]
    assert len(rows) == 2 * len(batches) and len(batches) >= 1
    for (audio, _), row in zip(clips, rows, strict=False):
        # each encoder position covers 2 * hop samples; a clip fills ceil(n / (2 * hop)) of them
        real = min(math.ceil(len(audio) / (2 * HOP)), POSITIONS)
        assert row.tolist() == [True] * real + [False] * (POSITIONS - real)
    assert batches[0]["input_features"].shape == (2, 8, 2 * POSITIONS)
    seen = {s: sum(int(b["token_masks"][s].sum()) for b in batches) for s in ("encoder", "decoder")}
    assert min(seen.values()) >= task.cfg["features"]["tokens"]


@pytest.mark.parametrize("which", ["translation", "recognition"])
def test_feature_cache_takes_the_budget_from_real_positions_only(which, request, tmp_path):
    task, model_dir, data_dir = request.getfixturevalue(which)
    model = _load(task, model_dir)
    budget = task.calibration_tokens(data_dir)  # translation: {stack: count}, counted on the source side
    counts = budget if isinstance(budget, dict) else {"encoder": budget, "decoder": budget}
    batches = task.calibration_batches(data_dir)
    store = cache_features(model, batches, tmp_path / "features", n_tokens=budget, dtype="float32", progress=False)
    assert store.n_tokens == counts
    # the cache's first rows are fc1's outputs at the first batch's real positions, padding skipped
    first = next(task.calibration_batches(data_dir))
    outputs: dict[str, torch.Tensor] = {}

    def keep(stack: str):
        return lambda module, args, output: outputs.__setitem__(stack, output)

    handles = [getattr(model.model, s).layers[0].fc1.register_forward_hook(keep(s)) for s in ("encoder", "decoder")]
    with torch.no_grad():
        model(**{k: v for k, v in first.items() if k != "token_masks"})
    for handle in handles:
        handle.remove()
    assert set(outputs) == {"encoder", "decoder"}
    for stack, output in outputs.items():
        expected = output[first["token_masks"][stack]]
        n = min(len(expected), counts[stack])
        torch.testing.assert_close(store.load(stack, "pre", 0)[:n], expected[:n])


# ------------------------------------------------------------------------------------------------
# Teacher forcing and training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["translation", "recognition"])
def test_decoder_inputs_are_the_models_own_shift_of_the_labels(which, request):
    task, model_dir, data_dir = request.getfixturevalue(which)
    model = _load(task, model_dir)
    batch = task.training(data_dir, torch.device("cpu"))[1](0)
    labels = batch["labels"]
    assert (labels == IGNORE_INDEX).any(), "a batch of unequal targets must pad its labels with -100"
    encoder = {k: v for k, v in batch.items() if k not in ("decoder_input_ids", "labels")}
    with torch.no_grad():
        ours = model(**encoder, decoder_input_ids=batch["decoder_input_ids"], labels=labels).loss
        theirs = model(**encoder, labels=labels).loss  # the model shifts the labels itself
    torch.testing.assert_close(ours, theirs)
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        torch.testing.assert_close(batch["decoder_input_ids"], model.prepare_decoder_input_ids_from_labels(labels))


def test_whisper_labels_follow_the_generation_prompt(recognition):
    task, _, data_dir = recognition
    tokenizer = T.AutoProcessor.from_pretrained(data_dir / seq2seq.PREPROCESSOR_DIR).tokenizer
    batch = task.training(data_dir, torch.device("cpu"))[1](0)
    sot, no_ts, eot = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", NO_TIMESTAMPS, "<|endoftext|>"])
    assert (batch["decoder_input_ids"][:, 0] == sot).all() and (batch["decoder_input_ids"][:, 1] == no_ts).all()
    for row in batch["labels"]:
        real = row[row != IGNORE_INDEX].tolist()
        assert real[0] == no_ts and real[-1] == eot and sot not in real
        assert tokenizer.decode(real, skip_special_tokens=True).startswith(" sentence number")


@pytest.mark.parametrize("which", ["translation", "recognition"])
def test_training_batches_are_pure_in_step_and_the_loss_decreases(which, request):
    task, model_dir, data_dir = request.getfixturevalue(which)
    loss_fn, get_batch = task.training(data_dir, torch.device("cpu"))
    later = get_batch(5)
    first = get_batch(0)
    for key in first:  # same step, same batch, whatever was asked before
        torch.testing.assert_close(task.training(data_dir, torch.device("cpu"))[1](0)[key], first[key])
    assert not all(torch.equal(first[k], later[k]) for k in first if first[k].shape == later[k].shape)
    model = _load(task, model_dir).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = loss_fn(model, first).item()
    for step in range(12):
        optimizer.zero_grad()
        loss_fn(model, get_batch(step % 2)).backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_fn(model, first).item()
    assert after < 0.8 * before, (before, after)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def _planted_generate(tokenizer, texts: list[str], calls: list[dict]):
    """A ``generate`` that answers with ``texts`` in order (as token ids), recording its options."""
    queue = list(texts)

    def generate(**kwargs):
        calls.append(kwargs)
        batch = [queue.pop(0) for _ in range(len(next(iter(kwargs.values()))))]
        return tokenizer(batch, padding=True, return_tensors="pt")["input_ids"]

    return generate


def test_translation_score_is_bleu_of_the_generations(translation, monkeypatch):
    task, model_dir, data_dir = translation
    model = _load(task, model_dir)
    tokenizer = T.AutoTokenizer.from_pretrained(data_dir / seq2seq.PREPROCESSOR_DIR)
    references = [target for _, target in load_translation_split(data_dir / seq2seq.SPLITS_DIR, "valid")]
    calls: list[dict] = []
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, references, calls))
    assert task.score(model, data_dir, "valid", "selection", torch.device("cpu")) == pytest.approx(100.0)
    assert calls[0]["max_new_tokens"] == 12 and calls[0]["num_beams"] == 1 and calls[0]["do_sample"] is False
    assert set(calls[0]) >= {"input_ids", "attention_mask"}
    partly = [references[0], references[1].rsplit(maxsplit=1)[0]]  # the last word missing
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, partly, []))
    expected, _ = bleu(partly, references)
    assert task.score(model, data_dir, "valid", "selection", torch.device("cpu")) == pytest.approx(expected)
    assert 0 < expected < 100


def test_speech_score_is_wer_of_the_generations(recognition, monkeypatch):
    task, model_dir, data_dir = recognition
    model = _load(task, model_dir)
    tokenizer = T.AutoProcessor.from_pretrained(data_dir / seq2seq.PREPROCESSOR_DIR).tokenizer
    references = [text for _, text in load_speech_split(data_dir / seq2seq.SPLITS_DIR, "test")]
    calls: list[dict] = []
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, [" " + r for r in references], calls))
    assert task.score(model, data_dir, "test", "evaluation", torch.device("cpu")) == 0.0
    assert calls[0]["return_timestamps"] is False and "language" not in calls[0]  # English-only model
    assert calls[0]["input_features"].shape[-1] == 2 * POSITIONS
    wrong = [references[0], references[1].rsplit(maxsplit=1)[0]]  # one deleted word
    n_words = len(references[0].split()) + len(references[1].split())
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, wrong, []))
    assert task.score(model, data_dir, "test", "evaluation", torch.device("cpu")) == pytest.approx(100 / n_words)


@pytest.mark.parametrize("which", ["translation", "recognition"])
def test_score_runs_real_greedy_generation(which, request):
    task, model_dir, data_dir = request.getfixturevalue(which)
    model = _load(task, model_dir)
    first = task.score(model, data_dir, "valid", "selection", torch.device("cpu"))
    again = task.score(model, data_dir, "valid", "selection", torch.device("cpu"))
    assert first == again and math.isfinite(first) and first >= 0


def test_tasks_declare_their_metric_direction_and_auto_class():
    assert (TranslationTask.metric, TranslationTask.higher_is_better) == ("bleu", True)
    assert (SpeechRecognitionTask.metric, SpeechRecognitionTask.higher_is_better) == ("wer", False)
    assert TranslationTask.auto_class == "AutoModelForSeq2SeqLM"
    assert SpeechRecognitionTask.auto_class == "AutoModelForSpeechSeq2Seq"
    assert shutil.which("espeak-ng"), "espeak-ng must be installed for the speech tests (apt-get install espeak-ng)"


# ------------------------------------------------------------------------------------------------
# Decoding settings and the BLEU signature in result files
# ------------------------------------------------------------------------------------------------


def test_num_beams_none_keeps_the_models_generation_config_and_is_recorded(translation, monkeypatch):
    task, model_dir, data_dir = translation
    model = _load(task, model_dir)
    model.generation_config.num_beams = 3  # as OPUS-MT ships beam search in its generation_config
    tokenizer = T.AutoTokenizer.from_pretrained(data_dir / seq2seq.PREPROCESSOR_DIR)
    references = [target for _, target in load_translation_split(data_dir / seq2seq.SPLITS_DIR, "valid")]
    calls: list[dict] = []
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, references * 2, calls))
    task.cfg["selection"] = {**SETTINGS, "num_beams": None}
    task.score(model, data_dir, "valid", "selection", torch.device("cpu"))
    assert "num_beams" not in calls[0]  # generate() falls back to generation_config
    details = task.metric_details()
    assert details["num_beams"] == 3 and details["num_beams_from"] == "generation_config"
    assert details["tokenize"] == "13a" and "tok:13a" in details["signature"] and "nrefs:1" in details["signature"]
    task.cfg["selection"] = {**SETTINGS, "num_beams": 2}
    task.score(model, data_dir, "valid", "selection", torch.device("cpu"))
    assert calls[-1]["num_beams"] == 2 and task.metric_details()["num_beams_from"] == "config"


def test_real_beam_search_from_the_generation_config(translation):
    task, model_dir, data_dir = translation
    model = _load(task, model_dir)
    model.generation_config.num_beams = 2
    task.cfg["selection"] = {**SETTINGS, "num_beams": None}
    beams = task.generate(model, task._context(data_dir), ["le train part"], task.cfg["selection"], torch.device("cpu"))
    assert task.decoding == {"num_beams": 2, "num_beams_from": "generation_config", "max_new_tokens": 12}
    task.cfg["selection"] = {**SETTINGS, "num_beams": 2}
    assert task.generate(model, task._context(data_dir), ["le train part"], task.cfg["selection"], "cpu") == beams
    assert task.decoding["num_beams"] == 2


def test_bleu_tokenize_reaches_scoring_jobs_through_the_data_folder(tmp_path, monkeypatch):
    corpus = tmp_path / "pairs"
    corpus.mkdir()
    _write_tsv(corpus / "dev.tsv", DEV_PAIRS)
    model_dir = marian_folder(tmp_path / "marian")
    cfg = _cfg("translation", {"kind": "local", "path": str(corpus)}, {"calib": 2, "valid": 2}, tokens=10)
    TranslationTask({**cfg, "bleu_tokenize": "zh"}).prepare_data(model_dir, tmp_path / "data")
    assert json.loads((tmp_path / "data" / seq2seq.TASK_RECORD).read_text())["bleu_tokenize"] == "zh"
    job = TranslationTask(cfg)  # a scoring job's config holds no bleu_tokenize (rules pass only their blocks)
    model = _load(job, model_dir)
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "data" / seq2seq.PREPROCESSOR_DIR)
    references = [t for _, t in load_translation_split(tmp_path / "data" / seq2seq.SPLITS_DIR, "valid")]
    monkeypatch.setattr(model, "generate", _planted_generate(tokenizer, references, []))
    job.score(model, tmp_path / "data", "valid", "selection", torch.device("cpu"))
    assert job.metric_details()["tokenize"] == "zh" and "tok:zh" in job.metric_details()["signature"]


def test_evaluation_file_stores_the_bleu_signature_and_the_table_shows_it(tmp_path):
    from ffmerge.report import tables as report
    from ffmerge.workflow import pipeline

    corpus = tmp_path / "pairs"
    corpus.mkdir()
    _write_tsv(corpus / "dev.tsv", DEV_PAIRS[:4])
    _write_tsv(corpus / "test.tsv", DEV_PAIRS[4:])
    model_dir = marian_folder(tmp_path / "marian")
    cfg = _cfg("translation", {"kind": "local", "path": str(corpus)}, {"calib": 2, "valid": 2, "test": 2}, tokens=10)
    cfg["evaluation"] = {**SETTINGS, "num_beams": None}
    pipeline.prepare_data(cfg, model_dir, tmp_path / "data")
    result = pipeline.evaluate(cfg, model_dir, tmp_path / "data", tmp_path / "pre.json", "cpu")
    stored = json.loads((tmp_path / "pre.json").read_text())
    assert stored["metric"] == "bleu" and stored["test"] == result["test"]
    assert stored["metric_tokenize"] == "13a" and stored["metric_signature"].startswith("nrefs:1|")
    assert "version:" in stored["metric_signature"]
    assert stored["decoding"] == {"num_beams": 1, "num_beams_from": "generation_config", "max_new_tokens": 12}
    table = report.results_table(stored | {"variant": "base"}, [])
    assert table["metric_signature"].tolist() == [stored["metric_signature"]]
    assert "metric_signature" not in report.results_table(
        {k: v for k, v in stored.items() if k != "metric_signature"}, []
    )


def test_translation_fine_tuning_reads_the_train_split_from_disk(translation):
    from ffmerge.data.translation import PairFile

    task, _, data_dir = translation
    examples = task._load_examples(data_dir / seq2seq.SPLITS_DIR, "train")
    assert isinstance(examples, PairFile)
    assert list(examples) == load_translation_split(data_dir / seq2seq.SPLITS_DIR, "train")


def test_per_stack_budgets_reach_the_feature_cache_and_the_repair_capture(tmp_path):
    """Translation caches different counts per stack (source tokens vs the same pairs' target tokens); the cache
    and the repair's input capture (repair.inputs: merged) must both take each stack's own count."""
    from families import build
    from families import calibration_batches as family_batches

    from ffmerge.adapters import get_adapter
    from ffmerge.repair import capture_inputs

    model, _ = build("marian")
    budget = {"encoder": 40, "decoder": 25}
    store = cache_features(
        model, family_batches("marian", 30), tmp_path / "f", n_tokens=budget, dtype="float32", progress=False
    )
    assert store.n_tokens == budget and store.load("decoder", "ff_in", 1).shape[0] == 25
    windows = {s.name: [0, 1] for s in get_adapter(model).stacks}
    captured = capture_inputs(model, windows, family_batches("marian", 30), budget)
    for stack, layers in captured.items():
        for j, x in layers.items():
            torch.testing.assert_close(x, store.load(stack, "ff_in", j), rtol=1e-5, atol=1e-6)
