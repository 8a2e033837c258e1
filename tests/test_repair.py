"""FF-sublayer deletion (the exact-budget control), local repair of merged blocks, and distillation recovery,
on tiny random models of every family."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from families import FAMILIES, build
from families import calibration_batches as _batches

from ffmerge.adapters import get_adapter, get_submodule
from ffmerge.align import plan_merge
from ffmerge.checkpoint import WEIGHTS, load_compressed, save_compressed
from ffmerge.features import cache_features
from ffmerge.ffdrop import delete_ff, deleted_ff
from ffmerge.finetune import FinetuneConfig, causal_lm_loss, causal_lm_outputs, distillation_loss, finetune, lm_batches
from ffmerge.merge import apply_plan
from ffmerge.repair import RepairConfig, capture_inputs, fold_scales, merge_and_repair, store_data
from ffmerge.size import size_report

NAMES = sorted(FAMILIES)
FOLDABLE = [n for n in NAMES if any(s.ff_norm or s.ff_scale for s in get_adapter(n).stacks)]


def _tensor_bytes(folder) -> int:
    path = folder / WEIGHTS
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return path.stat().st_size - 8 - header


def _randomize_norms_and_scales(model: torch.nn.Module) -> None:
    """Fresh models have norm weights of one and biases of zero, which would make folding trivially exact."""
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for spec in adapter.stacks:
            for layer in adapter.layers(model, spec.name):
                for path in (spec.ff_norm, spec.ff_scale):
                    if path:
                        for p in get_submodule(layer, path).parameters():
                            p.copy_(torch.rand(p.shape, generator=g) + 0.5)


# --------------------------------------------------------------------------------------------------------------
# ffdrop
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ffdrop_removes_exactly_what_the_matching_merge_removes_and_reloads(name, tmp_path):
    model, inputs = build(name)
    family = FAMILIES[name]
    adapter = get_adapter(model)
    store = cache_features(model, _batches(name, 40), tmp_path / "feat", n_tokens=120, progress=False)
    merged = copy.deepcopy(model)
    apply_plan(merged, plan_merge(store, {s.name: (1, 3) for s in adapter.stacks}, method="permute"))
    deleted = copy.deepcopy(model)
    delete_ff(deleted, {s.name: [2, 3] for s in adapter.stacks})  # a 3-layer merge removes 2 FF blocks

    assert deleted.num_parameters() == merged.num_parameters() < model.num_parameters()
    assert size_report(deleted).ff_blocks_removed == size_report(merged).ff_blocks_removed == 2 * len(adapter.stacks)
    assert deleted_ff(deleted) == {s.name: [2, 3] for s in adapter.stacks}

    # the deleted layers' FF contributes nothing: the same as zeroing their output projections' outputs
    reference = copy.deepcopy(model)
    hooks = [
        adapter.ff_modules(reference, s.name, j)["out"].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        for s in adapter.stacks
        for j in (2, 3)
    ]
    with torch.no_grad():
        expected = family.output(reference, inputs)
        got = family.output(deleted, inputs)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, family.output(model, inputs).detach(), atol=1e-4)

    save_compressed(merged, tmp_path / "merged")
    save_compressed(deleted, tmp_path / "deleted")
    assert _tensor_bytes(tmp_path / "deleted") == _tensor_bytes(tmp_path / "merged")
    loaded = load_compressed(tmp_path / "deleted")
    assert loaded.num_parameters() == deleted.num_parameters()
    assert deleted_ff(loaded) == deleted_ff(deleted)
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), got, rtol=0, atol=0)


def test_ffdrop_refuses_a_layer_outside_the_stack():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="has 5 layers"):
        delete_ff(model, {"decoder": [5]})


# --------------------------------------------------------------------------------------------------------------
# Running one block alone, folding
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ff_forward_reproduces_the_cached_outputs_from_the_cached_inputs(name, tmp_path):
    """The adapters name each family's activation right: the block run alone equals the block in the model."""
    model, _ = build(name)
    adapter = get_adapter(model)
    store = cache_features(model, _batches(name, 30), tmp_path / "f", n_tokens=40, dtype="float32", progress=False)
    for spec in adapter.stacks:
        for j in range(adapter.num_layers(model, spec.name)):
            with torch.no_grad():
                out = adapter.ff_forward(model, spec.name, j)(store.load(spec.name, "ff_in", j))
            torch.testing.assert_close(out, store.load(spec.name, "ff_out", j), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FOLDABLE)
