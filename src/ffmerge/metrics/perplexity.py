"""Strided sliding-window perplexity of a causal LM over one long token stream.

This is the Hugging Face "perplexity of fixed-length models" recipe with one correction: the token
right after each window is also scored, from the window's last logit. Windows of ``window`` input
tokens start every ``stride`` tokens, and each scores only the tokens that no earlier window scored.
Hence every token after the first is scored exactly once, also when ``stride == window`` (where the
original recipe silently skips the first token of every window), and no prediction ever sees more
than ``window`` tokens, so ``window`` can be set to the model's full context length.

The loss is computed here from the logits (float32 log-softmax, summed in float64) rather than taken
from the model's mean loss, so that windows scoring different numbers of tokens are weighted by
those numbers and batching cannot change the result.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity plus its ingredients, so results over several streams can be pooled exactly."""

    ppl: float
    nll_sum: float
    n_scored: int


@dataclass(frozen=True)
class Window:
    """Model input ``ids[begin:end]``; its last ``n_scored`` predictions count.

    Those predict ``ids[end - n_scored + 1 : end + 1]``.
    """

    begin: int
    end: int
    n_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def window_plan(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows covering the targets ``1 .. n_tokens - 1`` exactly once, in order."""
    _check_plan_args(n_tokens, window, stride)
    plan: list[Window] = []
    scored_until = 0  # targets 1..scored_until are already scored
    for begin in range(0, n_tokens - 1, stride):
        last_target = min(begin + window, n_tokens - 1)
        plan.append(Window(begin, last_target, last_target - scored_until))
        scored_until = last_target
        if last_target == n_tokens - 1:
            break
    return plan


class PerplexityScorer:
    """Sliding-window perplexity split into batches that can be scored separately and summed.

    The window search scores candidates on a share of the batches first and finishes only the
    promising ones, and it feeds cached hidden states batch by batch; both need the same fixed batch
    order and additive sums (negative log-likelihood and token count) rather than a finished mean.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        *,
        window: int,
        stride: int,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        progress: bool = False,
    ):
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.window = window
        self.plan = window_plan(input_ids.numel(), window, stride)
        self.batches = _batches(self.plan, batch_size)
        self.ids = input_ids.to(dtype=torch.long)
        self.device = device
        self.progress = progress

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def run(self, model: torch.nn.Module, batches: range | None = None) -> dict[str, float]:
        """``{"nll_sum", "n_scored"}`` over ``batches`` (all by default), in their fixed order."""
        _check_context(model, self.window)
        batches = range(self.n_batches) if batches is None else batches
        device = torch.device(self.device) if self.device is not None else next(model.parameters()).device
        ids = self.ids.to(device)
        was_training = model.training
        model.eval()
        nll_sum, n_scored = 0.0, 0
        try:
            with torch.inference_mode(), tqdm(total=len(batches), disable=not self.progress, desc="perplexity") as bar:
                for index in batches:
                    nll_sum += _batch_nll(model, ids, self.batches[index])
                    n_scored += sum(w.n_scored for w in self.batches[index])
                    bar.update(1)
        finally:
            model.train(was_training)
        return {"nll_sum": nll_sum, "n_scored": n_scored}

    @staticmethod
    def metric(sums: dict[str, float]) -> float:
        return math.exp(sums["nll_sum"] / sums["n_scored"])


def sliding_window_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    window: int,
    stride: int,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token stream ``input_ids`` (see module docstring)."""
    scorer = PerplexityScorer(
        input_ids, window=window, stride=stride, batch_size=batch_size, device=device, progress=progress
    )
    sums = scorer.run(model)
    return PerplexityResult(ppl=scorer.metric(sums), nll_sum=sums["nll_sum"], n_scored=int(sums["n_scored"]))


def _batches(plan: list[Window], batch_size: int) -> list[list[Window]]:
    """Group consecutive windows of equal length, so no batch ever needs padding.

    Only the first window (when the stream is shorter than a window) and the last one can be
    shorter than ``window``; they simply run in batches of their own.
    """
    batches: list[list[Window]] = []
    for win in plan:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == win.length:
            batches[-1].append(win)
        else:
            batches.append([win])
    return batches


def _batch_nll(model: torch.nn.Module, ids: torch.Tensor, batch: list[Window]) -> float:
    keep = max(w.n_scored for w in batch)
    inputs = torch.stack([ids[w.begin : w.end] for w in batch])
    labels = torch.full((len(batch), keep), IGNORE_INDEX, dtype=torch.long, device=ids.device)
    for row, w in enumerate(batch):
        labels[row, keep - w.n_scored :] = ids[w.end - w.n_scored + 1 : w.end + 1]
    logits = _tail_logits(model, inputs, keep).float()
    token_nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_nll.double().sum().item()


def _tail_logits(model: torch.nn.Module, inputs: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions; asks the model for only those when it can.

    With a 49k vocabulary, full logits of a 2k window cost 400 MB per sequence although only
    ``stride`` positions are scored.
    """
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(input_ids=inputs, use_cache=False).logits
    return logits[:, -keep:]


def _check_plan_args(n_tokens: int, window: int, stride: int) -> None:
    if n_tokens < 2:
        raise ValueError(f"Need at least 2 tokens to score one, got {n_tokens}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}] or tokens would go unscored, got {stride}")


def _check_context(model: torch.nn.Module, window: int) -> None:
    config = getattr(model, "config", None)
    max_context = getattr(config, "max_position_embeddings", None)
    if isinstance(max_context, int) and window > max_context:
        raise ValueError(
            f"window {window} exceeds the model's context of {max_context} tokens (max_position_embeddings); set the "
            f"task's selection.window and evaluation.window to at most {max_context} (and stride to at most that)"
        )
