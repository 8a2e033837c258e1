"""search.mode proxy: windows ranked from the feature cache, only the best few scored on validation."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from families import FAMILIES, LAYERS, VOCAB, build, calibration_batches
from snakemake.utils import validate

from ffmerge import proxy
from ffmerge.adapters import get_adapter, get_submodule
from ffmerge.experiments import window_starts
from ffmerge.features import cache_features
from ffmerge.metrics.perplexity import PerplexityScorer
from ffmerge.report import figures
from ffmerge.report import tables as report
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "config.schema.yaml"

TASK = SimpleNamespace(metric="ppl", higher_is_better=False)
IN_PROCESS = {"mode": "in_process", "reuse_states": True, "screen_share": 1.0, "screen_keep": 3, "max_tapes": 0}
METHODS = ["permute", "vanilla", "drop", "ffdrop"]


def _scorer() -> PerplexityScorer:
    ids = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    return PerplexityScorer(ids, window=24, stride=16, batch_size=2)


def _store(model, name, tmp_path, dtype="float16"):
    batches = calibration_batches(name, 30)
    return cache_features(model, batches, tmp_path / "feat", n_tokens=150, dtype=dtype, progress=False)


def _search(base, store, variant, fraction, search_cfg):
    rows, record = pipeline.search_model(TASK, base, _scorer(), store, variant, fraction, search_cfg, log_fn=str)
    return rows, record


def _selection(base, store, variant, fraction, search_cfg, tmp_path):
    rows, record = _search(base, store, variant, fraction, search_cfg)
    return pipeline._write_selection(rows, TASK, tmp_path / f"{variant}.json", {}, record)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, _ = build("llama")
    return model, _store(model, "llama", tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------------------------------------------
# The search: proxy with keep >= starts is the in-process search; with fewer, only the proxy's best are scored
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fraction", ["1/3", "1/2"])
def test_keeping_every_start_chooses_what_the_in_process_search_chooses(llama, method, fraction, tmp_path):
    base, store = llama
    starts = window_starts(method, {"decoder": LAYERS}, fraction)
    exhaustive = _selection(base, store, method, fraction, IN_PROCESS, tmp_path / "a")
    proxied = _selection(base, store, method, fraction, {**IN_PROCESS, "mode": "proxy", "proxy_keep": 9}, tmp_path)
    assert proxied["best_start"] == exhaustive["best_start"]
    assert proxied["windows"] == exhaustive["windows"]
    assert proxied["best_valid"] == exhaustive["best_valid"]
    assert proxied["scores"] == exhaustive["scores"]  # the same exact scores, every start scored in full
    assert proxied["evaluated"] == starts and list(proxied["proxy_scores"]) == [str(s) for s in starts]
    assert exhaustive["mode"] == "in_process" and "proxy_scores" not in exhaustive


def test_the_proxy_search_scores_only_its_best_ranked_starts_exactly(llama, tmp_path):
    base, store = llama
    fraction, method = "1/3", "vanilla"
    starts = window_starts(method, {"decoder": LAYERS}, fraction)
    assert len(starts) == 3
    record = _selection(base, store, method, fraction, {**IN_PROCESS, "mode": "proxy", "proxy_keep": 2}, tmp_path)
    exhaustive = _selection(base, store, method, fraction, IN_PROCESS, tmp_path / "a")
    proxies = {int(s): v for s, v in record["proxy_scores"].items()}
    expected = sorted(starts, key=lambda s: (proxies[s], s))[:2]
    assert record["mode"] == "proxy" and record["evaluated"] == sorted(expected)
    assert set(record["scores"]) == {str(s) for s in expected} and not record["screened"]
    for s in expected:  # exact: what the in-process search scores for the same start
        assert record["scores"][str(s)] == exhaustive["scores"][str(s)]
    best = min(expected, key=lambda s: (record["scores"][str(s)], s))
    assert record["best_start"] == best and record["best_valid"] == exhaustive["scores"][str(best)]
    assert record["proxy"]["keep"] == 2 and record["proxy"]["tokens"] == proxy.PROXY_TOKENS
    assert record["proxy"]["score"].startswith("local merge error")
    # the proxy ranks exactly what proxy_scores computes with the search's own candidate builder
    build = lambda model, start, plan: pipeline.compress(model, method, fraction, start, store, plan)  # noqa: E731
    assert proxy.proxy_scores(base, store, method, fraction, starts, build) == proxies
    # random windows are drawn from every start, as the in-process search's are
    assert pipeline.window_starts_of(record) == starts
    for i in range(2):
        assert pipeline.choose_start(record, f"random{i}", 0) == pipeline.choose_start(
            {**exhaustive, "best_start": record["best_start"]}, f"random{i}", 0
        )


def test_proxy_search_needs_the_feature_cache(llama):
    base, _ = llama
    with pytest.raises(ValueError, match="feature cache"):
        _search(base, None, "drop", "1/3", {**IN_PROCESS, "mode": "proxy", "proxy_keep": 1})


# ----------------------------------------------------------------------------------------------------------------
# Merge proxy: the local merge error of the search's own candidate
# ----------------------------------------------------------------------------------------------------------------


def _identical_ff_layers(model) -> None:
    """Every layer's FF block (every stack) a copy of its first layer's: merging them changes no output."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for spec in adapter.stacks:
            first = adapter.ff_modules(model, spec.name, 0)
            for j in range(1, adapter.num_layers(model, spec.name)):
                for role, module in adapter.ff_modules(model, spec.name, j).items():
                    for name, param in module.named_parameters():
                        param.copy_(getattr(first[role], name))