def test_folding_norms_and_scales_preserves_the_function(name):
    model, inputs = build(name)
    family = FAMILIES[name]
    _randomize_norms_and_scales(model)
    with torch.no_grad():
        before = family.output(model, inputs)
    adapter = get_adapter(model)
    for spec in adapter.stacks:
        saved = fold_scales(model, spec.name, range(adapter.num_layers(model, spec.name)))
        assert all(saved[j] for j in saved)
        norm = get_submodule(adapter.layers(model, spec.name)[0], spec.ff_norm or spec.ff_scale)
        assert all(bool((p == 1).all() or (p == 0).all()) for p in norm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(family.output(model, inputs), before, rtol=1e-4, atol=1e-5)


def test_folding_is_refused_where_the_norm_feeds_more_than_the_ff():
    model, _ = build("marian")  # post-norm layers: nothing folds
    with pytest.raises(ValueError, match="nothing to fold"):
        fold_scales(model, "encoder", [0])


# --------------------------------------------------------------------------------------------------------------
# Repair
# --------------------------------------------------------------------------------------------------------------


def _identical_window(model: torch.nn.Module, stack: str, layers: list[int]) -> None:
    """Copy the first layer's FF block (and its norm and scale) into the others: a merge of them is exact."""
    adapter = get_adapter(model)
    spec = adapter.stack(stack)
    source = adapter.layers(model, stack)[layers[0]]
    with torch.no_grad():
        for j in layers[1:]:
            target = adapter.layers(model, stack)[j]
            for path in [*spec.ff_paths, spec.ff_norm, spec.ff_scale]:
                if path:
                    pairs = zip(
                        get_submodule(target, path).parameters(), get_submodule(source, path).parameters(), strict=True
                    )
                    for p, q in pairs:
                        p.copy_(q)


@pytest.mark.parametrize("name", ["llama", "gpt2", "dinov2", "whisper"])
@pytest.mark.parametrize("options", [dict(lstsq=True, steps=20), dict(fold=True, steps=20), dict(inputs="merged")])
def test_repair_leaves_an_exact_merge_unchanged(name, options, tmp_path):
    model, inputs = build(name)
    adapter = get_adapter(model)
    windows = {s.name: (1, 3) for s in adapter.stacks}
    for spec in adapter.stacks:
        _identical_window(model, spec.name, [1, 2, 3])
    store = cache_features(model, _batches(name, 40), tmp_path / "f", n_tokens=120, dtype="float32", progress=False)
    plan = plan_merge(store, windows, method="vanilla")
    plain = apply_plan(copy.deepcopy(model), plan)
    repaired = copy.deepcopy(model)
    cfg = RepairConfig(enabled=True, lr=1e-2, **options)
    report = merge_and_repair(repaired, plan, store, cfg, calibration=lambda: _batches(name, 40))
    for stats in report["stacks"].values():
        assert stats["error_merged"] <= cfg.tolerance
        assert stats["error_repaired"] == stats["error_merged"]
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(repaired, inputs), family.output(plain, inputs), rtol=1e-5, atol=1e-6)
    if not options.get("fold"):  # folding rewrites norms (function-preserving); otherwise every bit is the same
        for (k, p), (_, q) in zip(repaired.state_dict().items(), plain.state_dict().items(), strict=True):
            assert torch.equal(p, q), k


