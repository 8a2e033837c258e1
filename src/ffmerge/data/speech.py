"""Deterministic speech splits (16 kHz audio + reference text) for speech-recognition tasks.

No speech corpus installs without the Hugging Face hub, so the offline default speaks English
Wikipedia sentences with Debian's ``espeak-ng``: synthetic, but exactly reproducible from a seed and
the espeak-ng version, and enough to see whether a compressed Whisper still transcribes. Users with
real recordings (LibriSpeech-style) point a ``local`` source at a folder of wav files and a
transcript file instead.

As for text, splits are disjoint at the level of *groups* (a Wikipedia document, or a speaker /
chapter / file of a local corpus): calibration sentences never share a document with test
sentences. Split sizes are utterance counts.

Files written into ``out_dir`` (atomically, the folder appears complete or not at all):
  {split}.audio.npy  float32 mono 16 kHz, every utterance of the split concatenated
  {split}.jsonl      one line per utterance: text, group, start and n_samples into the audio
  splits.json        seed, source, synthesis settings (espeak-ng version, voice, rate) and counts
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.io import wavfile

from ffmerge.data.text import SPLIT_ORDER, WIKI_OFFLINE_DEFAULTS, check_split_counts, load_documents
from ffmerge.sources import SourceError, write_json
from ffmerge.workflow.atomic import atomic_output_dir

SAMPLE_RATE = 16_000
SPLITS_RECORD = "splits.json"
VALID_KINDS = ("espeak_wiki", "local")
ESPEAK_BINARY = "espeak-ng"
ESPEAK_INSTALL_HINT = "apt-get install espeak-ng"
# voice/rate: espeak-ng's US English voice at a calm 160 words per minute (its default is 175);
# max_seconds: Whisper's encoder sees at most 30 s, longer clips could never be transcribed whole.
SPEECH_DEFAULTS: dict[str, Any] = {"voice": "en-us", "rate": 160, "max_seconds": 30.0}
# Sentence length window (words) of the Wikipedia source: shorter ones are mostly fragments, longer
# ones are slow to synthesise and transcribe without telling more about the model.
SENTENCE_DEFAULTS = {"min_words": 6, "max_words": 25}
TRANSCRIPT_FILES = ("transcripts.tsv", "transcripts.jsonl")

# Sentences whose reference text is unambiguous once spoken: letters and plain punctuation only. Digits
# ("1964" may come back as "nineteen sixty-four"), non-ASCII text (IPA, other scripts) and acronyms
# (spelled out letter by letter) would make WER measure text normalisation rather than the model.
_PLAIN_SENTENCE = re.compile(r"[A-Z][A-Za-z ,;:'\"?!.-]*[.!?]['\"]?")
_ACRONYM = re.compile(r"[A-Z][A-Za-z]*[A-Z]")
# A sentence ends at . ! or ? (maybe closed by a quote) followed by space and a capital letter.
_BOUNDARY = re.compile(r"[.!?]['\"]?(?=\s+['\"]?[A-Z])")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp mt no gen col lt sgt capt rev fig approx".split()
)


@dataclass(frozen=True)
class Utterance:
    """One candidate utterance: ``load()`` gives its 16 kHz audio (synthesised or read on demand)."""

    text: str
    group: str
    ref: str
    load: Callable[[], np.ndarray]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def prepare_speech_splits(source: dict, out_dir: str | Path, splits: dict[str, int], seed: int, speech: dict) -> dict:
    """Write the audio and transcripts of every split into ``out_dir``; return the ``splits.json`` record.

    Groups are ordered by a seeded hash and handed out whole, in :data:`SPLIT_ORDER` (test first, so
    the test set depends only on the seed and its own size). Inside a group, utterances keep their
    order; a split that is full drops the rest of its last group rather than share the group.
    Utterances longer than ``speech["max_seconds"]`` are skipped (counted in the record).
    """
    check_split_counts(splits, "utterance")
    settings = {**SPEECH_DEFAULTS, **(speech or {})}
    groups, synthesis = _source_groups(source, settings)
    ordered = sorted(groups, key=lambda name: _seeded_key(seed, name))
    cursor, taken, info, skipped = 0, {}, {}, 0
    for split in (s for s in SPLIT_ORDER if s in splits):
        utterances, cursor, n_groups, n_skipped = _fill_split(
            groups, ordered, cursor, splits[split], settings["max_seconds"]
        )
        skipped += n_skipped
        if len(utterances) < splits[split]:
            raise SourceError(
                f"Speech source has only {len(utterances)} usable utterances left for split {split!r} (after "
                f"the splits before it took their groups) but {splits[split]} were asked for; lower the count "
                "or use a larger source."
            )
        taken[split] = utterances
        seconds = sum(len(audio) for _, audio in utterances) / SAMPLE_RATE
        info[split] = {"n_utterances": len(utterances), "n_groups": n_groups, "seconds": round(seconds, 3)}
    record = {
        "seed": seed,
        "source": source,
        "speech": {**settings, **synthesis, "sample_rate": SAMPLE_RATE},
        "splits": info,
        "skipped_too_long": skipped,
    }
    with atomic_output_dir(out_dir, SPLITS_RECORD) as tmp:
        for split, utterances in taken.items():
            _write_split(tmp, split, utterances)
        write_json(tmp / SPLITS_RECORD, record)
    return record


def load_speech_split(data_dir: str | Path, split: str) -> list[tuple[np.ndarray, str]]:
    """``(audio, text)`` pairs of one split; audio is float32 mono 16 kHz, memory-mapped (read-only)."""
    data_dir = Path(data_dir)
    lines_path = data_dir / f"{split}.jsonl"
    if not lines_path.exists():
        present = sorted(p.stem for p in data_dir.glob("*.jsonl"))
        raise FileNotFoundError(f"No speech split {split!r} in {data_dir}; available: {', '.join(present) or 'none'}")
    audio = np.load(data_dir / f"{split}.audio.npy", mmap_mode="r")
    entries = [json.loads(line) for line in lines_path.read_text(encoding="utf-8").splitlines()]
    return [(audio[e["start"] : e["start"] + e["n_samples"]], e["text"]) for e in entries]


def read_speech_record(data_dir: str | Path) -> dict:
    """Content of ``splits.json`` (seed, source, synthesis settings, counts)."""
    return json.loads((Path(data_dir) / SPLITS_RECORD).read_text(encoding="utf-8"))


def split_sentences(text: str) -> list[str]:
    """Cut running text into sentences, without cutting after initials ("G.I. Joe") or "Dr."-like words.

    A plain rule (punctuation, space, capital) rather than a trained splitter: it is deterministic,
    dependency-free, and its mistakes only merge two sentences, which the length filter then drops.
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        candidate = text[start : match.end()].strip()
        last_word = candidate.rsplit(maxsplit=1)[-1]
        if _INITIALS.fullmatch(last_word) or last_word.rstrip(".").lower() in _ABBREVIATIONS:
            continue
        sentences.append(candidate)
        start = match.end()
    rest = text[start:].strip()
    return sentences + ([rest] if rest else [])


