"""Sliding-window perplexity against independent per-token references on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ffmerge.metrics import PerplexityResult, sliding_window_perplexity
from ffmerge.metrics.perplexity import window_plan

VOCAB = 100


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A tiny Llama with large random weights, so its predictions depend strongly on context."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


def tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def context_start(target: int, window: int, stride: int) -> int:
    """Where the context of ``target`` starts: at the first window (every ``stride``) that reaches it."""
    return stride * max(0, math.ceil((target - window) / stride))


@torch.inference_mode()
def reference_nll(model: LlamaForCausalLM, ids: torch.Tensor, start_of) -> float:
    """Score each token alone, with one forward pass over exactly the context ``start_of`` gives it."""
    total = 0.0
    for target in range(1, ids.numel()):
        context = ids[start_of(target) : target]
        logits = model(input_ids=context[None]).logits[0, -1].float()
        total -= torch.log_softmax(logits, dim=-1)[ids[target]].item()
    return total


@pytest.mark.parametrize(
    "n, window, stride",
    [(50, 8, 8), (50, 8, 3), (50, 8, 1), (47, 16, 5), (64, 16, 16), (9, 8, 8), (8, 8, 8), (5, 8, 4), (2, 4, 1)],
)
def test_every_token_after_the_first_is_scored_exactly_once(model, n, window, stride):
    plan = window_plan(n, window, stride)
    scored = [t for w in plan for t in range(w.end - w.n_scored + 1, w.end + 1)]
    assert scored == list(range(1, n))
    assert all(w.length <= window and w.n_scored <= w.length for w in plan)
    result = sliding_window_perplexity(model, tokens(n), window=window, stride=stride)
    assert result.n_scored == n - 1


def test_stride_one_equals_brute_force_with_context_capped_at_window(model):
    ids, window = tokens(40), 8
    brute = reference_nll(model, ids, lambda t: max(0, t - window))
    result = sliding_window_perplexity(model, ids, window=window, stride=1)
    assert result.nll_sum == pytest.approx(brute, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(brute / 39), rel=1e-5)
    # Guard: the model must be context sensitive, or the comparison above would prove nothing.
    full = reference_nll(model, ids, lambda t: 0)
    assert abs(full - brute) > 1e-2 * abs(brute)


@pytest.mark.parametrize("n, window, stride", [(45, 8, 3), (45, 8, 8), (41, 8, 5), (30, 12, 7)])
def test_strided_result_equals_per_token_reference(model, n, window, stride):
    ids = tokens(n, seed=n)
    expected = reference_nll(model, ids, lambda t: context_start(t, window, stride))
    result = sliding_window_perplexity(model, ids, window=window, stride=stride)
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)


def test_single_window_matches_models_own_mean_loss(model):
    ids = tokens(30)
    result = sliding_window_perplexity(model, ids, window=64, stride=16)
    with torch.inference_mode():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert result.n_scored == 29
    assert result.nll_sum / result.n_scored == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("n, window, stride", [(61, 8, 3), (64, 8, 8), (6, 8, 2)])
def test_batching_does_not_change_the_result(model, n, window, stride):
    ids = tokens(n, seed=7)
    single = sliding_window_perplexity(model, ids, window=window, stride=stride, batch_size=1)
    for batch_size in (2, 3, 64):
        batched = sliding_window_perplexity(model, ids, window=window, stride=stride, batch_size=batch_size)
        assert batched.n_scored == single.n_scored
        assert batched.nll_sum == pytest.approx(single.nll_sum, rel=1e-6)


def test_result_fields_and_training_mode_is_restored(model):
    model.train()
    try:
        result = sliding_window_perplexity(model, tokens(20), window=8, stride=4)
        assert model.training
    finally:
        model.eval()
    assert isinstance(result, PerplexityResult)
    assert result.ppl == pytest.approx(math.exp(result.nll_sum / result.n_scored))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": 8, "stride": 9}, "stride"),
        ({"window": 8, "stride": 0}, "stride"),
        ({"window": 256, "stride": 8}, "context"),
        ({"window": 8, "stride": 4, "batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_arguments_are_rejected(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sliding_window_perplexity(model, tokens(20), **kwargs)


def test_input_must_be_one_dimensional_with_something_to_score(model):
    with pytest.raises(ValueError, match="1-D"):
        sliding_window_perplexity(model, tokens(20).reshape(4, 5), window=8, stride=4)
    with pytest.raises(ValueError, match="at least 2"):
        sliding_window_perplexity(model, tokens(1), window=8, stride=4)
