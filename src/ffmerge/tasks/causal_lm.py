"""Language modelling: perplexity with a sliding window, as in the paper's GPT-2 experiments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from ..data.text import load_split, prepare_text_splits
from ..finetune import causal_lm_loss, causal_lm_outputs, lm_batches
from ..metrics.perplexity import PerplexityScorer
from .base import Task


class CausalLMTask(Task):
    type = "causal_lm"
    metric = "ppl"
    higher_is_better = False
    auto_class = "AutoModelForCausalLM"
    budget_unit = "tokens"
    training_outputs = staticmethod(causal_lm_outputs)

    def examples_per_step(self) -> int:
        return self.cfg["finetune"]["batch_size"] * self.cfg["finetune"]["seq_len"]

    def prepare_data(self, model_dir: Path, out_dir: Path) -> dict[str, Any]:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab_size = getattr(AutoConfig.from_pretrained(model_dir), "vocab_size", None)
        return prepare_text_splits(
            self.cfg["data"], tokenizer, out_dir, self.cfg["splits"], self.cfg["seed"], vocab_size=vocab_size
        )

    def calibration_batches(self, data_dir: Path) -> Iterator[dict[str, Any]]:
        """The calibration stream cut into rows of ``seq_len`` tokens (no padding, so every token counts)."""
        settings = self.cfg["features"]
        ids = load_split(data_dir, "calib")
        seq_len, batch_size = settings["seq_len"], settings["batch_size"]
        rows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(len(r) for r in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, row in enumerate(chunk):
                input_ids[r, : len(row)] = row
                mask[r, : len(row)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask, "token_masks": {"decoder": mask.bool()}}

    def scorer(self, data_dir: Path, split: str, setting: str, device: torch.device) -> PerplexityScorer:
        settings = self.cfg[setting]
        return PerplexityScorer(
            load_split(data_dir, split),
            window=settings["window"],
            stride=settings["stride"],
            batch_size=settings["batch_size"],
            device=device,
            progress=True,  # goes to the job's log
        )

    def training(self, data_dir: Path, device: torch.device) -> tuple[Callable, Callable[[int], Any]]:
        ft = self.cfg["finetune"]
        get_batch = lm_batches(
            load_split(data_dir, "train"), seq_len=ft["seq_len"], batch_size=ft["batch_size"], seed=self.cfg["seed"]
        )
        return causal_lm_loss, get_batch