def speakable_sentences(text: str, min_words: int, max_words: int) -> list[str]:
    """Sentences of ``text`` fit for a synthetic test set (see :data:`_PLAIN_SENTENCE` for why)."""
    keep = []
    for sentence in split_sentences(text):
        n_words = len(sentence.split())
        if min_words <= n_words <= max_words and _PLAIN_SENTENCE.fullmatch(sentence) and not _ACRONYM.search(sentence):
            keep.append(sentence)
    return keep


def to_mono_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Integer or float PCM, any channel count and rate, as float32 mono in [-1, 1] at 16 kHz."""
    if np.issubdtype(audio.dtype, np.integer):
        info = np.iinfo(audio.dtype)
        audio = (audio.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        common = math.gcd(rate, SAMPLE_RATE)
        from scipy.signal import resample_poly  # scipy.signal takes ~1 s to import; only data preparation needs it

        audio = resample_poly(audio, SAMPLE_RATE // common, rate // common)
    return audio.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _source_groups(source: dict, settings: dict) -> tuple[dict[str, list[Utterance]], dict]:
    """Group name -> utterances in canonical order, plus what the record should say about synthesis."""
    kind = source.get("kind")
    if kind == "espeak_wiki":
        return _espeak_wiki_groups(source, settings)
    if kind == "local":
        return _local_groups(source), {"engine": "recorded"}
    raise SourceError(f"Unknown speech source kind {kind!r}; valid kinds: {', '.join(VALID_KINDS)}")


def _espeak_wiki_groups(source: dict, settings: dict) -> tuple[dict[str, list[Utterance]], dict]:
    """One group per Wikipedia lead (named by a hash of its text), its speakable sentences in order."""
    binary = _espeak_binary()
    limits = {key: source.get(key, value) for key, value in SENTENCE_DEFAULTS.items()}
    text_source = {
        "kind": "wiki_offline",
        **{key: source.get(key, value) for key, value in WIKI_OFFLINE_DEFAULTS.items()},
    }
    groups: dict[str, list[Utterance]] = {}
    for document in load_documents(text_source)["all"]:
        name = hashlib.sha256(document.encode()).hexdigest()[:16]
        sentences = speakable_sentences(document, limits["min_words"], limits["max_words"])
        if sentences:
            groups[name] = [
                Utterance(text, name, f"{name}:{i}", _synthesiser(binary, text, settings))
                for i, text in enumerate(sentences)
            ]
    synthesis = {"engine": ESPEAK_BINARY, "espeak_version": _espeak_version(binary), **limits}
    return groups, synthesis


def _local_groups(source: dict) -> dict[str, list[Utterance]]:
    """Recordings listed in a transcript file (TSV ``file<TAB>text[<TAB>group]`` or JSONL with those keys).

    The group defaults to the file itself; give LibriSpeech-style data its speaker or chapter so that
    one speaker's recordings never straddle calibration and test.
    """
    root = Path(source["path"])
    if not root.is_dir():
        raise SourceError(f"Local speech source {root} is not a folder")
    transcripts = _transcript_file(root, source.get("transcripts"))
    rows = _read_jsonl(transcripts) if transcripts.suffix == ".jsonl" else _read_tsv(transcripts)
    groups: dict[str, list[Utterance]] = {}
    for row in rows:
        path = root / row["file"]
        if not path.exists():
            raise SourceError(f"{transcripts} lists {row['file']!r}, which is not in {root}")
        group = str(row.get("group") or row["file"])
        groups.setdefault(group, []).append(Utterance(row["text"], group, row["file"], _wav_reader(path)))
    if not groups:
        raise SourceError(f"{transcripts} lists no recordings")
    return groups


def _transcript_file(root: Path, name: str | None) -> Path:
    candidates = [name] if name else list(TRANSCRIPT_FILES)
    for candidate in candidates:
        path = root / candidate
        if path.exists():
            return path
    raise SourceError(
        f"No transcript file {' or '.join(candidates)} in {root}: write one line per recording, "
        '\'file<TAB>text[<TAB>group]\' (.tsv) or {"file", "text", "group"} (.jsonl)'
    )


def _read_tsv(path: Path) -> list[dict[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) not in (2, 3) or not fields[1].strip():
            raise SourceError(f"{path}:{number}: expected 'file<TAB>text[<TAB>group]', got {line!r}")
        rows.append(dict(zip(("file", "text", "group"), (f.strip() for f in fields), strict=False)))
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not row.get("file") or not str(row.get("text", "")).strip():
            raise SourceError(f"{path}:{number}: expected an object with non-empty 'file' and 'text', got {line!r}")
        rows.append({**row, "text": str(row["text"]).strip()})
    return rows


def _wav_reader(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            rate, audio = wavfile.read(path)
        except ValueError as exc:
            raise SourceError(f"{path} is not a readable PCM wav file ({exc}); convert it, e.g. with ffmpeg") from exc
        return to_mono_16k(audio, rate)

    return load


# --------------------------------------------------------------------------------------------
# espeak-ng
# --------------------------------------------------------------------------------------------


def _espeak_binary() -> str:
    binary = shutil.which(ESPEAK_BINARY)
    if binary is None:
        raise SourceError(
            f"The speech source 'espeak_wiki' needs the {ESPEAK_BINARY} program, which is not on PATH: "
            f"{ESPEAK_INSTALL_HINT} (Debian/Ubuntu), or use a 'local' source with your own recordings."
        )
    return binary


def _espeak_version(binary: str) -> str:
    """The version string, recorded because another espeak-ng release may speak differently."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"text-to-speech:\s*(\S+)", output)
    return match.group(1) if match else output.strip()