@pytest.mark.parametrize("name", ["llama", "gpt2", "dinov2", "whisper", "marian"])
@pytest.mark.parametrize("options", [dict(steps=40), dict(lstsq=True, steps=0), dict(inputs="merged", steps=40)])
def test_repair_lowers_the_local_error_and_touches_only_the_shared_block(name, options, tmp_path):
    model, _ = build(name)
    adapter = get_adapter(model)
    store = cache_features(model, _batches(name, 40), tmp_path / "f", n_tokens=120, dtype="float32", progress=False)
    plan = plan_merge(store, {s.name: (1, 3) for s in adapter.stacks}, method="permute")
    plain = apply_plan(copy.deepcopy(model), plan)
    repaired = copy.deepcopy(model)
    report = merge_and_repair(
        repaired, plan, store, RepairConfig(enabled=True, lr=3e-3, **options), calibration=lambda: _batches(name, 40)
    )
    assert repaired.num_parameters() == plain.num_parameters()
    for stack, stats in report["stacks"].items():
        assert stats["error_repaired"] < stats["error_merged"], (stack, stats)
        assert stats["layers"] == [1, 2, 3]
    shared = {
        id(p) for s in adapter.stacks for m in adapter.ff_modules(repaired, s.name, 1).values() for p in m.parameters()
    }
    names = {id(p): n for n, p in repaired.named_parameters()}
    changed = {
        n
        for (n, p), (_, q) in zip(repaired.named_parameters(), plain.named_parameters(), strict=True)
        if not torch.equal(p, q)
    }
    assert changed and changed <= {names[i] for i in shared}


def test_member_normalisation_fits_a_quiet_member_that_the_total_loss_neglects(tmp_path):
    """With one member's FF outputs 100 times smaller than the others', the summed-energy loss hardly sees it;
    normalising each member by its own energy fits it better (its own relative error is lower), at some cost to the
    loud members. Same data, seed and steps for both."""
    model, _ = build("llama")
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.ff_modules(model, "decoder", 2)["out"].weight.mul_(0.01)
    store = cache_features(model, _batches("llama", 40), tmp_path / "f", n_tokens=120, dtype="float32", progress=False)
    plan = plan_merge(store, {"decoder": (1, 3)}, method="permute")
    data = store_data(store, "decoder", [1, 2, 3])

    def own_errors(normalize: str) -> dict[int, float]:
        merged = copy.deepcopy(model)
        merge_and_repair(merged, plan, store, RepairConfig(enabled=True, steps=60, lr=1e-2, normalize=normalize))
        block = adapter.ff_forward(merged, "decoder", 1)
        with torch.no_grad():
            return {j: float((block(data.x[j]) - data.y[j]).pow(2).sum() / data.y[j].pow(2).sum()) for j in (1, 2, 3)}

    total, member = own_errors("total"), own_errors("member")
    assert member[2] < 0.5 * total[2]
    assert sum(member.values()) < sum(total.values())
    with pytest.raises(ValueError, match="normalize"):
        RepairConfig(normalize="layer")


def test_repair_reads_a_cache_without_ff_inputs_with_a_fix(tmp_path):
    model, _ = build("llama")
    store = cache_features(model, _batches("llama", 20), tmp_path / "f", n_tokens=40, kinds=("pre",), progress=False)
    plan = plan_merge(store, {"decoder": (1, 3)}, method="vanilla")
    with pytest.raises(ValueError, match="rerun the cache_features step"):
        merge_and_repair(model, plan, store, RepairConfig(enabled=True))


# --------------------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------------------


def _tiny_lm_finetune(tmp_path, loss_fn, steps: int = 4) -> dict[str, torch.Tensor]:
    """The weights after ``steps`` updates (from the resume state: the returned model holds the best ones)."""
    model, _ = build("llama")
    stream = torch.randint(3, 97, (400,), generator=torch.Generator().manual_seed(1))
    config = FinetuneConfig(lr=1e-3, max_steps=steps, batch_size=2, eval_every=steps, checkpoint_every=steps)
    batches = lm_batches(stream, seq_len=16, batch_size=2, seed=0)
    finetune(model, loss_fn=loss_fn, get_batch=batches, evaluate=lambda m: 0.0, config=config, work_dir=tmp_path)
    return torch.load(tmp_path / "last.pt", weights_only=True)["model"]


