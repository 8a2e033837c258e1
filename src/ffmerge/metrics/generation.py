"""Corpus metrics of generated text: word error rate (speech recognition) and BLEU (translation).

Both are corpus-level, never averages of sentence scores: WER is the total number of word edits
over the total number of reference words (jiwer), BLEU is sacrebleu's corpus BLEU, reported with
its signature so a number can always be traced to its tokenisation and smoothing.

WER normalisation. Hypotheses and references both go through :data:`ENGLISH_WER_TRANSFORM`:
lowercase, hyphens and dashes become spaces ("well-known" = "well known", which espeak-ng speaks
the same way), punctuation is removed (apostrophes too: "isn't" -> "isnt"), runs of spaces
collapse. We use these jiwer transforms rather than Whisper's ``EnglishTextNormalizer`` because the
metric must not depend on a model's tokenizer files (the spelling map ships as ``normalizer.json``,
absent from many converted folders) and must mean the same for every model compared; Whisper's
normaliser also rewrites numbers and British spellings, which our references (plain sentences
without digits) do not need. Numbers comparable with the Whisper paper would need that normaliser. On 50
espeak-ng Wikipedia sentences Whisper tiny.en scored 24.5 % WER with this normalisation and 25.1 % with
``EnglishTextNormalizer({})`` (its contraction expansion adds words; "sixty"/"60" matched only there).
"""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import sacrebleu

ENGLISH_WER_TRANSFORM = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.SubstituteRegexes({r"[-\u2010-\u2015]": " "}),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def normalize_english(text: str) -> str:
    """The text as WER compares it (for logs and debugging)."""
    return " ".join(ENGLISH_WER_TRANSFORM(text)[0])


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate in percent (may exceed 100 with many insertions)."""
    _check_pairs(hypotheses, references)
    empty = [i for i, ref in enumerate(references) if not normalize_english(ref)]
    if empty:
        raise ValueError(f"references {empty[:5]} are empty after normalisation; WER needs reference words")
    error = jiwer.wer(
        list(references),
        list(hypotheses),
        reference_transform=ENGLISH_WER_TRANSFORM,
        hypothesis_transform=ENGLISH_WER_TRANSFORM,
    )
    return 100.0 * error


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str | None = None) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) against one reference per sentence, and its signature string.

    ``tokenize`` is sacrebleu's default ("13a") when None, right for English targets; use "zh" or
    "ja-mecab" for those target languages.
    """
    _check_pairs(hypotheses, references)
    metric = sacrebleu.BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), str(metric.get_signature())


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("no sentences to score")
