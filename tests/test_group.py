"""Merging a similarity group of FF sublayers (:mod:`ffmerge.group`) on tiny random models: the greedy choice, a
non-adjacent group tied exactly and surviving save and load, the window merge's exact budget, and an exact rebuild
from the recorded plan."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from families import FAMILIES
from records import base_record, eval_record

from ffmerge.adapters import get_adapter
from ffmerge.align import MergePlan, align_group
from ffmerge.checkpoint import load_compressed, save_compressed, tie_map
from ffmerge.cka import cka_matrix
from ffmerge.experiments import window_size
from ffmerge.group import disjoint_groups, group_sizes, similar_group, similar_groups
from ffmerge.merge import apply_plan, ff_block_groups
from ffmerge.repair import RepairConfig
from ffmerge.report.tables import groups_text
from ffmerge.workflow import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_group_grows_from_the_most_similar_pair():
    # layers 1, 3 and 4 are alike (0.9 among them); 0 is closer to 1 (0.5) than 2 is to anyone (0.1)
    s = np.full((5, 5), 0.1)
    for a, b in ((1, 3), (1, 4), (3, 4)):
        s[a, b] = s[b, a] = 0.9
    s[0, 1] = s[1, 0] = 0.5
    s[1, 3] = s[3, 1] = 0.95
    np.fill_diagonal(s, 1.0)
    assert similar_group(s, 2) == [1, 3]
    assert similar_group(s, 3) == [1, 3, 4]
    assert similar_group(s, 4) == [0, 1, 3, 4]
    s[0, 2] = s[2, 0] = np.nan  # an undefined similarity (a dead layer) never attracts a member
    assert similar_group(s, 4) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="does not fit"):
        similar_group(s, 6)


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_a_non_adjacent_group_ties_exactly_its_members_and_survives_save_and_load(name, family_stores, tmp_path):
    model, inputs, store = family_stores(name)
    adapter = get_adapter(model)
    members = [0, 2, 3]
    plan = MergePlan(
        method="permute",
        feature=store.manifest["feature"],
        stacks=[align_group(store, s.name, members, anchor="first") for s in adapter.stacks],
    )
    assert all(a.layers == members and a.anchor == 0 and sorted(a.perms) == [2, 3] for a in plan.stacks)
    merged = apply_plan(copy.deepcopy(model), plan)
    n = {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}
    for stack, count in n.items():
        assert ff_block_groups(merged, stack) == [[0, 2, 3], [1], *[[j] for j in range(4, count)]]
    removed = sum(
        p.numel() for s in n for j in (2, 3) for m in adapter.ff_modules(model, s, j).values() for p in m.parameters()
    )
    assert merged.num_parameters() == model.num_parameters() - removed
    assert MergePlan.from_dict(plan.to_dict()).stacks == plan.stacks  # members survive the JSON form
    save_compressed(merged, tmp_path / "group")
    loaded = load_compressed(tmp_path / "group")
    assert tie_map(loaded) == tie_map(merged) and loaded.num_parameters() == merged.num_parameters()
    with torch.no_grad():
        family = FAMILIES[name]
        torch.testing.assert_close(family.output(loaded, inputs), family.output(merged, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_the_group_method_removes_what_the_window_merge_removes_and_rebuilds_exactly(name, family_stores):
    model, _, store = family_stores(name)
    adapter = get_adapter(model)
    layers = {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}
    repair = RepairConfig(enabled=True, steps=3)
    grouped, window = copy.deepcopy(model), copy.deepcopy(model)
    info = pipeline.compress(grouped, "group", "1/2", 0, store, repair=repair)
    pipeline.compress(window, "permute", "1/2", 0, store, repair=repair)
    assert grouped.num_parameters() == window.num_parameters() < model.num_parameters()
    assert info["windows"] is None and info["groups"] == similar_groups(store, layers, "1/2")
    for stack, (members,) in info["groups"].items():
        assert len(members) == window_size("permute", layers[stack], "1/2")
        matrix, _ = cka_matrix(store, "ff_out", stacks=[stack])
        assert members == similar_group(matrix, len(members))
        tied = [g for g in ff_block_groups(grouped, stack) if len(g) > 1]
        assert tied == [members]
    assert set(info["repair"]["stacks"]) == set(layers)
    rebuilt = copy.deepcopy(model)
    again = pipeline.compress(rebuilt, "group", "1/2", 0, store, plan=info["plan"], repair=repair)
    assert again["groups"] == info["groups"]
    for (k, p), (_, q) in zip(rebuilt.state_dict().items(), grouped.state_dict().items(), strict=True):
        assert torch.equal(p, q), k


def test_table_9_prints_the_members():
    assert groups_text({"decoder": [[3, 7, 9, 10, 11, 12]]}) == "3, 7, 9-12"
    assert groups_text({"encoder": [[0, 2]], "decoder": [[1, 2]]}) == "encoder 0, 2; decoder 1-2"
    assert groups_text({"decoder": [[1, 2, 3], [8, 10]]}) == "1-3 / 8, 10"
    assert groups_text({"decoder": [3, 7, 9, 10, 11, 12]}) == "3, 7, 9-12"  # a file from before several groups


def test_several_groups_share_the_budget_and_are_grown_from_the_free_layers():
    assert group_sizes(30, "1/3", 1) == [11] and group_sizes(30, "1/3", 3) == [5, 4, 4]
    assert group_sizes(5, "1/3", 3) == [2, 2]  # 1/3 of 5 removes 2 blocks: 2 groups of one removal each
    with pytest.raises(ValueError, match="group.count"):
        group_sizes(5, "1/3", 0)
    s = np.eye(6)
    s[0, 1] = s[1, 0] = 0.9  # the most similar pair
    s[2, 4] = s[4, 2] = 0.8  # the most similar pair once 0 and 1 are taken
    s[0, 2] = s[2, 0] = 0.85  # would join 0 and 1 if the first group grew to three
    assert disjoint_groups(s, [2, 2]) == [[0, 1], [2, 4]]


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_two_groups_tie_exactly_their_members_at_the_window_merges_budget(name, family_stores, tmp_path):
    model, inputs, store = family_stores(name)
    adapter = get_adapter(model)
    layers = {s.name: adapter.num_layers(model, s.name) for s in adapter.stacks}
    grouped, window = copy.deepcopy(model), copy.deepcopy(model)
    repair = RepairConfig(enabled=True, steps=3)
    info = pipeline.compress(grouped, "group", "1/2", 0, store, repair=repair, group_count=2)
    pipeline.compress(window, "permute", "1/2", 0, store)
    assert grouped.num_parameters() == window.num_parameters()
    assert info["groups"] == similar_groups(store, layers, "1/2", 2)
    for stack, groups in info["groups"].items():
        assert len(groups) == 2 and not set(groups[0]) & set(groups[1])
        assert sorted(g for g in ff_block_groups(grouped, stack) if len(g) > 1) == groups
        assert {k for k in info["repair"]["stacks"] if k.startswith(stack)} == {f"{stack}#1", f"{stack}#2"}
    save_compressed(grouped, tmp_path / "groups")
    loaded = load_compressed(tmp_path / "groups")
    with torch.no_grad():
        family = FAMILIES[name]
        torch.testing.assert_close(family.output(loaded, inputs), family.output(grouped, inputs), rtol=0, atol=0)


def test_table9_and_figure3_show_the_group_at_the_window_merges_parameter_reduction(family_stores):
    from ffmerge.report import figures
    from ffmerge.report.tables import results_table

    model, _, store = family_stores("llama")
    grouped, window = copy.deepcopy(model), copy.deepcopy(model)
    info = pipeline.compress(grouped, "group", "1/2", 0, store)
    plain = pipeline.compress(window, "permute", "1/2", 0, store)

    records = [
        eval_record(window, "permute", "1/2", 30.0, 31.0, windows=plain["windows"]),
        eval_record(grouped, "group", "1/2", 40.0, 41.0, groups=info["groups"]),
    ]
    table = results_table(base_record(model, 20.0, 21.0), records)
    rows = {r.variant: r for r in table.itertuples()}
    reduction = dict(zip(table["variant"], table["param_reduction_%"], strict=True))
    assert reduction["group"] == reduction["permute"] > 0
    assert rows["group"].ffs_removed == rows["permute"].ffs_removed
    assert rows["group"].layers == groups_text(info["groups"])
    _, notes = figures.combined_table({"lm": table}, "results")
    assert any(n.startswith("group = the permute merge") for n in notes)
    fig, _ = figures.params_removed_figure({"lm": table})
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert list(lines["lm:group"].get_xdata()) == list(lines["lm:permute"].get_xdata())
    assert lines["lm:group"].get_label() == "merge of a similar group (not adjacent)"
