"""Tasks by config ``type``; add one by writing a ``Task`` subclass and listing it in ``TASKS``."""

from __future__ import annotations

from typing import Any

from .base import Task
from .causal_lm import CausalLMTask
from .image_classification import ImageClassificationTask
from .seq2seq import SpeechRecognitionTask, TranslationTask

TASKS: dict[str, type[Task]] = {
    cls.type: cls for cls in (CausalLMTask, ImageClassificationTask, TranslationTask, SpeechRecognitionTask)
}


def get_task(cfg: dict[str, Any]) -> Task:
    try:
        return TASKS[cfg["type"]](cfg)
    except KeyError:
        raise ValueError(f"unknown task type {cfg.get('type')!r}; known: {sorted(TASKS)}") from None


__all__ = ["TASKS", "Task", "get_task"]
