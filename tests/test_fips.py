"""FiPS (:mod:`ffmerge.fips`) on tiny random models: exact reconstruction of a group that shares a basis, the
merge's budget never exceeded (index included), pruning to exactly the budgeted non-zeros, a compact checkpoint
that reloads bit for bit, a fit that beats one-shot pruning, and its rows in Table 9 and Figure 3."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import FAMILIES, build, calibration_batches
from records import base_record, eval_record
from safetensors.torch import load_file

from ffmerge.adapters import get_adapter
from ffmerge.checkpoint import WEIGHTS, load_compressed, save_compressed
from ffmerge.features import cache_features
from ffmerge.fips import (
    FactorLinear,
    FipsConfig,
    _weight_d_by_width,
    factorize_stack,
    fips_layout,
    gmp_keep,
    layer_groups,
    pack_bits,
    restore_fips,
    stack_budget,
    unpack_bits,
)
from ffmerge.size import size_report
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY_NAMES = ("llama", "gpt2", "whisper", "dinov2")


def _factors(model: torch.nn.Module) -> list[FactorLinear]:
    return [m for m in model.modules() if isinstance(m, FactorLinear)]


def _fips(model: torch.nn.Module, store, fraction: str, steps: int = 0) -> tuple[torch.nn.Module, dict]:
    compressed = copy.deepcopy(model)
    info = pipeline.compress(compressed, "fips", fraction, 0, store, fips=FipsConfig(steps=steps))
    return compressed, info


@torch.no_grad()
def _share_a_basis(model: torch.nn.Module, stack: str, groups: list[list[int]], rank: int, seed: int = 0) -> None:
    """Overwrite every FF matrix of each group with ``U0 B_i`` (``d x d_ff`` layout): one exact rank-``rank`` basis
    per group, dense coefficients."""
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    for group in groups:
        modules = [adapter.ff_modules(model, stack, j) for j in group]
        d = _weight_d_by_width(modules[0]["out"], "out").shape[0]
        basis = torch.randn(d, rank, generator=g) / math.sqrt(d)
        for block in modules:
            for role, module in block.items():
                side = "out" if role == "out" else "in"
                target = _weight_d_by_width(module, side)
                target.copy_(basis @ torch.randn(rank, target.shape[1], generator=g))


@pytest.mark.parametrize("name", ["llama", "gpt2", "whisper"])
@pytest.mark.parametrize("steps", [0, 5])
def test_a_group_that_shares_an_exact_basis_is_reconstructed_with_zero_error(name, steps, tmp_path):
    model, inputs = build(name)
    adapter = get_adapter(model)
    rank = 8  # below the width (32): the basis is a real truncation for any other weights
    groups = {s.name: layer_groups(adapter.num_layers(model, s.name), 2) for s in adapter.stacks}
    for stack, stack_groups in groups.items():
        _share_a_basis(model, stack, stack_groups, rank)
    store = cache_features(model, calibration_batches(name, 40), tmp_path, n_tokens=120, progress=False)
    factored = copy.deepcopy(model)
    for stack, stack_groups in groups.items():
        width = _weight_d_by_width(adapter.ff_modules(model, stack, 0)["out"], "out").shape[1]
        record = factorize_stack(factored, stack, stack_groups, rank, rank * width, store, FipsConfig(steps=steps))
        assert record["svd_truncation"] < 1e-12
        assert record["error_svd"] < 1e-6 and record["error_repaired"] < 1e-6  # float32 rounding
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(factored, inputs), family.output(model, inputs), rtol=1e-4, atol=1e-5)
    # the same truncation of weights without a shared basis loses most of their energy: the test can fail
    other, _ = build(name)
    stack = adapter.stacks[0].name
    width = _weight_d_by_width(adapter.ff_modules(other, stack, 0)["out"], "out").shape[1]
    record = factorize_stack(other, stack, groups[stack], rank, rank * width, None, FipsConfig(steps=0))
    assert record["svd_truncation"] > 0.3


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("fraction", ["1/3", "1/2", "all-but-one"])
def test_fips_stays_within_the_merges_budget_with_its_index_counted(name, fraction, family_stores):
    model, _, store = family_stores(name)
    merged = copy.deepcopy(model)
    pipeline.compress(merged, "permute", fraction, 0, store)
    fips, info = _fips(model, store, fraction)
    report, merge_report = size_report(fips), size_report(merged)
    factors = _factors(fips)
    assert report.index_bytes == sum(math.ceil(f.mask.numel() / 8) for f in factors) > 0
    # at most the merge's parameters, and not far below: a value per matrix lost to rounding, at most
    assert 0 <= merge_report.parameters - report.parameters <= len(factors)
    assert report.ff_blocks_removed == 0  # every layer keeps an FF block: FiPS shares within blocks, not whole ones
    adapter = get_adapter(model)
    for spec in adapter.stacks:
        stats = info["repair"]["stacks"][spec.name]
        assert stats["cost"] <= stats["budget"]
        for j in range(adapter.num_layers(fips, spec.name)):
            for module in adapter.ff_modules(fips, spec.name, j).values():
                assert isinstance(module, FactorLinear)
                assert int(module.mask.sum()) == stats["keep"]  # exactly the budgeted non-zeros
                assert not module.coeffs[~module.mask].any()
    # every group shares one basis, and groups do not share
    bases = {id(f.basis) for f in factors}
    assert len(bases) == sum(len(s["groups"]) for s in info["repair"]["stacks"].values())


def test_the_rank_is_lowered_where_a_full_width_basis_leaves_too_sparse_factors(family_stores):
    model, _, _ = family_stores("llama")
    wide = stack_budget(model, "decoder", "1/3", FipsConfig())
    tight = stack_budget(model, "decoder", "all-but-one", FipsConfig())
    assert wide.rank == 32 and wide.density(48) >= 0.1
    assert tight.rank < 32 and tight.density(48) >= 0.1 - 1 / (tight.rank * 48)
    with pytest.raises(ValueError, match="rank"):
        FipsConfig(rank=1.5)


def test_a_fit_beats_one_shot_pruning_of_the_svd_start(family_stores):
    model, _, store = family_stores("llama")
    _, shot = _fips(model, store, "1/2", steps=0)
    _, fitted = _fips(model, store, "1/2", steps=60)
    one, fit = shot["repair"]["stacks"]["decoder"], fitted["repair"]["stacks"]["decoder"]
    assert one["error_svd"] < 1e-6  # rank = width: the SVD start is exact (float32), pruning is the whole loss
    assert one["error_repaired"] == one["error_pruned"] > 0.05
    assert fit["error_repaired"] < 0.8 * one["error_repaired"]


def test_gradual_pruning_is_cubic_from_dense_to_the_budget():
    keeps = [gmp_keep(step, 100, 1000, 200) for step in range(0, 130, 10)]
    assert keeps[0] == 1000 and keeps[10:] == [200, 200, 200]
    assert all(a >= b for a, b in zip(keeps, keeps[1:], strict=False))
    assert keeps[5] == 200 + math.ceil(800 * 0.5**3)


def test_bitmasks_pack_eight_entries_a_byte():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(7 * 13 / 8)
    assert torch.equal(unpack_bits(bits, (7, 13)), mask)


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_the_checkpoint_stores_values_and_bitmasks_and_reloads_bit_for_bit(name, family_stores, tmp_path):
    model, inputs, store = family_stores(name)
    fips, _ = _fips(model, store, "1/3", steps=3)
    save_compressed(fips, tmp_path / "fips")
    stored = load_file(str(tmp_path / "fips" / WEIGHTS))
    factors = dict((n, m) for n, m in fips.named_modules() if isinstance(m, FactorLinear))
    for prefix, module in factors.items():
        assert stored[f"{prefix}.values"].numel() == int(module.mask.sum())
        assert f"{prefix}.coeffs" not in stored and f"{prefix}.mask" not in stored
    assert sum(1 for k in stored if k.endswith(".basis")) == len({id(f.basis) for f in factors.values()})
    loaded = load_compressed(tmp_path / "fips")
    assert fips_layout(loaded) == fips_layout(fips)
    assert size_report(loaded) == size_report(fips)
    on_disk = (tmp_path / "fips" / WEIGHTS).stat().st_size
    assert size_report(fips).bytes <= on_disk <= size_report(fips).bytes + 64 * 1024  # plus the safetensors header
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), family.output(fips, inputs), rtol=0, atol=0)
    # the fine-tune's resume path: a plain state dict onto a freshly factorised model restores masks and values
    fresh = restore_fips(copy.deepcopy(model), fips_layout(fips))
    fresh.load_state_dict(fips.state_dict(), strict=True)
    for a, b in zip(_factors(fresh), _factors(fips), strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.coeffs, b.coeffs)


def test_a_corrupt_value_count_is_refused(family_stores):
    model, _, store = family_stores("llama")
    fips, _ = _fips(model, store, "1/3")
    state = fips.state_dict()
    key = next(k for k in state if k.endswith(".values"))
    state[key] = state[key][:-1]
    with pytest.raises(RuntimeError, match="values but its mask sets"):
        restore_fips(copy.deepcopy(model), fips_layout(fips)).load_state_dict(state)


def test_fips_needs_the_feature_cache(family_stores):
    model, _, _ = family_stores("llama")
    with pytest.raises(ValueError, match="features"):
        pipeline.compress(copy.deepcopy(model), "fips", "1/3", 0, None)


def test_table9_and_figure3_show_fips_at_its_real_parameter_reduction(family_stores):
    from ffmerge.report import figures
    from ffmerge.report.tables import results_table

    model, _, store = family_stores("llama")
    merged = copy.deepcopy(model)
    plain = pipeline.compress(merged, "permute", "1/3", 0, store)
    fips, info = _fips(model, store, "1/3")
    records = [
        eval_record(merged, "permute", "1/3", 30.0, 31.0, windows=plain["windows"]),
        eval_record(fips, "fips", "1/3", 25.0, 26.0) | {"repair": info["repair"]},
    ]
    table = results_table(base_record(model, 20.0, 21.0), records)
    rows = {r.variant: r for r in table.itertuples()}
    stats = info["repair"]["stacks"]["decoder"]
    assert rows["fips"].layers == f"all 5 (groups of 2), rank {stats['rank']}, {100 * stats['density']:.1f} % of V kept"
    reduction = dict(zip(table["variant"], table["param_reduction_%"], strict=True))
    assert reduction["permute"] - 0.01 <= reduction["fips"] <= reduction["permute"] + 0.5
    assert rows["fips"].repair_error == f"{stats['error_repaired']:.3g}"
    _, notes = figures.combined_table({"lm": table}, "results")
    assert any(n.startswith("fips = FiPS") for n in notes)
    fig, _ = figures.params_removed_figure({"lm": table})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert list(lines["lm:fips"].get_xdata())[-1] == reduction["fips"]
    assert lines["lm:fips"].get_label() == "FiPS (shared bases, sparse factors)"