def _synthesiser(binary: str, text: str, settings: dict) -> Callable[[], np.ndarray]:
    def speak() -> np.ndarray:
        return synthesise(text, voice=settings["voice"], rate=settings["rate"], binary=binary)

    return speak


def synthesise(text: str, *, voice: str, rate: int, binary: str = ESPEAK_BINARY) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return float32 mono 16 kHz audio.

    The text goes through stdin (``--stdin``), so a sentence starting with "-" is never read as an
    option; the WAV goes to a file (``-w``) because the ``--stdout`` header carries no length.
    """
    with tempfile.TemporaryDirectory(prefix="ffmerge-espeak-") as folder:
        wav = Path(folder) / "speech.wav"
        command = [binary, "-v", voice, "-s", str(rate), "-b", "1", "-w", str(wav), "--stdin"]
        result = subprocess.run(command, input=text.encode(), capture_output=True)
        if result.returncode != 0 or not wav.exists():
            raise SourceError(
                f"{ESPEAK_BINARY} failed on {text[:60]!r} (voice {voice!r}, rate {rate}): "
                f"{result.stderr.decode(errors='replace').strip() or f'exit {result.returncode}'}"
            )
        rate_hz, audio = wavfile.read(wav)
    return to_mono_16k(audio, rate_hz)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _fill_split(
    groups: dict[str, list[Utterance]], ordered: list[str], cursor: int, count: int, max_seconds: float
) -> tuple[list[tuple[Utterance, np.ndarray]], int, int, int]:
    """Take whole groups from ``ordered[cursor:]`` until ``count`` utterances; return them and the new cursor.

    Audio is produced only for utterances that are kept, so a small split never synthesises the
    whole corpus.
    """
    taken: list[tuple[Utterance, np.ndarray]] = []
    n_groups = skipped = 0
    while len(taken) < count and cursor < len(ordered):
        n_groups += 1
        for utterance in groups[ordered[cursor]]:
            audio = utterance.load()
            if len(audio) > max_seconds * SAMPLE_RATE:
                skipped += 1
                continue
            taken.append((utterance, audio))
            if len(taken) == count:
                break
        cursor += 1
    return taken, cursor, n_groups, skipped


def _write_split(folder: Path, split: str, utterances: list[tuple[Utterance, np.ndarray]]) -> None:
    audio = np.concatenate([a for _, a in utterances]).astype(np.float32)
    np.save(folder / f"{split}.audio.npy", audio)
    lines, start = [], 0
    for utterance, clip in utterances:
        entry = {"text": utterance.text, "group": utterance.group, "ref": utterance.ref}
        lines.append(json.dumps({**entry, "start": start, "n_samples": len(clip)}, sort_keys=True))
        start += len(clip)
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _seeded_key(seed: int, name: str) -> bytes:
    """A seeded hash order: stable across Python/NumPy versions and independent of the input order."""
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()