def _build(store, method, fraction):
    return lambda model, start, plan: pipeline.compress(model, method, fraction, start, store, plan)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_merge_proxy_of_identical_layers_is_zero_and_of_distinct_layers_is_not(name, tmp_path):
    model, _ = build(name)
    layers = pipeline.stack_layers(model)
    distinct = _store(model, name, tmp_path / "distinct", dtype="float32")
    for method in ("permute", "vanilla"):
        starts = window_starts(method, layers, "1/3")
        scores = proxy.proxy_scores(model, distinct, method, "1/3", starts, _build(distinct, method, "1/3"))
        assert all(v > 1e-3 for v in scores.values()), (method, scores)
    _identical_ff_layers(model)
    store = _store(model, name, tmp_path / "same", dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = 0
    for method in ("permute", "vanilla"):
        for fraction in ("1/3", "all-but-one"):
            starts = window_starts(method, layers, fraction)
            builder = _build(store, method, fraction)
            scores = proxy.proxy_scores(model, store, method, fraction, starts, builder)
            assert list(scores) == starts
            for start, score in scores.items():
                # permute averages identical blocks only where the alignment matched every neuron to itself (on
                # Gemma's first layer it does not: its inputs differ too much from the later layers')
                plan = builder(copy.deepcopy(model), start, None)["plan"]
                identity = all(p == sorted(p) for a in plan["stacks"] for p in a["perms"].values())
                assert (0 <= score < 1e-10) if identity else score > 1e-3, (method, fraction, start, score)
                exact += identity
    assert exact >= len(window_starts("vanilla", layers, "1/3")) + 1
    # the base model is left as it was (the candidates share its tensors)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_merge_proxy_is_the_relative_error_of_the_merged_candidate(llama):
    base, store = llama
    method, fraction, start = "permute", "1/2", 1
    candidate = copy.deepcopy(base)
    info = pipeline.compress(candidate, method, fraction, start, store)
    anchor = info["plan"]["stacks"][0]["anchor"]
    block = get_adapter(candidate).ff_forward(candidate, "decoder", anchor)
    err = energy = 0.0
    with torch.no_grad():
        for j in range(info["windows"]["decoder"][0], sum(info["windows"]["decoder"])):
            x, y = store.load("decoder", "ff_in", j).float(), store.load("decoder", "ff_out", j).float()
            err += float((block(x) - y).pow(2).sum())
            energy += float(y.pow(2).sum())
    build = _build(store, method, fraction)
    (score,) = proxy.proxy_scores(base, store, method, fraction, [start], build, tokens=0).values()
    assert score == pytest.approx(err / energy, rel=1e-5)
    # a subsample: the evenly spaced positions
    assert proxy.positions(150, 50).tolist() == list(range(0, 150, 3))
    assert proxy.positions(150, 0).tolist() == proxy.positions(150, 500).tolist() == list(range(150))


# ----------------------------------------------------------------------------------------------------------------
# Deletion proxies: removed outputs relative to the residual stream they land in
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "dinov2", "vit"])
@pytest.mark.parametrize("method", ["ffdrop", "drop"])
def test_deletion_proxy_is_the_removed_share_of_the_residual_stream(name, method, tmp_path):
    """In pre-norm families the rebuilt stream is the real one less the embeddings: each layer's share equals
    ||c_l||^2 / ||h_{l+1} - h_0||^2 from the model's hidden states (DINOv2: LayerScale applied)."""
    model, _ = build(name)
    adapter = get_adapter(model)
    stack = adapter.stacks[0].name
    if name == "dinov2":  # trained LayerScales are far from the init's 1: make them matter
        g = torch.Generator().manual_seed(0)
        for layer in adapter.layers(model, stack):
            for path in ("layer_scale1", "layer_scale2"):
                (_, param), *_ = get_submodule(layer, path).named_parameters(recurse=False)
                param.data = torch.rand(param.shape, generator=g) * 2
    store = _store(model, name, tmp_path, dtype="float32")
    keep = store.n_tokens[stack]
    hidden = []
    with torch.no_grad():
        taken = 0
        for batch in calibration_batches(name, 30):
            if taken >= keep:
                break
            mask = batch.pop("token_masks")[stack]
            mask = mask & (torch.cumsum(mask.flatten().long(), 0) <= keep - taken).view_as(mask)
            taken += int(mask.sum())
            out = adapter.base(model)(**batch, output_hidden_states=True).hidden_states
            hidden.append([h[mask] for h in out])
    hidden = [torch.cat([h[i] for h in hidden]).double() for i in range(len(hidden[0]))]
    shares = proxy._layer_shares(model, store, stack, method, tokens=0)
    for j in range(LAYERS - 1):  # the last hidden state has the final norm applied in some families
        stream = hidden[j + 1] - hidden[0]
        update = hidden[j + 1] - hidden[j]  # drop: the whole layer's update
        if method == "ffdrop":
            layer = adapter.layers(model, stack)[j]
            scale = get_submodule(layer, "layer_scale2").lambda1.detach().double() if name == "dinov2" else 1.0
            update = store.load(stack, "ff_out", j).double() * scale
        assert shares[j] == pytest.approx(float(update.pow(2).sum() / stream.pow(2).sum()), rel=1e-4), j
    starts = window_starts(method, {stack: LAYERS}, "1/3")
    scores = proxy.proxy_scores(model, store, method, "1/3", starts, None, tokens=0)
    size = LAYERS - len(starts) + 1
    assert scores == {s: pytest.approx(sum(shares[s : s + size])) for s in starts}


