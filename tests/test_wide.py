"""One Wide FFN's wide form (:mod:`ffmerge.wide`) on tiny random models: one block per stack shared by every layer,
as wide as the blocks the merge keeps, computing the mean of its merged parts, within the merge's parameters, and
a checkpoint that reloads bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES
from records import base_record, eval_record

from ffmerge.adapters import get_adapter, neuron_axis
from ffmerge.align import align_window
from ffmerge.checkpoint import load_compressed, save_compressed
from ffmerge.experiments import removed_count
from ffmerge.merge import ff_block_groups, merge_window
from ffmerge.repair import RepairConfig
from ffmerge.size import size_report
from ffmerge.wide import parts, wide_layout
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _width(module: torch.nn.Module) -> int:
    return module.weight.shape[neuron_axis(module, "out")]


def test_the_stack_is_cut_into_the_blocks_the_merge_keeps():
    assert parts(30, "1/3") == [(2 * k, 2) for k in range(10)] + [(20 + k, 1) for k in range(10)]
    for n, fraction in [(5, "1/3"), (4, "1/2"), (12, "1/2"), (7, "all-but-one")]:
        cut = parts(n, fraction)
        assert len(cut) == n - removed_count(n, fraction)
        assert [s for s, _ in cut] == [sum(size for _, size in cut[:k]) for k in range(len(cut))]
        assert sum(size for _, size in cut) == n and max(s for _, s in cut) - min(s for _, s in cut) <= 1


@pytest.mark.parametrize("name", ["llama", "gpt2", "whisper", "dinov2"])
def test_one_shared_block_as_wide_as_the_merge_keeps_computing_the_mean_of_its_parts(name, family_stores, tmp_path):
    model, inputs, store = family_stores(name)
    adapter = get_adapter(model)
    wide, merged, reference = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    info = pipeline.compress(wide, "wide", "1/3", 0, store)
    pipeline.compress(merged, "permute", "1/3", 0, store)
    expected = size_report(merged).parameters
    for spec in adapter.stacks:
        n = adapter.num_layers(model, spec.name)
        cut = info["wide"][spec.name]["parts"]
        assert cut == parts(n, "1/3")
        assert ff_block_groups(wide, spec.name) == [list(range(n))]  # every layer holds the one block
        d_ff = _width(adapter.ff_modules(model, spec.name, 0)["out"])
        assert _width(adapter.ff_modules(wide, spec.name, 0)["out"]) == len(cut) * d_ff
        out_bias = adapter.ff_modules(model, spec.name, 0)["out"].bias
        expected -= (len(cut) - 1) * (out_bias.numel() if out_bias is not None else 0)  # one output bias, not w
        # the wide block computes the mean of the parts' permute merges
        for start, size in cut:
            if size > 1:
                merge_window(adapter, reference, align_window(store, spec.name, start, size))
        x = store.load(spec.name, "ff_in", 0).float()[:16]
        with torch.no_grad():
            mean = torch.stack([adapter.ff_forward(reference, spec.name, s)(x) for s, _ in cut]).mean(0)
            torch.testing.assert_close(adapter.ff_forward(wide, spec.name, 3)(x), mean, rtol=1e-5, atol=1e-5)
    assert size_report(wide).parameters == expected <= size_report(merged).parameters
    save_compressed(wide, tmp_path / "wide")
    loaded = load_compressed(tmp_path / "wide")
    assert wide_layout(loaded) == wide_layout(wide) == {s: v["width"] for s, v in info["wide"].items()}
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), family.output(wide, inputs), rtol=0, atol=0)


def test_the_repair_refits_the_wide_block_to_every_layer(family_stores):
    model, _, store = family_stores("llama")
    wide = copy.deepcopy(model)
    info = pipeline.compress(wide, "wide", "1/3", 0, store, repair=RepairConfig(enabled=True, steps=30))
    stats = info["repair"]["stacks"]["decoder"]
    assert stats["layers"] == list(range(5))
    assert stats["error_repaired"] < 0.8 * stats["error_merged"]


def test_at_all_but_one_it_is_the_permute_merge_of_the_whole_stack(family_stores):
    model, _, store = family_stores("llama")
    wide, merged = copy.deepcopy(model), copy.deepcopy(model)
    pipeline.compress(wide, "wide", "all-but-one", 0, store)
    pipeline.compress(merged, "permute", "all-but-one", 0, store)
    for (k, p), (_, q) in zip(wide.state_dict().items(), merged.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=k)


def test_table9_and_figure3_show_the_wide_block(family_stores):
    from ffmerge.report import figures
    from ffmerge.report.tables import results_table

    model, _, store = family_stores("llama")
    wide = copy.deepcopy(model)
    info = pipeline.compress(wide, "wide", "1/3", 0, store)
    table = results_table(
        base_record(model, 20.0, 21.0), [eval_record(wide, "wide", "1/3", 25.0, 26.0) | {"wide": info["wide"]}]
    )
    (row,) = [r for r in table.itertuples() if r.variant == "wide"]
    assert row.layers == "all 5: one block of 3 parts, 144 neurons"
    _, notes = figures.combined_table({"lm": table}, "results")
    assert any(n.startswith("wide = One Wide FFN's wide form") for n in notes)
    fig, _ = figures.params_removed_figure({"lm": table})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert lines["lm:wide"].get_label() == "One Wide FFN, wide form (one shared wide FF)"
