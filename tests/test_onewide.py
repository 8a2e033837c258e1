"""One Wide FFN after training (:mod:`ffmerge.onewide`) on tiny random models: on encoder-decoders one shared
encoder FF and no decoder FF, with exactly those parameters removed and a checkpoint that reloads; on single-stack
models the all-but-one permute merge itself; built only at its own budget."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES
from records import base_record, eval_record

from ffmerge.adapters import get_adapter
from ffmerge.checkpoint import load_compressed, save_compressed
from ffmerge.experiments import compressed_models, search_of
from ffmerge.ffdrop import deleted_ff
from ffmerge.repair import RepairConfig
from ffmerge.size import size_report
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENCODER_DECODERS = ("marian", "whisper")


def _ff_params(model: torch.nn.Module, stack: str, layer: int) -> int:
    return sum(p.numel() for m in get_adapter(model).ff_modules(model, stack, layer).values() for p in m.parameters())


@pytest.mark.parametrize("name", ENCODER_DECODERS)
@pytest.mark.parametrize("repair", [False, True])
def test_one_shared_encoder_ff_and_no_decoder_ff(name, repair, family_stores, tmp_path):
    model, inputs, store = family_stores(name)
    adapter = get_adapter(model)
    n = {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}
    expected = model.num_parameters() - sum(_ff_params(model, "encoder", j) for j in range(1, n["encoder"]))
    expected -= sum(_ff_params(model, "decoder", j) for j in range(n["decoder"]))
    wide = copy.deepcopy(model)
    info = pipeline.compress(
        wide, "onewide", "all-but-one", 0, store, repair=RepairConfig(enabled=repair, steps=5), seed=0
    )
    # exactly the encoder's other FF blocks and every decoder FF block are gone, nothing else
    assert wide.num_parameters() == expected
    report = size_report(wide)
    assert report.ff_blocks_removed == n["encoder"] - 1 + n["decoder"] and report.ff_blocks == 1
    assert deleted_ff(wide) == {"decoder": list(range(n["decoder"]))}
    assert info["deleted_ff"] == {"decoder": list(range(n["decoder"]))}
    assert [s["stack"] for s in info["plan"]["stacks"]] == ["encoder"]
    assert (info.get("repair") is not None) == repair
    shared = adapter.ff_modules(wide, "encoder", 0)
    for j in range(n["encoder"]):
        assert all(adapter.ff_modules(wide, "encoder", j)[r] is m for r, m in shared.items())
    # attention and embeddings are the original's
    for key, value in model.state_dict().items():
        if "fc1" not in key and "fc2" not in key and "final_layer_norm" not in key:
            assert torch.equal(wide.state_dict()[key], value), key
    save_compressed(wide, tmp_path / "wide")
    loaded = load_compressed(tmp_path / "wide")
    assert loaded.num_parameters() == expected and deleted_ff(loaded) == deleted_ff(wide)
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(loaded, inputs), family.output(wide, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "dinov2"])
def test_on_a_single_stack_it_is_the_all_but_one_permute_merge(name, family_stores):
    model, _, store = family_stores(name)
    wide, merged = copy.deepcopy(model), copy.deepcopy(model)
    a = pipeline.compress(wide, "onewide", "all-but-one", 0, store)
    b = pipeline.compress(merged, "permute", "all-but-one", 0, store)
    assert a["plan"] == b["plan"] and a["deleted_ff"] == {}
    assert wide.num_parameters() == merged.num_parameters()
    for (k, p), (_, q) in zip(wide.state_dict().items(), merged.state_dict().items(), strict=True):
        assert torch.equal(p, q), k


def test_built_at_its_own_budget_only(family_stores):
    model, _, store = family_stores("whisper")
    with pytest.raises(ValueError, match="all-but-one"):
        pipeline.compress(copy.deepcopy(model), "onewide", "1/3", 0, store)
    grid = compressed_models(
        {"fractions": ["1/3", "1/2"], "methods": ["permute", "onewide"], "anchors": ["first"], "random_windows": 0}
    )
    assert ("onewide", "all-but-one", "best") in grid
    assert not any(v == "onewide" and f != "all-but-one" for v, f, _ in grid)
    assert search_of("onewide") == "permute"


def test_table9_and_figure3_show_onewide_at_its_own_parameter_reduction(family_stores):
    from ffmerge.report import figures
    from ffmerge.report.tables import results_table

    model, _, store = family_stores("whisper")
    wide, merged = copy.deepcopy(model), copy.deepcopy(model)
    built = {
        "onewide": (wide, pipeline.compress(wide, "onewide", "all-but-one", 0, store)),
        "permute": (merged, pipeline.compress(merged, "permute", "all-but-one", 0, store)),
    }
    records = [
        eval_record(m, variant, "all-but-one", test, test, metric="wer", windows=info["windows"])
        for test, (variant, (m, info)) in zip((50.0, 60.0), built.items(), strict=True)
    ]
    table = results_table(base_record(model, 20.0, 20.0, metric="wer"), records)
    rows = {r.variant: r for r in table.itertuples()}
    adapter = get_adapter(model)
    n_enc, n_dec = adapter.num_layers(model, "encoder"), adapter.num_layers(model, "decoder")
    assert rows["onewide"].ffs_removed == n_enc - 1 + n_dec == rows["permute"].ffs_removed + 1
    reduction = dict(zip(table["variant"], table["param_reduction_%"], strict=True))
    assert reduction["onewide"] > reduction["permute"] > 0
    _, notes = figures.combined_table({"asr": table}, "results")
    assert any(n.startswith("onewide = One Wide FFN") for n in notes)
    fig, _ = figures.params_removed_figure({"asr": table})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert list(lines["asr:onewide"].get_xdata()) == [0.0, reduction["onewide"]]
