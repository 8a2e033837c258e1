"""Tie + random initialisation (the reviewer's control, :mod:`ffmerge.tie_random`) on tiny random models of every
family: the merge's structure and size exactly, a freshly initialised shared block that is the family's own init for
the task seed, nothing else touched; through the pipeline's compress step; and in the report (Table 9, Figure 3)."""

from __future__ import annotations

import copy
import json
import os.path

import pytest
import torch
from families import FAMILIES, build
from families import calibration_batches as _batches
from records import base_record, eval_record

from ffmerge.adapters import get_adapter, get_submodule
from ffmerge.align import plan_merge
from ffmerge.checkpoint import WEIGHTS, load_compressed, read_meta, save_compressed, tie_map
from ffmerge.features import cache_features
from ffmerge.merge import apply_plan, ff_block_groups
from ffmerge.repair import RepairConfig
from ffmerge.report import figures
from ffmerge.report import tables as report
from ffmerge.size import size_report
from ffmerge.tie_random import HF_INITIALIZED, tie_random
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = sorted(FAMILIES)
SEED = 7
START, SIZE = 1, 3  # the window: layers 1-3 of every stack (5 layers; Marian's and Whisper's decoders have 4)


def _windows(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {s.name: (START, SIZE) for s in get_adapter(model).stacks}


def _tensor_bytes(folder) -> int:
    path = folder / WEIGHTS
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


def _block(model: torch.nn.Module, stack: str, layer: int) -> dict[str, torch.Tensor]:
    """One FF block's parameters by ``role.name``, e.g. ``{"gate.weight": ..., "out.bias": ...}``."""
    modules = get_adapter(model).ff_modules(model, stack, layer)
    return {f"{role}.{n}": p.detach() for role, m in modules.items() for n, p in m.named_parameters()}


def _window_ff_keys(tied: torch.nn.Module) -> set[str]:
    """State-dict keys of the window's FF modules in a tied model: the shared modules under every member's name."""
    adapter = get_adapter(tied)
    shared = {id(m) for s in adapter.stacks for m in adapter.ff_modules(tied, s.name, START).values()}
    return {
        f"{name}.{n}"
        for name, module in tied.named_modules(remove_duplicate=False)
        if id(module) in shared
        for n, _ in module.named_parameters()
    }


def _reference_init(model: torch.nn.Module, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """What the family's own ``_init_weights`` gives the window's first FF block of each stack for ``seed``, on copies:
    the block's modules one by one and then their FF container (GPT-2 rescales its output projection there), as
    transformers visits them (children before parents; stacks in the model's order, one random stream)."""
    adapter = get_adapter(model)
    torch.manual_seed(seed)
    blocks = {}
    for spec in adapter.stacks:
        layer = copy.deepcopy(adapter.layers(model, spec.name)[START])
        for p in layer.parameters():
            if hasattr(p, HF_INITIALIZED):
                delattr(p, HF_INITIALIZED)
        with torch.no_grad():
            for path in spec.ff_paths:
                model._init_weights(get_submodule(layer, path))
            container = os.path.commonprefix([p.split(".") for p in spec.ff_paths])
            if container:  # e.g. GPT-2's "mlp", Llama's "mlp"; BERT's and Whisper's FF modules sit in the layer itself
                model._init_weights(get_submodule(layer, ".".join(container)))
        modules = {role: get_submodule(layer, path) for (role, path) in spec.ff_in}
        modules["out"] = get_submodule(layer, spec.ff_out)
        blocks[spec.name] = {f"{role}.{n}": p.detach() for role, m in modules.items() for n, p in m.named_parameters()}
    return blocks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per family: the original, its permute merge of the window, and two tie_random builds (same seed)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, inputs = build(name)
            store = cache_features(
                model, _batches(name, 40), tmp_path_factory.mktemp(f"feat-{name}"), n_tokens=120, progress=False
            )
            merged = apply_plan(copy.deepcopy(model), plan_merge(store, _windows(model), method="permute"))
            tied = tie_random(copy.deepcopy(model), _windows(model), SEED)
            again = tie_random(copy.deepcopy(model), _windows(model), SEED)
            cache[name] = model, inputs, merged, tied, again
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_tie_random_removes_exactly_what_the_merge_removes(name, built, tmp_path):
    model, _, merged, tied, _ = built(name)
    adapter = get_adapter(model)
    assert tied.num_parameters() == merged.num_parameters() < model.num_parameters()
    assert size_report(tied) == size_report(merged)  # parameters, FF blocks removed, bytes (float and int8)
    assert size_report(tied).ff_blocks_removed == (SIZE - 1) * len(adapter.stacks)
    assert tie_map(tied) == tie_map(merged)
    for spec in adapter.stacks:
        assert ff_block_groups(tied, spec.name) == ff_block_groups(merged, spec.name)
    save_compressed(merged, tmp_path / "merged")
    save_compressed(tied, tmp_path / "tied")
    assert _tensor_bytes(tmp_path / "tied") == _tensor_bytes(tmp_path / "merged")


@pytest.mark.parametrize("name", NAMES)
def test_the_tied_block_is_one_object_and_survives_save_and_load(name, built, tmp_path):
    _, inputs, _, tied, _ = built(name)
    family = FAMILIES[name]
    adapter = get_adapter(tied)
    for spec in adapter.stacks:
        first = adapter.ff_modules(tied, spec.name, START)
        for j in range(START + 1, START + SIZE):
            for role, module in adapter.ff_modules(tied, spec.name, j).items():
                assert module is first[role], (spec.name, j, role)
        outside = adapter.ff_modules(tied, spec.name, START - 1)
        assert all(outside[role] is not first[role] for role in first)
    save_compressed(tied, tmp_path / "tied")
    loaded = load_compressed(tmp_path / "tied")
    assert loaded.num_parameters() == tied.num_parameters() and tie_map(loaded) == tie_map(tied)
    for spec in adapter.stacks:
        first = adapter.ff_modules(loaded, spec.name, START)
        assert all(adapter.ff_modules(loaded, spec.name, START + SIZE - 1)[r] is m for r, m in first.items())
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), family.output(tied, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_the_shared_block_is_the_familys_init_for_the_seed_and_new(name, built):
    model, _, merged, tied, again = built(name)
    reference = _reference_init(model, SEED)
    for spec in get_adapter(model).stacks:
        shared = _block(tied, spec.name, START)
        assert shared.keys() == reference[spec.name].keys()
        for key, value in shared.items():
            assert torch.equal(value, reference[spec.name][key]), (spec.name, key)
            if key.endswith("weight"):  # fresh models' biases are zeros, as the init's: only weights can differ
                for j in range(START, START + SIZE):
                    assert not torch.allclose(value, _block(model, spec.name, j)[key]), (spec.name, j, key)
                assert not torch.allclose(value, _block(merged, spec.name, START)[key]), (spec.name, key)
    # deterministic: a second build is bit for bit the same
    for (k, p), (_, q) in zip(tied.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), k
    other = tie_random(copy.deepcopy(model), _windows(model), SEED + 1)
    spec = get_adapter(model).stacks[0]
    assert not torch.equal(_block(other, spec.name, START)["out.weight"], _block(tied, spec.name, START)["out.weight"])


@pytest.mark.parametrize("name", NAMES)
def test_nothing_outside_the_shared_block_changes(name, built):
    model, inputs, _, tied, _ = built(name)
    family = FAMILIES[name]
    window = _window_ff_keys(tied)
    original = model.state_dict()
    after = tied.state_dict()
    assert after.keys() == original.keys()
    assert window and all(torch.equal(after[k], original[k]) for k in original if k not in window)
    # the global random stream is left where it was, and the original model untouched (tie_random got a copy)
    state = torch.random.get_rng_state()
    tie_random(copy.deepcopy(model), _windows(model), SEED)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        assert not torch.allclose(family.output(tied, inputs), family.output(model, inputs), atol=1e-5)


def test_a_model_loaded_with_from_pretrained_is_initialised_too(built, tmp_path):
    """from_pretrained flags every loaded parameter as initialised, which makes transformers' init functions skip
    it: calling _init_weights on its modules would silently change nothing. The flags are put back afterwards."""
    from transformers import LlamaForCausalLM

    model, inputs, _, tied, _ = built("llama")
    model.save_pretrained(tmp_path / "plain")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "plain").eval()
    flags = {n: getattr(p, HF_INITIALIZED, None) for n, p in loaded.named_parameters()}
    assert set(flags.values()) == {True}
    tie_random(loaded, _windows(loaded), SEED)
    for (k, p), (_, q) in zip(loaded.state_dict().items(), tied.state_dict().items(), strict=True):
        assert torch.equal(p, q), k
    assert {n: getattr(p, HF_INITIALIZED, None) for n, p in loaded.named_parameters()} == {
        n: f for n, f in flags.items() if n in dict(loaded.named_parameters())
    }
    assert not any(hasattr(m, HF_INITIALIZED) and not getattr(m, HF_INITIALIZED) for m in loaded.modules())


@pytest.mark.parametrize("windows", [{"decoder": (3, 3)}, {"decoder": (2, 1)}, {"decoder": (-1, 2)}])
def test_tie_random_refuses_a_window_that_does_not_fit(windows):
    model, _ = build("llama")
    with pytest.raises(ValueError, match="at least 2 of the stack's 5 layers"):
        tie_random(model, windows, SEED)


# --------------------------------------------------------------------------------------------------------------
# The pipeline's compress step
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_compress_ties_the_window_at_random_without_features_or_repair(name, built):
    model, _, _, tied, _ = built(name)
    layers = pipeline.stack_layers(model)
    start = START
    fraction = "1/2" if name == "llama" else "1/3"  # llama 5 layers: 1/2 removes 2 (window of 3); whisper 5/4: 2 and 1
    repair = RepairConfig(enabled=True)  # ignored: repair would refit the block to the members
    got = copy.deepcopy(model)
    info = pipeline.compress(got, "tie_random", fraction, start, None, repair=repair, seed=SEED)
    assert info == {
        "windows": pipeline.windows_at("permute", layers, fraction, start),
        "plan": None,
        "repair": None,
    }
    expected = tie_random(copy.deepcopy(model), info["windows"], SEED)
    for (k, p), (_, q) in zip(got.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(p, q), k
    if name == "llama":  # the fixture's window is this one
        assert info["windows"] == _windows(model)
        assert all(torch.equal(p, q) for p, q in zip(got.parameters(), tied.parameters(), strict=True))


def test_build_compressed_saves_the_permute_window_tied_at_random(built, tmp_path):
    model, inputs, _, tied, _ = built("llama")
    model.save_pretrained(tmp_path / "base")
    selection = {"variant": "permute", "fraction": "1/2", "best_start": START, "scores": {"0": 9.0, "1": 8.0}}
    (tmp_path / "selection.json").write_text(json.dumps(selection))
    cfg = {"type": "causal_lm", "seed": SEED, "repair": {"enabled": True}}
    extra = pipeline.build_compressed(
        cfg, tmp_path / "base", None, tmp_path / "selection.json", "tie_random", "best", tmp_path / "out"
    )
    assert extra["variant"] == "tie_random" and extra["start"] == START
    assert extra["windows"] == _windows(model) and extra["plan"] is None and extra["repair"] is None
    meta = read_meta(tmp_path / "out")
    assert meta["extra"]["repair"] is None and meta["ties"] == tie_map(tied)
    loaded = load_compressed(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tied(**inputs).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Reporting: Table 9 and Figure 3 at the real parameter reduction; no window search expected of it
# --------------------------------------------------------------------------------------------------------------


def _record(model: torch.nn.Module, variant: str, test: float) -> dict:
    """An evaluation file's fields as pipeline writes them (post.json with pre.json's repair and test)."""
    record = eval_record(model, variant, "1/2", test, test + 10, windows=_windows(model))
    return record | {"finetune": {"budget": {"unit": "tokens", "per_step": 128, "total": 256}}}


def test_table9_and_figure3_show_tie_random_at_the_merges_parameter_reduction(built):
    model, _, merged, tied, _ = built("llama")
    base = base_record(model, 20.0, 21.0)
    table = report.results_table(base, [_record(merged, "permute", 30.0), _record(tied, "tie_random", 40.0)])
    rows = {r.variant: r for r in table.itertuples()}
    reduction = dict(zip(table["variant"], table["param_reduction_%"], strict=True))
    assert reduction["tie_random"] == reduction["permute"] > 0
    assert rows["tie_random"].ffs_removed == rows["permute"].ffs_removed == SIZE - 1
    assert rows["tie_random"].layers == rows["permute"].layers == f"{START}-{START + SIZE - 1}"
    assert rows["tie_random"].repair_error == ""

    combined, notes = figures.combined_table({"lm": table}, "results")
    assert "tie_random" in set(combined["variant"])
    assert [n for n in notes if n.startswith("tie_random = tie + random init")] == notes and len(notes) == 1
    _, no_notes = figures.combined_table({"lm": table[table["variant"] != "tie_random"]}, "results")
    assert no_notes == []

    fig, notes = figures.params_removed_figure({"lm": table})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert lines["lm:tie_random"].get_label() == "tie + random init"
    assert list(lines["lm:tie_random"].get_xdata()) == list(lines["lm:permute"].get_xdata())
    assert lines["lm:tie_random"].get_color() != lines["lm:permute"].get_color()
    assert not any("tie_random" in n for n in notes)  # drop and ffdrop are missing here, and noted
    fig, notes = figures.params_removed_figure({"lm": table[table["variant"] != "tie_random"]})
    assert not any("tie_random" in n for n in notes)  # not in the default grid: its absence is not noted


def test_no_window_search_is_expected_of_tie_random(built):
    """Figure 10 and Table 2 read the permute search; a tie_random model adds no line, row or note to them."""
    model, _, merged, tied, _ = built("llama")
    base = base_record(model, 20.0, 21.0)
    table = report.results_table(base, [_record(merged, "permute", 30.0), _record(tied, "tie_random", 40.0)])
    selection = {
        "variant": "permute",
        "fraction": "1/2",
        "best_start": START,
        "scores": {"0": 9.0, "1": 8.0},
        "metric": "ppl",
    }
    scores = report.window_scores([selection])
    fig, notes = figures.window_scores_figure({"lm": scores}, {"lm": "1/2"})
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    assert gids == {"lm:permute", "lm:permute:chosen"} and not any("tie_random" in n for n in notes)
    windows, notes = figures.windows_table({"lm": table}, {"lm": scores}, {"lm": "1/2"})
    assert windows["window"].tolist() == ["best"] and not any("tie_random" in n for n in notes)
