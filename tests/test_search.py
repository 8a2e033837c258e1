"""The in-process window search: replayed hidden states give the scores of full forward passes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import FAMILIES, LAYERS, VOCAB, build, calibration_batches

from ffmerge.adapters import get_adapter
from ffmerge.experiments import window_starts
from ffmerge.features import cache_features
from ffmerge.metrics.perplexity import PerplexityScorer
from ffmerge.search import record_layer_inputs, search_windows, start_at
from ffmerge.workflow import pipeline

CAUSAL = [name for name, family in FAMILIES.items() if family.generates and name not in ("marian", "whisper")]


def _scorer(batch_size: int = 2) -> PerplexityScorer:
    ids = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    return PerplexityScorer(ids, window=24, stride=16, batch_size=batch_size)


def _setup(name: str, tmp_path):
    model, _ = build(name)
    model.eval()
    store = cache_features(model, calibration_batches(name, 30), tmp_path / "feat", n_tokens=150, progress=False)
    return model, store


def _compress(store, variant: str, fraction: str):
    return lambda model, start, plan=None: pipeline.compress(model, variant, fraction, start, store, plan)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("variant", ["permute", "drop"])
def test_replayed_states_give_the_full_forward_score_for_every_start(name, variant, tmp_path):
    base, store = _setup(name, tmp_path)
    scorer = _scorer()
    stack = get_adapter(base).stacks[0].name
    starts = window_starts(variant, {stack: LAYERS}, "1/3")
    with record_layer_inputs(base, stack, starts) as tapes:
        base_sums = scorer.run(base)
    for start in starts:
        full = copy.deepcopy(base)
        _compress(store, variant, "1/3")(full, start)
        expected = scorer.metric(scorer.run(full))
        if start < get_adapter(full).num_layers(full, stack):  # a dropped last window leaves nothing to feed
            with start_at(full, stack, start, tapes[start]):
                replayed = scorer.metric(scorer.run(full))
            assert replayed == pytest.approx(expected, rel=1e-5)
        # the replay context put every layer back: the model scores as before
        assert scorer.metric(scorer.run(full)) == pytest.approx(expected, rel=1e-6)
    assert scorer.metric(scorer.run(base)) == pytest.approx(scorer.metric(base_sums), rel=1e-6)


def test_replay_restores_layers_config_and_layer_indices(tmp_path):
    base, _ = _setup("gemma3_text", tmp_path)  # has per-layer config lists (layer_types)
    adapter = get_adapter(base)
    layers = adapter.layers(base, "decoder")
    before = (
        list(layers),
        copy.deepcopy(base.config.to_dict()),
        [m.layer_idx for m in layers.modules() if hasattr(m, "layer_idx")],
    )
    scorer = _scorer()
    with record_layer_inputs(base, "decoder", [2]) as tapes:
        scorer.run(base)
    with start_at(base, "decoder", 2, tapes[2]):
        assert adapter.num_layers(base, "decoder") == LAYERS - 2
        scorer.run(base)
    layers = adapter.layers(base, "decoder")
    after = (list(layers), base.config.to_dict(), [m.layer_idx for m in layers.modules() if hasattr(m, "layer_idx")])
    assert after == before


def test_replay_refuses_states_recorded_with_other_batches(tmp_path):
    base, _ = _setup("llama", tmp_path)
    with record_layer_inputs(base, "decoder", [1]) as tapes:
        _scorer(batch_size=2).run(base)
    with start_at(base, "decoder", 1, tapes[1]), pytest.raises(RuntimeError, match="batches changed"):
        _scorer(batch_size=3).run(base)


@pytest.mark.parametrize("reuse", [True, False])
def test_search_scores_equal_one_full_pass_per_candidate(reuse, tmp_path):
    base, store = _setup("llama", tmp_path)
    scorer = _scorer()
    starts = window_starts("permute", {"decoder": LAYERS}, "1/2")
    results = search_windows(
        base,
        scorer,
        _compress(store, "permute", "1/2"),
        starts,
        higher_is_better=False,
        reuse=reuse,
        max_tapes=2,
        log=str,
    )
    for result in results:
        naive = copy.deepcopy(base)
        _compress(store, "permute", "1/2")(naive, result.start)
        assert result.batches == scorer.n_batches
        assert result.metric(scorer) == pytest.approx(scorer.metric(scorer.run(naive)), rel=1e-5)


def test_screening_finishes_only_the_leaders_and_their_scores_are_exact(tmp_path):
    base, store = _setup("llama", tmp_path)
    scorer = _scorer(batch_size=1)
    starts = window_starts("vanilla", {"decoder": LAYERS}, "1/3")
    compress = _compress(store, "vanilla", "1/3")
    results = search_windows(
        base, scorer, compress, starts, higher_is_better=False, screen_share=0.3, screen_keep=2, log=str
    )
    first = math.ceil(0.3 * scorer.n_batches)
    partial = {}
    for start in starts:
        model = copy.deepcopy(base)
        compress(model, start)
        partial[start] = scorer.metric(scorer.run(model, range(first)))
        if start in {r.start for r in results if r.batches == scorer.n_batches}:
            full = next(r for r in results if r.start == start)
            assert full.metric(scorer) == pytest.approx(scorer.metric(scorer.run(model)), rel=1e-5)
    leaders = sorted(starts, key=lambda s: (partial[s], s))[:2]
    finished = sorted(r.start for r in results if r.batches == scorer.n_batches)
    assert finished == sorted(leaders)
    for r in results:
        if r.start not in leaders:
            assert r.batches == first
            assert r.metric(scorer) == pytest.approx(partial[r.start], rel=1e-5)


@pytest.mark.parametrize("name", ["dinov2", "vit", "gemma3_text"])
def test_replay_context_leaves_every_config_field_as_it_was(name):
    # dropping rewrites more than the layer count for some families (DINOv2's backbone stage names)
    model, _ = build(name)
    stack = get_adapter(model).stacks[0].name
    before = copy.deepcopy(model.config.to_dict())
    with start_at(model, stack, 2, []):
        assert model.config.to_dict() != before
    assert model.config.to_dict() == before


def test_a_repairing_search_scores_each_candidate_as_the_compress_step_builds_it(tmp_path):
    """search.repair: every candidate is the repaired merge (scores equal a full pass over the repaired model, and
    differ from the plain merge's); the proxy's ranking and the plain search are unchanged without it."""
    from ffmerge.repair import RepairConfig

    base, store = _setup("llama", tmp_path)
    repair = RepairConfig(enabled=True, steps=5)
    scorer = _scorer()
    task = type("Task", (), {"higher_is_better": False, "metric": "ppl"})()
    search = {"mode": "in_process", "screen_share": 1.0, "screen_keep": 1, "max_tapes": 0}
    kwargs = {"reuse": True, "log_fn": str}
    rows, record = pipeline.search_model(task, base, scorer, store, "permute", "1/2", search, repair=repair, **kwargs)
    plain, plain_record = pipeline.search_model(task, base, scorer, store, "permute", "1/2", search, **kwargs)
    assert record["repair"]["steps"] == 5 and "repair" not in plain_record
    for row, plain_row in zip(rows, plain, strict=True):
        repaired = copy.deepcopy(base)
        pipeline.compress(repaired, "permute", "1/2", row["start"], store, repair=repair)
        assert row["valid"] == pytest.approx(scorer.metric(scorer.run(repaired)), rel=1e-5)
        assert row["valid"] != plain_row["valid"]  # without the repair the same replay gives the same bits


def test_search_repair_needs_the_repair_enabled_and_concerns_merges_only():
    cfg = {"seed": 0, "search": {"repair": True}, "repair": {"enabled": False}}
    with pytest.raises(ValueError, match="repair.enabled is false"):
        pipeline._search_repair(cfg, "permute")
    assert pipeline._search_repair(cfg, "ffdrop") is None
    assert pipeline._search_repair({"seed": 0, "repair": {"enabled": True}}, "permute") is None  # the default: off
    assert pipeline._search_repair({**cfg, "repair": {"enabled": True, "steps": 7}}, "vanilla").steps == 7
