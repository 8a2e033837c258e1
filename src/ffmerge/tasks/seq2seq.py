"""Encoder-decoder tasks: translation (Marian / OPUS-MT, BLEU) and speech recognition (Whisper, WER).

Both share one recipe, kept in :class:`Seq2SeqTask`: the encoder reads the source (tokens or log-mel
frames), the decoder is teacher-forced on the reference for calibration and fine-tuning (labels
shifted right exactly as the model family's own ``shift_tokens_right`` does, padding -> -100 in the
loss), and quality is measured on generations with fixed settings: the model's own
``generation_config`` (beam search for OPUS-MT, as its published scores use) unless the setting block's
``num_beams`` overrides it. Subclasses only say how to read their data and turn a source into encoder inputs.

``prepare_data`` writes a self-contained data folder, because calibration and fine-tuning get only
that folder (never the model folder) and a compressed checkpoint may carry no preprocessor files:
  splits/          the split files (ffmerge.data.translation or ffmerge.data.speech)
  preprocessor/    the model's tokenizer (Marian) or processor (Whisper), as saved by the model folder
  seq2seq.json     decoder start / pad ids, position limits and the data record
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from torch import nn
from transformers.models.marian.modeling_marian import shift_tokens_right as marian_shift_tokens_right
from transformers.models.whisper.modeling_whisper import shift_tokens_right as whisper_shift_tokens_right

from ..data.speech import load_speech_split, prepare_speech_splits
from ..data.translation import load_translation_split, open_translation_split, prepare_translation_splits
from ..features import first_positions
from ..finetune import TrainingOutputs
from ..metrics.generation import bleu, wer
from ..sources import write_json
from ..workflow.atomic import atomic_output_dir
from .base import Task

logger = logging.getLogger(__name__)

SPLITS_DIR = "splits"
PREPROCESSOR_DIR = "preprocessor"
TASK_RECORD = "seq2seq.json"
IGNORE_INDEX = -100  # positions the cross-entropy skips (transformers' convention)
WHISPER_CONV_STRIDE = 2  # Whisper's second encoder convolution halves the log-mel frame rate
WHISPER_LANGUAGE, WHISPER_TASK = "en", "transcribe"  # multilingual checkpoints transcribe English


@dataclass(frozen=True)
class _Context:
    """What every step needs from a prepared data folder, loaded once per folder."""

    preprocessor: Any
    tokenizer: Any
    record: dict[str, Any]


class Seq2SeqTask(Task):
    """Shared recipe. Subclasses set the class attributes, implement the four data/metric hooks below
    (``_prepare_splits``, ``_load_examples``, ``_encoder_inputs``, ``_metric``) and may override the two
    generation hooks (``_configure_preprocessor``, ``_generate_kwargs``)."""

    preprocessor_class: ClassVar[str]
    shift_tokens_right: ClassVar[Callable[[torch.Tensor, int, int], torch.Tensor]]
    target_prefix: ClassVar[str] = ""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self._contexts: dict[Path, _Context] = {}
        self.decoding: dict[str, Any] = {}  # the last generate()'s beams and length limit

    @staticmethod
    def training_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> TrainingOutputs:
        return seq2seq_outputs(model, batch)

    # ---------------------------------------------------------------- subclass hooks

    def _prepare_splits(self, out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def _load_examples(self, splits_dir: Path, split: str) -> list[tuple[Any, str]]:
        """``(source, reference text)`` pairs of a split."""
        raise NotImplementedError

    def _encoder_inputs(self, ctx: _Context, sources: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs of the encoder and a bool ``[B, S]`` mask of its real (non-padding) positions."""
        raise NotImplementedError

    def _metric(self, hypotheses: list[str], references: list[str]) -> float:
        raise NotImplementedError

    def _configure_preprocessor(self, preprocessor: Any, model_dir: Path) -> dict[str, Any]:
        """Adjust the preprocessor before it is saved; returns facts for the record."""
        return {}

    def _generate_kwargs(self, ctx: _Context) -> dict[str, Any]:
        return {}

    # ---------------------------------------------------------------- Task interface

    def prepare_data(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        preprocessor = getattr(transformers, self.preprocessor_class).from_pretrained(model_dir)
        config = transformers.AutoConfig.from_pretrained(model_dir)
        facts = self._configure_preprocessor(preprocessor, Path(model_dir))
        with atomic_output_dir(out_dir, TASK_RECORD) as tmp:
            data = self._prepare_splits(tmp / SPLITS_DIR)
            preprocessor.save_pretrained(tmp / PREPROCESSOR_DIR)
            record = {
                "task": self.type,
                "model_dir": str(model_dir),
                "preprocessor": type(preprocessor).__name__,
                "decoder_start_token_id": config.decoder_start_token_id,
                "pad_token_id": config.pad_token_id,
                "max_source_positions": _max_positions(config, "max_source_positions"),
                "max_target_positions": _max_positions(config, "max_target_positions"),
                **facts,
                "data": data,
            }
            write_json(tmp / TASK_RECORD, record)
        self._contexts.pop(Path(out_dir).resolve(), None)
        return record

    def calibration_batches(self, data_dir: Path) -> Iterator[dict[str, Any]]:
        """Teacher-forced batches of the calib split, until both stacks have ``features.tokens`` real positions.

        Inputs carry no ``labels`` (only a forward pass is needed); ``token_masks`` mark the source
        positions that are not padding and the decoder positions that hold the start token or a
        reference token.
        """
        settings = self.cfg["features"]
        ctx = self._context(data_dir)
        examples = self._load_examples(Path(data_dir) / SPLITS_DIR, "calib")
        seen = {"encoder": 0, "decoder": 0}
        for chunk in _chunks(examples, settings["batch_size"]):
            batch = self._teacher_forced(ctx, chunk)
            del batch["labels"]
            yield batch
            for stack, mask in batch["token_masks"].items():
                seen[stack] += int(mask.sum())
            if min(seen.values()) >= settings["tokens"]:
                return

    def score(self, model: nn.Module, data_dir: Path, split: str, setting: str, device: torch.device) -> float:
        """Generation on ``split`` with the ``setting`` block's limits and beams, then the metric."""
        settings = self.cfg[setting]
        ctx = self._context(data_dir)
        examples = self._load_examples(Path(data_dir) / SPLITS_DIR, split)
        hypotheses = self.generate(model, ctx, [source for source, _ in examples], settings, device)
        return self._metric(hypotheses, [reference for _, reference in examples])

    def training(self, data_dir: Path, device: torch.device) -> tuple[Callable, Callable[[int], Any]]:
        """Cross-entropy on reference tokens; batch ``i`` is a sample of the train split seeded by (seed, i) alone,
        so it never depends on the batches before it (what exact resume needs, see ``ffmerge.finetune``)."""
        settings = self.cfg["finetune"]
        ctx = self._context(data_dir)
        examples = self._load_examples(Path(data_dir) / SPLITS_DIR, "train")
        batch_size, seed = min(settings["batch_size"], len(examples)), self.cfg["seed"]

        def get_batch(step: int) -> dict[str, torch.Tensor]:
            rng = np.random.default_rng((seed, step))
            picked = rng.choice(len(examples), size=batch_size, replace=False)
            batch = self._teacher_forced(ctx, [examples[i] for i in picked])
            del batch["token_masks"]
            return batch

        return seq2seq_loss, get_batch

    # ---------------------------------------------------------------- shared machinery

    def generate(
        self, model: nn.Module, ctx: _Context, sources: Sequence[Any], settings: Mapping[str, Any], device: torch.device
    ) -> list[str]:
        """Decoded generations of ``sources`` (special tokens removed, whitespace stripped).

        ``num_beams`` None (the default) keeps the model's ``generation_config`` value (opus-mt-zh-en ships 6
        beams, Whisper 1); an integer overrides it (1 = greedy). ``self.decoding`` records what was used.
        """
        model.eval()
        options = {"max_new_tokens": settings["max_new_tokens"], "do_sample": False, **self._generate_kwargs(ctx)}
        if settings.get("num_beams") is not None:
            options["num_beams"] = settings["num_beams"]
        # transformers 5 leaves unset generation options None, meaning its default of 1 beam
        model_beams = getattr(getattr(model, "generation_config", None), "num_beams", None) or 1
        self.decoding = {
            "num_beams": options.get("num_beams", model_beams),
            "num_beams_from": "config" if "num_beams" in options else "generation_config",
            "max_new_tokens": options["max_new_tokens"],
        }
        texts: list[str] = []
        with torch.inference_mode():
            for chunk in _chunks(list(sources), settings["batch_size"]):
                inputs, _ = self._encoder_inputs(ctx, chunk)
                output = model.generate(**{k: v.to(device) for k, v in inputs.items()}, **options)
                texts.extend(t.strip() for t in ctx.tokenizer.batch_decode(output, skip_special_tokens=True))
        return texts

    def _teacher_forced(self, ctx: _Context, examples: Sequence[tuple[Any, str]]) -> dict[str, Any]:
        """Encoder inputs, ``decoder_input_ids``, ``labels`` (pad -> -100) and ``token_masks`` of a batch."""
        inputs, encoder_mask = self._encoder_inputs(ctx, [source for source, _ in examples])
        labels, lengths = self._labels(ctx, [target for _, target in examples])
        record = ctx.record
        decoder_input_ids = type(self).shift_tokens_right(
            labels, record["pad_token_id"], record["decoder_start_token_id"]
        )
        decoder_mask = torch.arange(labels.shape[1])[None, :] < lengths[:, None]
        return {
            **inputs,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "token_masks": {"encoder": encoder_mask, "decoder": decoder_mask},
        }

    def _labels(self, ctx: _Context, targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference token ids padded with -100, and each row's length.

        A leading decoder start token is dropped (Whisper's tokenizer writes ``<|startoftranscript|>``),
        because the shift puts it back: the decoder must see it as input, never predict it.
        """
        start = ctx.record["decoder_start_token_id"]
        encoded = ctx.tokenizer(
            text_target=[self.target_prefix + t for t in targets],
            truncation=True,
            max_length=ctx.record["max_target_positions"],
        )["input_ids"]
        rows = [ids[1:] if ids and ids[0] == start else ids for ids in encoded]
        lengths = torch.tensor([len(r) for r in rows])
        labels = torch.full((len(rows), int(lengths.max())), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return labels, lengths

    def _context(self, data_dir: Path) -> _Context:
        key = Path(data_dir).resolve()
        if key not in self._contexts:
            record_path = key / TASK_RECORD
            if not record_path.exists():
                raise FileNotFoundError(
                    f"{key} is not a prepared {self.type} data folder (no {TASK_RECORD}); run prepare_data"
                )
            record = json.loads(record_path.read_text(encoding="utf-8"))
            preprocessor = getattr(transformers, self.preprocessor_class).from_pretrained(key / PREPROCESSOR_DIR)
            tokenizer = getattr(preprocessor, "tokenizer", preprocessor)
            self._contexts[key] = _Context(preprocessor, tokenizer, record)
        return self._contexts[key]


class TranslationTask(Seq2SeqTask):
    """Machine translation (the paper's OPUS-MT zh-en on Tatoeba), scored with sacrebleu corpus BLEU.

    Calibration counts its budget on the source side, as the paper's "10k tokens": the encoder gets exactly
    ``features.tokens`` source tokens (calib pairs in file order, the last one cut), and the decoder gets
    every target token of those same pairs (the start token and the reference, the cut pair's included), so
    both stacks see one set of sentence pairs; the decoder's count follows from it
    (:meth:`calibration_tokens`). BLEU uses ``bleu_tokenize``, which ``prepare_data`` records in the data
    folder (so every scoring job uses it); each score's sacrebleu signature is kept in
    :meth:`metric_details` for the result files.
    """

    type = "translation"
    budget_unit = "sentence pairs"
    metric = "bleu"
    higher_is_better = True
    auto_class = "AutoModelForSeq2SeqLM"
    preprocessor_class = "AutoTokenizer"
    shift_tokens_right = staticmethod(marian_shift_tokens_right)

    def __init__(self, cfg: dict[str, Any]):
        super().__init__(cfg)
        self._details: dict[str, Any] = {}
        self._tokenize: str | None = cfg.get("bleu_tokenize")

    def _prepare_splits(self, out_dir: Path) -> dict[str, Any]:
        return prepare_translation_splits(self.cfg["data"], out_dir, self.cfg["splits"], self.cfg["seed"])

    def _load_examples(self, splits_dir: Path, split: str) -> Sequence[tuple[Any, str]]:
        # the train split (millions of pairs at paper scale) stays on disk; fine-tuning reads the sampled lines
        if split == "train":
            return open_translation_split(splits_dir, split)
        return load_translation_split(splits_dir, split)

    def _configure_preprocessor(self, preprocessor: Any, model_dir: Path) -> dict[str, Any]:
        return {"bleu_tokenize": self.cfg.get("bleu_tokenize")}

    def calibration_batches(self, data_dir: Path) -> Iterator[dict[str, Any]]:
        """Teacher-forced batches of the calib split until the source side holds ``features.tokens`` tokens.

        ``token_masks["encoder"]`` marks exactly that many source tokens in all (the last pair's source is cut),
        ``token_masks["decoder"]`` the start token and reference tokens of every pair with a marked source token.
        """
        settings = self.cfg["features"]
        ctx = self._context(data_dir)
        examples = self._load_examples(Path(data_dir) / SPLITS_DIR, "calib")
        remaining = settings["tokens"]
        for chunk in _chunks(examples, settings["batch_size"]):
            batch = self._teacher_forced(ctx, chunk)
            del batch["labels"]
            masks = batch["token_masks"]
            masks["encoder"] = first_positions(masks["encoder"], remaining)
            masks["decoder"] = masks["decoder"] & masks["encoder"].any(dim=1, keepdim=True)
            yield batch
            remaining -= int(masks["encoder"].sum())
            if remaining <= 0:
                return

    def calibration_tokens(self, data_dir: Path) -> dict[str, int]:
        """Positions per stack the calibration batches mark: ``features.tokens`` source tokens, and the target
        tokens of the same pairs."""
        counts = {"encoder": 0, "decoder": 0}
        for batch in self.calibration_batches(data_dir):
            for stack, mask in batch["token_masks"].items():
                counts[stack] += int(mask.sum())
        wanted = self.cfg["features"]["tokens"]
        if counts["encoder"] < wanted:
            n_pairs = len(self._load_examples(Path(data_dir) / SPLITS_DIR, "calib"))
            raise ValueError(
                f"the calib split's {n_pairs} sentence pairs hold {counts['encoder']} source tokens, but "
                f"features.tokens asks for {wanted}: raise splits.calib or lower features.tokens"
            )
        return counts

    def score(self, model: nn.Module, data_dir: Path, split: str, setting: str, device: torch.device) -> float:
        self._tokenize = _bleu_tokenize(self.cfg, self._context(data_dir).record)
        return super().score(model, data_dir, split, setting, device)

    def metric_details(self) -> dict[str, Any]:
        """The last score's sacrebleu signature, tokenizer and decoding settings (empty before any score)."""
        return dict(self._details)

    def _encoder_inputs(self, ctx: _Context, sources: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = ctx.tokenizer(
            list(sources),
            padding=True,
            truncation=True,
            max_length=ctx.record["max_source_positions"],
            return_tensors="pt",
        )
        encoder = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        return encoder, inputs["attention_mask"].bool()

    def _metric(self, hypotheses: list[str], references: list[str]) -> float:
        score, signature = bleu(hypotheses, references, tokenize=self._tokenize)
        logger.info("BLEU %.2f (%s)", score, signature)
        tokenizer = signature.split("tok:", 1)[1].split("|", 1)[0] if "tok:" in signature else self._tokenize
        self._details = {"signature": signature, "tokenize": tokenizer, **self.decoding}
        return score


class SpeechRecognitionTask(Seq2SeqTask):
    """English speech recognition with Whisper, scored with corpus WER (ffmerge.metrics.generation)."""

    type = "speech_recognition"
    budget_unit = "utterances"
    metric = "wer"
    higher_is_better = False
    auto_class = "AutoModelForSpeechSeq2Seq"
    preprocessor_class = "AutoProcessor"
    shift_tokens_right = staticmethod(whisper_shift_tokens_right)
    # Whisper's text tokens start with a space (" Hello" is one token); references are encoded the same way
    target_prefix = " "

    def _prepare_splits(self, out_dir: Path) -> dict[str, Any]:
        return prepare_speech_splits(
            self.cfg["data"], out_dir, self.cfg["splits"], self.cfg["seed"], self.cfg.get("speech", {})
        )

    def _load_examples(self, splits_dir: Path, split: str) -> list[tuple[Any, str]]:
        return load_speech_split(splits_dir, split)

    def _configure_preprocessor(self, preprocessor: Any, model_dir: Path) -> dict[str, Any]:
        """Make the labels' prefix equal the prompt generation uses: no timestamps, and for a multilingual
        checkpoint English transcription (an English-only ``.en`` model takes no language or task token)."""
        multilingual = _is_multilingual(model_dir)
        language, task = (WHISPER_LANGUAGE, WHISPER_TASK) if multilingual else (None, None)
        preprocessor.tokenizer.language, preprocessor.tokenizer.task = language, task
        preprocessor.tokenizer.set_prefix_tokens(predict_timestamps=False)
        return {"multilingual": multilingual}

    def _generate_kwargs(self, ctx: _Context) -> dict[str, Any]:
        language = {"language": WHISPER_LANGUAGE, "task": WHISPER_TASK} if ctx.record["multilingual"] else {}
        return {"return_timestamps": False, **language}

    def _encoder_inputs(self, ctx: _Context, sources: Sequence[Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Log-mel features padded to the extractor's window (30 s for Whisper) and the positions that hold audio.

        Encoder position j covers samples [j, j + 1) * hop_length * 2, so a clip of n samples fills
        ceil(n / (2 * hop_length)) positions (ceil(n / 320) at 16 kHz); the rest encode silence padding.
        """
        extractor = ctx.preprocessor.feature_extractor
        audio = [np.asarray(a, dtype=np.float32) for a in sources]
        _check_clip_lengths(audio, extractor)
        features = extractor(audio, sampling_rate=extractor.sampling_rate, return_tensors="pt")
        positions = extractor.nb_max_frames // WHISPER_CONV_STRIDE
        samples_per_position = extractor.hop_length * WHISPER_CONV_STRIDE
        real = torch.tensor([min(math.ceil(len(a) / samples_per_position), positions) for a in audio])
        return {"input_features": features["input_features"]}, torch.arange(positions)[None, :] < real[:, None]

    def _metric(self, hypotheses: list[str], references: list[str]) -> float:
        return wer(hypotheses, references)


def _check_clip_lengths(audio: Sequence[np.ndarray], extractor: Any) -> None:
    """Refuse clips longer than the encoder hears: the extractor would cut them silently, and the model be scored
    (and trained) against reference words it never heard."""
    window = extractor.chunk_length * extractor.sampling_rate
    longest = max((len(a) for a in audio), default=0)
    if longest > window:
        raise ValueError(
            f"a clip of {longest / extractor.sampling_rate:.2f} s is longer than the model's audio window of "
            f"{extractor.chunk_length} s: Whisper would hear only its start, while WER and the loss use the whole "
            "transcript. Set the task's speech.max_seconds to at most the window (longer clips are skipped) and "
            "rerun prepare_data, or widen model.audio_window_s (Whisper's own window is 30 s)."
        )


def _bleu_tokenize(cfg: Mapping[str, Any], record: Mapping[str, Any]) -> str | None:
    """The config's ``bleu_tokenize`` when the job was given it, else the one ``prepare_data`` recorded."""
    return cfg["bleu_tokenize"] if "bleu_tokenize" in cfg else record.get("bleu_tokenize")


def seq2seq_outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> TrainingOutputs:
    """Mean cross-entropy over reference tokens (labels of -100, the padding, are skipped by the model), the
    decoder's logits, and the reference positions among them."""
    out = model(**batch)
    return out.loss, out.logits, batch["labels"] != IGNORE_INDEX


def seq2seq_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over reference tokens."""
    return seq2seq_outputs(model, batch)[0]


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _max_positions(config: Any, key: str) -> int:
    """Whisper names its limits per stack; Marian has one ``max_position_embeddings`` for both."""
    return int(getattr(config, key, None) or config.max_position_embeddings)


def _is_multilingual(model_dir: Path) -> bool:
    try:
        generation = transformers.GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: an English-only model is the safe reading
        return False
    return bool(getattr(generation, "is_multilingual", False))