def test_deletion_proxy_sums_both_stacks_of_an_encoder_decoder(tmp_path):
    model, _ = build("whisper")
    store = _store(model, "whisper", tmp_path)
    layers = pipeline.stack_layers(model)
    starts = window_starts("ffdrop", layers, "1/2")
    scores = proxy.proxy_scores(model, store, "ffdrop", "1/2", starts, None)
    shares = {s: proxy._layer_shares(model, store, s, "ffdrop", proxy.PROXY_TOKENS) for s in layers}
    for start in starts:
        windows = {s: (start, layers[s] // 2) for s in layers}
        assert scores[start] == pytest.approx(sum(sum(shares[s][a : a + k]) for s, (a, k) in windows.items()))


def test_ranking_puts_nan_last_and_ties_on_the_earliest_start():
    assert proxy.rank({3: 0.5, 0: math.nan, 1: 0.5, 2: 0.1}) == [2, 1, 3, 0]


# ----------------------------------------------------------------------------------------------------------------
# The selection record as the report reads it
# ----------------------------------------------------------------------------------------------------------------

PROXY_SELECTION = {
    "variant": "permute",
    "fraction": "1/3",
    "best_start": 2,
    "windows": {"decoder": [2, 4]},
    "metric": "ppl",
    "best_valid": 40.0,
    "scores": {"1": 55.0, "2": 40.0},
    "screened": {},
    "mode": "proxy",
    "proxy": {"score": "local merge error", "tokens": 512, "keep": 2, "seconds": 0.5},
    "proxy_scores": {"0": 0.9, "1": 0.5, "2": 0.4, "3": 0.95},
    "evaluated": [1, 2],
}


def test_window_scores_keep_proxy_only_windows_without_a_validation_score():
    frame = report.window_scores([PROXY_SELECTION])
    assert frame["start"].tolist() == [0, 1, 2, 3]
    assert frame["share"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert frame["valid"].tolist()[1:3] == [55.0, 40.0] and frame["valid"].iloc[[0, 3]].isna().all()
    assert frame["selected"].tolist() == [False, False, True, False]


def test_figure10_draws_only_the_windows_scored_on_validation(tmp_path):
    path = tmp_path / "window_scores.csv"
    report.window_scores([PROXY_SELECTION]).to_csv(path, index=False)
    fig, notes = figures.window_scores_figure({"lm": figures.read_window_scores(path)}, {"lm": "1/3"})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert [float(v) for v in lines["lm:permute"].get_xdata()] == [1.0, 2.0]
    assert [float(v) for v in lines["lm:permute"].get_ydata()] == [55.0, 40.0]
    assert "lm:permute:screened" not in lines
    assert [float(v) for v in lines["lm:permute:chosen"].get_xdata()] == [2.0]
    assert any("2 of 4 permute windows were ranked by the proxy" in note for note in notes)


def test_table2_has_no_validation_mean_over_random_windows_the_proxy_never_scored():
    scores = report.window_scores([PROXY_SELECTION])
    results = pd.DataFrame(
        {
            "fraction": ["1/3"] * 3,
            "variant": ["permute"] * 3,
            "choice": ["best", "random0", "random1"],
            "layers": ["decoder 2-4", "decoder 1-3", "decoder 0-2"],
            "metric": ["ppl"] * 3,
            "test_before_ft": [50.0, 60.0, 70.0],
            "test": [30.0, 35.0, 40.0],
        }
    )
    frame, _ = figures.windows_table({"lm": results}, {"lm": scores}, {"lm": "1/3"})
    by_window = dict(zip(frame["window"], frame["valid_before_ft"], strict=True))
    assert by_window["best"] == 40.0 and by_window["random0"] == 55.0 and math.isnan(by_window["random1"])
    assert math.isnan(by_window["random mean (2)"])


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


def test_schema_accepts_proxy_mode_with_its_keep_and_fills_the_default():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["tasks"]["lm"]["search"] = {"mode": "proxy"}
    validated = copy.deepcopy(config)
    validate(validated, str(SCHEMA))
    assert validated["tasks"]["lm"]["search"]["mode"] == "proxy"
    assert validated["tasks"]["lm"]["search"]["proxy_keep"] == 3
    assert validated["tasks"]["vision"]["search"]["proxy_keep"] == 3  # filled for every mode, read by proxy only
    config["tasks"]["lm"]["search"] = {"mode": "proxy", "proxy_keep": 5}
    validated = copy.deepcopy(config)
    validate(validated, str(SCHEMA))
    assert validated["tasks"]["lm"]["search"]["proxy_keep"] == 5
    for bad in ({"mode": "proxy", "proxy_keep": 0}, {"mode": "proxy", "proxy_keep": 1.5}, {"mode": "proxies"}):
        config["tasks"]["lm"]["search"] = bad
        with pytest.raises(Exception, match="proxy"):
            validate(copy.deepcopy(config), str(SCHEMA))
