"""The method's core on a tiny random model of every supported family."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build
from families import calibration_batches as _batches
from safetensors import safe_open

from ffmerge.adapters import UnsupportedModelError, get_adapter, neuron_axis
from ffmerge.align import (
    MergePlan,
    StackAlignment,
    align_window,
    anchor_layer,
    load_pairs,
    plan_merge,
    save_pairs,
    solve_pairs,
)
from ffmerge.checkpoint import WEIGHTS, load_compressed, save_compressed
from ffmerge.features import FeatureStore, cache_features
from ffmerge.merge import apply_plan, ff_block_groups, permute_ff
from ffmerge.size import size_report

NAMES = sorted(FAMILIES)


def _data_bytes(folder) -> int:
    """Tensor bytes of a safetensors file, without its JSON header (which also shrinks, by less)."""
    path = folder / WEIGHTS
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


def _ff_params(adapter, model, stack: str) -> int:
    return sum(p.numel() for m in adapter.ff_modules(model, stack, 0).values() for p in m.parameters())


def test_unsupported_model_type_lists_supported_and_says_how_to_add():
    with pytest.raises(UnsupportedModelError, match=r"no adapter for model_type 'mamba'.*gpt2.*llama.*adapters/"):
        get_adapter("mamba")


@pytest.mark.parametrize("name", NAMES)
def test_permuting_neurons_leaves_outputs_unchanged(name):
    model, inputs = build(name)
    family = FAMILIES[name]
    adapter = get_adapter(model)
    with torch.no_grad():
        before = family.output(model, inputs)
        for spec in adapter.stacks:
            n = adapter.ff_modules(model, spec.name, 1)["out"].weight.shape[
                neuron_axis(adapter.ff_modules(model, spec.name, 1)["out"], "out")
            ]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
            assert perm != list(range(n))
            permute_ff(adapter, model, spec.name, 1, perm)
        after = family.output(model, inputs)
    assert (after - before).abs().max().item() <= 1e-5


def _plant_copy(model, adapter, stack: str, src: int, dst: int, perm: list[int]):
    """Make layer ``dst``'s FF a permuted copy of layer ``src``'s and feed it ``src``'s FF input.

    With identical inputs, dst's neuron ``n`` is src's neuron ``perm[n]``, so a correct alignment must place
    dst's neuron ``argsort(perm)[i]`` at anchor position ``i``.
    """
    with torch.no_grad():
        src_modules = adapter.ff_modules(model, stack, src)
        for role, module in adapter.ff_modules(model, stack, dst).items():
            source = src_modules[role]
            axis = neuron_axis(source, "out" if role == "out" else "in")
            module.weight.copy_(source.weight.index_select(axis, torch.tensor(perm)))
            if module.bias is not None:
                module.bias.copy_(source.bias if role == "out" else source.bias[perm])
    captured = {}
    in_roles = [r for r in src_modules if r != "out"]
    src_modules[in_roles[0]].register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    for role in in_roles:
        adapter.ff_modules(model, stack, dst)[role].register_forward_pre_hook(lambda m, args: (captured["x"],))


@pytest.mark.parametrize("name", NAMES)
def test_planted_permutation_is_recovered_and_merge_restores_the_source_layer(name, tmp_path):
    model, _ = build(name)
    adapter = get_adapter(model)
    stack = adapter.stacks[-1].name
    out_module = adapter.ff_modules(model, stack, 1)["out"]
    n = out_module.weight.shape[neuron_axis(out_module, "out")]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11)).tolist()
    _plant_copy(model, adapter, stack, src=1, dst=2, perm=perm)
    original = {role: m.weight.detach().clone() for role, m in adapter.ff_modules(model, stack, 1).items()}
    store = cache_features(model, _batches(name, 40), tmp_path / "feat", n_tokens=200, progress=False)
    alignment = align_window(store, stack, 1, 2, anchor="first", method="permute")
    assert alignment.perms == {2: torch.argsort(torch.tensor(perm)).tolist()}
    apply_plan(model, MergePlan("permute", store.manifest["feature"], [alignment]))
    for j in (1, 2):
        for role, module in adapter.ff_modules(model, stack, j).items():
            torch.testing.assert_close(module.weight, original[role], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["permute", "vanilla"])
def test_merge_ties_counts_trains_saves_and_loads(name, method, tmp_path):
    model, inputs = build(name)
    family = FAMILIES[name]
    adapter = get_adapter(model)
    save_compressed(model, tmp_path / "orig")
    before = model.num_parameters()
    store = cache_features(model, _batches(name, 40), tmp_path / "feat", n_tokens=150, progress=False)
    windows = {spec.name: (1, 3) for spec in adapter.stacks}
    plan = plan_merge(store, windows, anchor="middle", method=method)
    assert all(s.anchor == 2 for s in plan.stacks)
    assert all(bool(s.perms) == (method == "permute") for s in plan.stacks)
    apply_plan(model, plan)

    expected = sum(2 * _ff_params(adapter, model, spec.name) for spec in adapter.stacks)
    assert before - model.num_parameters() == expected
    report = size_report(model)
    assert report.ff_blocks_removed == 2 * len(adapter.stacks)
    for spec in adapter.stacks:
        assert ff_block_groups(model, spec.name)[1] == [1, 2, 3]

    # one optimizer step moves the tied layers together, and they stay one object
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    family.output(model, inputs).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    stack = adapter.stacks[0].name
    mods = [adapter.ff_modules(model, stack, j) for j in (1, 2, 3)]
    assert all(m[r] is mods[0][r] for m in mods for r in m)

    with torch.no_grad():
        expected_out = family.output(model, inputs)
    save_compressed(model, tmp_path / "merged", extra={"plan": "test"})
    loaded = load_compressed(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), expected_out, rtol=0, atol=0)
    assert loaded.num_parameters() == model.num_parameters()
    for spec in adapter.stacks:
        assert ff_block_groups(loaded, spec.name) == ff_block_groups(model, spec.name)
    bytes_per_param = 4
    assert _data_bytes(tmp_path / "orig") - _data_bytes(tmp_path / "merged") == expected * bytes_per_param


def test_plain_from_pretrained_refuses_a_compressed_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = build("llama")
    save_compressed(model, tmp_path / "m")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_plan_round_trips_through_json(tmp_path):
    plan = MergePlan("permute", "product", [StackAlignment("decoder", 3, 4, 4, {3: [1, 0], 5: [0, 1]})])
    plan.save(tmp_path / "plan.json")
    assert MergePlan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize(("anchor", "expected"), [("first", 3), ("middle", 5), ("last", 8)])
def test_anchor_position(anchor, expected):
    assert anchor_layer(3, 6, anchor) == expected


@pytest.mark.parametrize("name", ["llama", "bert", "whisper"])
def test_feature_cache_counts_exact_tokens_and_is_reproducible(name, tmp_path):
    model, _ = build(name)
    n = 37  # not a multiple of any batch: the budget ends inside a batch
    a = cache_features(model, _batches(name, 30, seed=1), tmp_path / "a", n_tokens=n, progress=False)
    b = cache_features(model, _batches(name, 30, seed=1), tmp_path / "b", n_tokens=n, progress=False)
    for stack, layers in a.manifest["num_layers"].items():
        for kind in ("pre", "ff_out", "attn_out"):
            for i in range(layers):
                assert a.load(stack, kind, i).shape == b.load(stack, kind, i).shape
                assert a.load(stack, kind, i).shape[0] == n
                assert a.path(stack, kind, i).read_bytes() == b.path(stack, kind, i).read_bytes()
    first_stack = next(iter(a.manifest["num_layers"]))
    with safe_open(str(a.path(first_stack, "pre", 0)), "pt") as f:
        assert f.metadata()["kind"] == "pre"


def test_feature_cache_skips_padding(tmp_path):
    model, _ = build("llama")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "token_masks": {"decoder": mask.bool()}}
    store = cache_features(model, [batch], tmp_path / "f", n_tokens=6, kinds=("ff_out",), progress=False)
    adapter = get_adapter(model)
    captured = []
    handle = adapter.ff_modules(model, "decoder", 0)["out"].register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    real = captured[0][mask.bool()]
    torch.testing.assert_close(store.load("decoder", "ff_out", 0).float(), real.half().float())


def test_feature_cache_reports_too_little_data_and_leaves_nothing(tmp_path):
    model, _ = build("llama")
    with pytest.raises(ValueError, match="ran out after"):
        cache_features(model, _batches("llama", 1), tmp_path / "f", n_tokens=10_000, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor any temporary folder is left behind
    with pytest.raises(FileNotFoundError, match="rerun the cache_features step"):
        FeatureStore.open(tmp_path / "f")


def test_gated_feature_modes_hook_the_right_tensors(tmp_path):
    model, inputs = build("llama")
    adapter = get_adapter(model)
    mods = adapter.ff_modules(model, "decoder", 0)
    mask = inputs["attention_mask"].bool()
    batch = {**inputs, "token_masks": {"decoder": mask}}
    n = int(mask.sum())
    with torch.no_grad():
        x = {}
        mods["gate"].register_forward_pre_hook(lambda m, a: x.__setitem__("x", a[0]))
        model(**inputs)
        h = x["x"][mask]
        expected = {"gate": mods["gate"](h), "up": mods["up"](h)}
        expected["product"] = model.model.layers[0].mlp.act_fn(expected["gate"]) * expected["up"]
    for mode, want in expected.items():
        store = cache_features(
            model, [batch], tmp_path / mode, n_tokens=n, feature=mode, kinds=("pre",), dtype="float32", progress=False
        )
        torch.testing.assert_close(store.load("decoder", "pre", 0), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="choose one of"):
        adapter.resolve_feature("bogus")


def test_cross_correlation_matches_numpy_corrcoef():
    import numpy as np

    from ffmerge.align import cross_correlation

    g = torch.Generator().manual_seed(0)
    a = (torch.randn(500, 7, generator=g) * 3 + 100).half().float()  # offset: centre before the product
    b = torch.randn(500, 5, generator=g) + a[:, :5] * 0.5
    b[:, 4] = 2.0  # a dead neuron: correlation 0, not NaN
    with np.errstate(invalid="ignore", divide="ignore"):  # numpy gives NaN for the dead neuron; we must not
        expected = np.corrcoef(a.double().numpy().T, b.double().numpy().T)[:7, 7:]
    got = cross_correlation(a, b).numpy()
    np.testing.assert_allclose(got[:, :4], expected[:, :4], atol=1e-5)
    assert np.all(got[:, 4] == 0)


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].generates])
def test_generation_config_survives_save_load_save(name, tmp_path):
    # Whisper decodes only with its own generation config (prompt and timestamp tokens); a compressed
    # checkpoint is saved, loaded for fine-tuning and saved again, and must keep it every time
    model, _ = build(name)
    model.generation_config.max_length = 77
    model.generation_config.repetition_penalty = 1.25
    save_compressed(model, tmp_path / "first")
    again = load_compressed(tmp_path / "first")
    save_compressed(again, tmp_path / "second")
    reloaded = load_compressed(tmp_path / "second")
    assert reloaded.generation_config.max_length == 77
    assert reloaded.generation_config.repetition_penalty == 1.25


@pytest.mark.parametrize("name", NAMES)
def test_pairs_solved_once_give_the_plans_aligned_window_by_window(name, tmp_path):
    # rule align solves each (anchor, layer) pair once and the searches and compress jobs read them: the plan
    # must be exactly the one each window would have aligned itself
    model, _ = build(name)
    stacks = [spec.name for spec in get_adapter(model).stacks]
    store = cache_features(model, _batches(name, 40), tmp_path / "feat", n_tokens=150, progress=False)
    windows = [{s: (start, size) for s in stacks} for start, size in [(0, 3), (1, 3), (0, 4), (1, 2)]]
    pairs = {(s, start, j) for w in windows for s, (start, size) in w.items() for j in range(start + 1, start + size)}
    save_pairs(tmp_path / "pairs.safetensors", solve_pairs(store, pairs), store)
    solved = load_pairs(tmp_path / "pairs.safetensors", store)
    assert set(solved) == pairs
    for w in windows:
        assert plan_merge(store, w, solved=solved) == plan_merge(store, w)
    # a pair missing from the table (middle anchor) is solved in place, the same as without a table
    middle = plan_merge(store, windows[2], anchor="middle", solved=solved)
    assert middle == plan_merge(store, windows[2], anchor="middle")
    # and a table entry is really used: a planted one shows up in the plan
    stack = stacks[0]
    fake = list(reversed(solved[(stack, 0, 1)]))
    planted = plan_merge(store, windows[0], solved={**solved, (stack, 0, 1): fake})
    assert planted.stacks[0].perms[1] == fake


def test_pairs_solved_from_other_features_are_refused(tmp_path):
    model, _ = build("llama")
    store = cache_features(model, _batches("llama", 40), tmp_path / "a", n_tokens=150, progress=False)
    other = cache_features(model, _batches("llama", 40), tmp_path / "b", n_tokens=120, progress=False)
    save_pairs(tmp_path / "pairs.safetensors", solve_pairs(store, {("decoder", 0, 1)}), store)
    with pytest.raises(ValueError, match="other features.*rerun the align step"):
        load_pairs(tmp_path / "pairs.safetensors", other)
    (tmp_path / "pairs.safetensors").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="cannot read solved alignments.*rerun the align step"):
        load_pairs(tmp_path / "pairs.safetensors", store)


@pytest.mark.parametrize("name", NAMES)
def test_load_compressed_rebuilds_every_tensor_buffer_and_tie(name, tmp_path):
    # load_compressed skips weight initialisation; nothing it skips may survive into the loaded model
    model, _ = build(name)
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    for kind in ("named_parameters", "named_buffers"):  # buffers include non-persistent ones (rotary tables)
        ours = dict(getattr(model, kind)(remove_duplicate=False))
        theirs = dict(getattr(loaded, kind)(remove_duplicate=False))
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key
    params = dict(model.named_parameters(remove_duplicate=False))
    shared = {n for n, p in params.items() for m, q in params.items() if p is q and n != m}
    loaded_params = dict(loaded.named_parameters(remove_duplicate=False))
    for n in shared:  # tied embeddings stay one object
        assert any(loaded_params[n] is loaded_params[m] for m in shared if m != n), n