def test_distillation_with_weight_zero_is_plain_fine_tuning(tmp_path):
    teacher, _ = build("llama", seed=7)
    plain = _tiny_lm_finetune(tmp_path / "plain", causal_lm_loss)
    distilled = _tiny_lm_finetune(tmp_path / "kd", distillation_loss(causal_lm_outputs, teacher, weight=0.0))
    pulled = _tiny_lm_finetune(tmp_path / "kd1", distillation_loss(causal_lm_outputs, teacher, weight=0.5))
    assert all(torch.equal(plain[k], distilled[k]) for k in plain)
    assert not all(torch.equal(plain[k], pulled[k]) for k in plain)


def test_distillation_loss_is_the_kl_to_the_teacher():
    student, _ = build("llama", seed=0)
    teacher, _ = build("llama", seed=7)
    batch = {"input_ids": torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))}
    same = distillation_loss(causal_lm_outputs, copy.deepcopy(student), weight=1.0)
    assert float(same(student, batch)) == pytest.approx(0.0, abs=1e-6)  # KL of a model to itself
    loss = distillation_loss(causal_lm_outputs, teacher, weight=0.25, temperature=2.0)(student, batch)
    with torch.no_grad():
        task, s_logits, _ = causal_lm_outputs(student, batch)
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    p = torch.softmax(t_logits / 2, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s_logits / 2, -1))).sum(-1).mean()
    assert float(loss) == pytest.approx(float(0.75 * task + 0.25 * 4 * kl), rel=1e-5)
    with pytest.raises(ValueError, match="weight"):
        distillation_loss(causal_lm_outputs, teacher, weight=1.5)


@pytest.mark.parametrize("name", ["llama", "whisper", "dinov2"])
def test_inputs_captured_from_the_merged_model_are_the_layers_own(name, tmp_path):
    """Unmerged, the capture equals the cached FF inputs; merged, the window's first member of the first stack
    still sees exactly the original inputs (nothing before it changed) and a later member does not. (A decoder's
    first member already sees the merged encoder through cross-attention.)"""
    model, _ = build(name)
    adapter = get_adapter(model)
    store = cache_features(model, _batches(name, 30), tmp_path / "f", n_tokens=50, dtype="float32", progress=False)
    windows = {s.name: [1, 2, 3] for s in adapter.stacks}
    captured = capture_inputs(model, windows, _batches(name, 30), 50)
    for stack, layers in captured.items():
        for j, x in layers.items():
            torch.testing.assert_close(x, store.load(stack, "ff_in", j), rtol=1e-5, atol=1e-6)
    apply_plan(model, plan_merge(store, {s.name: (1, 3) for s in adapter.stacks}, method="permute"))
    first = adapter.stacks[0].name
    merged = capture_inputs(model, windows, _batches(name, 30), 50)[first]
    torch.testing.assert_close(merged[1], store.load(first, "ff_in", 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged[3], store.load(first, "ff_in", 3), atol=1e-3)


def test_resuming_with_another_distillation_recipe_is_refused(tmp_path):
    from ffmerge.finetune import CheckpointError

    teacher, _ = build("llama", seed=7)
    stream = torch.randint(3, 97, (400,), generator=torch.Generator().manual_seed(1))
    batches = lm_batches(stream, seq_len=16, batch_size=2, seed=0)
    config = FinetuneConfig(lr=1e-3, max_steps=2, batch_size=2, eval_every=2, checkpoint_every=2, distill_weight=0.5)
    loss = distillation_loss(causal_lm_outputs, teacher, weight=0.5)
    run = dict(get_batch=batches, evaluate=lambda m: 0.0, work_dir=tmp_path)
    finetune(build("llama")[0], loss_fn=loss, config=config, **run)
    longer = dataclasses.replace(config, max_steps=4, distill_weight=1.0)
    with pytest.raises(CheckpointError, match="distill_weight"):
        finetune(build("llama")[0], loss_fn=loss, config=longer, **run)
