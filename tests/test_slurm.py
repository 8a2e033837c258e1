"""The SLURM workflow profile (profiles/slurm) and a reduced pipeline run through a real, single-node SLURM.

Without SLURM: the profile's resource names are ones snakemake-executor-plugin-slurm reads, every rule named in
it exists, GPU rules ask for a GPU and CPU rules do not, the rules themselves ask for no GPU, partition or
account, and the job counts in docs/slurm.md are the DAG's for the paper config.

With SLURM (``-m slurm``; root on Debian): slurm-wlm and munge are installed from Debian if missing, a
one-node cluster is started in a temporary folder (tests/slurm/cluster.py), and a tiny pipeline (random 4-layer
Llama, tests/slurm/tiny.py) runs twice, with ``--executor slurm`` and the profile, and locally; every job must
have gone through sbatch and the tables, selected windows and CKA matrices must equal the local run's.
In CI (``CI=true``) the SLURM test never skips: it fails if it cannot set SLURM up.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
LAPTOP_PROFILE = REPO / "profiles" / "laptop" / "config.yaml"
DOCS = REPO / "docs" / "slurm.md"
FAST_POLL = REPO / "tests" / "slurm" / "snakemake_fast_poll.py"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

GPU_RULES = {
    "cache_features",
    "fit_head",
    "candidate",
    "compress",
    "finetune",
    "finetune_base",
    "finetune_control",
    "finetune_random",
    "evaluate",
    "quantize_int8",
    "quantize_int8_base",
}
CPU_RULES = {"prepare_model", "prepare_data", "select_window", "cka", "tables"}
# what snakemake-executor-plugin-slurm 2.8 (and its job step 0.6) turn into sbatch / srun options
PLUGIN_RESOURCES = {
    "gpu",
    "gpu_model",
    "gres",
    "cpus_per_gpu",
    "cpus_per_task",
    "mem_mb",
    "mem_mb_per_cpu",
    "runtime",
    "slurm_partition",
    "slurm_account",
    "slurm_extra",
    "constraint",
    "qos",
    "nodes",
    "tasks",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def _rule_names() -> set[str]:
    names = set()
    for smk in [SNAKEFILE, *(REPO / "rules").glob("*.smk")]:
        text = smk.read_text()
        names |= set(re.findall(r"^(?:rule|checkpoint)\s+(\w+)\s*:", text, flags=re.M))
        names |= set(re.findall(r"^use rule \w+ as (\w+)", text, flags=re.M))
    return names


def _derived_rules() -> dict[str, str]:
    """``{rule: the rule it was made from}`` for every ``use rule A as B``, followed back to the first rule."""
    parents = {}
    for smk in [SNAKEFILE, *(REPO / "rules").glob("*.smk")]:
        parents |= {b: a for a, b in re.findall(r"^use rule (\w+) as (\w+)", smk.read_text(), flags=re.M)}
    roots = {}
    for rule in parents:
        root = rule
        while root in parents:
            root = parents[root]
        roots[rule] = root
    return roots


# --------------------------------------------------------------------------------------------------------------
# The profile, without SLURM
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [PROFILE, LAPTOP_PROFILE], ids=["slurm", "laptop"])
def test_rules_made_from_a_profiled_rule_get_its_settings(path):
    """A rule made with ``use rule finetune as finetune_control`` is a separate name to Snakemake: a profile that
    lists only ``finetune`` would send the control fine-tunes to SLURM with the default resources (no GPU)."""
    profile = yaml.safe_load(path.read_text())
    derived = _derived_rules()
    assert {"finetune_base", "finetune_control", "finetune_random"} <= set(derived)
    for section in ("set-resources", "set-threads"):
        settings = profile[section]
        for rule, root in derived.items():
            if root in settings:
                assert settings.get(rule) == settings[root], f"{path.parent.name} {section}: {rule} differs from {root}"


def test_profile_resources_are_the_plugins_and_cover_every_compute_rule():
    profile = _profile()
    resources, threads = profile["set-resources"], profile["set-threads"]
    assert profile["executor"] == "slurm"
    assert set(resources) == GPU_RULES | CPU_RULES
    assert set(resources) <= _rule_names(), "set-resources names a rule the workflow does not have"
    assert set(threads) == set(resources)
    for rule, res in resources.items():
        assert set(res) <= PLUGIN_RESOURCES, f"{rule}: {set(res) - PLUGIN_RESOURCES} is not a resource the plugin reads"
        assert res["mem_mb"] > 0 and res["runtime"] > 0, rule
        if rule in GPU_RULES:
            assert res["gpu"] == 1 and res["cpus_per_gpu"] == threads[rule], rule
        else:
            assert "gpu" not in res and "gpu_model" not in res and "cpus_per_gpu" not in res, rule
        # partition and account come from the command line or the profile's default-resources only
        assert not {"slurm_partition", "slurm_account"} & set(res), rule
    assert not {"slurm_partition", "slurm_account"} & set(profile.get("default-resources") or {})


def test_docs_resource_table_is_the_profiles():
    profile = _profile()
    rows = re.findall(r"^\| ([a-z0-9_, ]+) \| `([^`]+)` \| (\d+) \| (\d+) \| (\d+) \|$", DOCS.read_text(), flags=re.M)
    documented = {}
    for rules, sbatch, threads, mem_mb, runtime in rows:
        for rule in rules.split(", "):
            documented[rule] = (sbatch, int(threads), int(mem_mb), int(runtime))
    expected = {}
    for rule, res in profile["set-resources"].items():
        threads = profile["set-threads"][rule]
        sbatch = f"--gpus=1 --cpus-per-gpu={res['cpus_per_gpu']}" if "gpu" in res else f"--cpus-per-task={threads}"
        expected[rule] = (sbatch, threads, res["mem_mb"], res["runtime"])
    assert documented == expected


def test_plugin_reads_the_resource_names_the_profile_uses():
    """Guards against a plugin upgrade renaming them (2.8 reads all of these from job.resources)."""
    import snakemake_executor_plugin_slurm
    import snakemake_executor_plugin_slurm_jobstep

    sources = "".join(
        p.read_text()
        for module in (snakemake_executor_plugin_slurm, snakemake_executor_plugin_slurm_jobstep)
        for p in Path(module.__file__).parent.glob("*.py")
    )
    used = {key for res in _profile()["set-resources"].values() for key in res} | {"slurm_partition", "slurm_account"}
    for name in used | {"gpu_model"}:
        assert re.search(rf"resources\.get\(\s*[\"']{name}[\"']|resources\.{name}\b", sources), name


def test_rules_ask_for_no_gpu_partition_or_account():
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        for word in ("gpu", "slurm_partition", "slurm_account", "slurm_extra", "gres"):
            assert not re.search(rf"^\s+{word}\s*=", text, flags=re.M), f"{smk.name} sets {word}"


def _fake_paper_results(tmp: Path) -> Path:
    """The paper config with its prepared model replaced by a GPT-2 Large config.json (36 layers, no weights), so
    that the dry run can expand the per-window candidate jobs behind the prepare_model checkpoint offline."""
    from transformers import GPT2Config

    config = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    config["results_dir"] = str(tmp / "results")
    # docs/slurm.md counts the jobs of the GPT-2 Large task (the other paper tasks add the same grid each)
    config["tasks"] = {name: t for name, t in config["tasks"].items() if t["type"] == "causal_lm"}
    (task,) = config["tasks"]
    model_dir = tmp / "results" / task / "model" / "base"
    model_dir.mkdir(parents=True)
    GPT2Config(n_layer=36, n_embd=1280, n_head=20).save_pretrained(model_dir)
    path = tmp / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _job_counts(output: str) -> dict[str, int]:
    stats = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, flags=re.M)}


def _docs_counts() -> dict[str, int]:
    """The per-stage job table of docs/slurm.md: rows "| `rule` | count | ..."."""
    return {
        m.group(1): int(m.group(2)) for m in re.finditer(r"^\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|", DOCS.read_text(), re.M)
    }


def test_paper_dry_run_with_the_profile_matches_the_job_counts_in_the_docs(tmp_path):
    configfile = _fake_paper_results(tmp_path)
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "--configfile",
        str(configfile),
        "--workflow-profile",
        str(PROFILE.parent),
        "-d",
        str(tmp_path / "wd"),
        "-n",
        "--rerun-triggers",
        "mtime",  # the faked model folder has no Snakemake metadata
    ]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    counts = _job_counts(output)
    documented = _docs_counts()
    assert set(documented) == GPU_RULES | CPU_RULES, "docs/slurm.md: the job table lists other rules"
    assert documented.pop("prepare_model") == 1 and "prepare_model" not in counts  # done (faked) here
    assert {rule: counts.get(rule, 0) for rule in documented} == documented
    text = DOCS.read_text()
    total, on_gpu = sum(documented.values()) + 1, sum(documented[r] for r in GPU_RULES)
    assert f"That is {total} jobs" in text and f"{on_gpu} of them on a GPU" in text
    # the candidate table: window starts per method and fraction for 36 layers
    from ffmerge.experiments import window_starts

    for fraction in ("1/3", "1/2", "all-but-one"):
        row = re.search(rf"^\| {re.escape(fraction)} \(r = \d+\) \| (\d+) \| (\d+) \| (\d+) \|", text, re.M)
        expected = [len(window_starts(m, {"decoder": 36}, fraction)) for m in ("permute", "vanilla", "drop")]
        assert row and [int(x) for x in row.groups()] == expected, (fraction, expected)
    # the profile's requests reach the jobs: a candidate job shows the GPU and its memory
    candidate = output[output.index("rule candidate:") :][:1500]
    assert re.search(r"resources: .*\bgpu=1\b", candidate) and "cpus_per_gpu=4" in candidate, candidate


def test_laptop_profile_dry_run_of_the_default_config(tmp_path):
    profile = yaml.safe_load(LAPTOP_PROFILE.read_text())
    assert "executor" not in profile  # local
    limit = profile["resources"]["mem_mb"]
    assert all(res["mem_mb"] <= limit for res in profile["set-resources"].values())
    assert set(profile["set-resources"]) <= _rule_names()
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "--workflow-profile",
        str(LAPTOP_PROFILE.parent),
        "--config",
        f"results_dir={tmp_path / 'results'}",
        "-d",
        str(tmp_path / "wd"),
        "-n",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


# --------------------------------------------------------------------------------------------------------------
# A reduced pipeline through a real SLURM
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tests"))
    from slurm import cluster

    blocker = cluster.setup_blocker()
    if blocker:
        message = f"SLURM test cluster: {blocker}"
        if _in_ci():
            pytest.fail(message + " (CI=true: this test must not be skipped)", pytrace=False)
        pytest.skip(message)
    try:
        cluster.ensure_installed(print)
        instance = cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    except (cluster.SlurmSetupError, OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"could not set up SLURM: {err}", pytrace=False)
    try:
        instance.start()
    except BaseException as err:
        instance.stop()
        if isinstance(err, cluster.SlurmSetupError):
            pytest.fail(f"could not start SLURM: {err}", pytrace=False)
        raise
    yield instance
    instance.stop()


def _test_profile(tmp: Path) -> Path:
    """profiles/slurm scaled to the test node (2 CPUs, 2 fake GPUs): same rules, same kinds of request."""
    profile = copy.deepcopy(_profile())
    for res in profile["set-resources"].values():
        res["mem_mb"] = 600
        if "cpus_per_gpu" in res:
            res["cpus_per_gpu"] = 1
    profile["set-threads"] = dict.fromkeys(profile["set-threads"], 1)
    profile.pop("default-resources", None)  # the partition comes from the command line, as in docs/slurm.md
    profile.update(
        {
            "jobs": 8,
            "retries": 0,
            "keep-going": False,
            "latency-wait": 10,
            # no accounting database here: sacct answers "accounting storage is disabled"
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": 1,
            "slurm-keep-successful-logs": True,
        }
    )
    folder = tmp / "profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")
FINISHED = re.compile(r"Finished jobid: (\d+) \(Rule: (\w+)\)")


def _slurm_time(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def _scontrol_job(slurm_id: str, env: dict) -> dict[str, str]:
    run = subprocess.run(["scontrol", "-o", "show", "job", slurm_id], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return dict(re.findall(r"(\w+)=(\S*)", run.stdout))


def _same_table(local: Path, remote: Path) -> None:
    a, b = pd.read_csv(local), pd.read_csv(remote)
    assert list(a.columns) == list(b.columns) and a.shape == b.shape, (local.name, a, b)
    for column in a.columns:
        if pd.api.types.is_float_dtype(a[column]):
            pd.testing.assert_series_equal(a[column], b[column], rtol=1e-6, atol=1e-9, obj=f"{local.name}:{column}")
        else:
            pd.testing.assert_series_equal(a[column], b[column], obj=f"{local.name}:{column}")


DEVICE_PROBE = (
    "import os, torch; from ffmerge.device import DeviceError, grant_gpus, resolve_device\n"
    "granted = grant_gpus()\n"
    "try:\n    device = resolve_device('auto')\nexcept DeviceError as err:\n    device = 'refused:' + str(err)\n"
    "print('probe', os.environ.get('CUDA_VISIBLE_DEVICES', '-'), torch.cuda.is_available(), granted, device)"
)


@pytest.mark.slurm
def test_device_auto_follows_the_gpus_slurm_gives_a_job(slurm_cluster, tmp_path):
    """A job step as the plugin starts it (srun inside sbatch, --gpus=1 or not): SLURM sets CUDA_VISIBLE_DEVICES
    and its GPU variables only for the GPU job. `device: auto` is the CPU for the CPU job; the GPU job, whose
    torch cannot use the node's (fake) GPU, is refused with the reason instead of running on the CPU."""
    env = {key: value for key, value in slurm_cluster.env.items() if key != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    jobs = {}
    for name, flags in {"gpu": ["--gpus=1", "--cpus-per-gpu=1"], "cpu": ["--cpus-per-task=1"]}.items():
        out = tmp_path / f"{name}.out"
        step = f"srun -n1 {' '.join(flags)} {sys.executable} -c {shlex.quote(DEVICE_PROBE)}"
        command = ["sbatch", "--wait", "--mem=600", "-p", slurm_cluster.partition, *flags, "-o", str(out)]
        proc = subprocess.Popen([*command, "--wrap", step], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        jobs[name] = (proc, out)
    seen = {}
    for name, (proc, out) in jobs.items():
        sbatch_output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, sbatch_output + (out.read_text() if out.exists() else "")
        (line,) = [line for line in out.read_text().splitlines() if line.startswith("probe ")]
        _, visible, available, granted, device = line.split(" ", 4)
        if available == "True":  # a node with a usable GPU: auto takes it
            assert device == "cuda", line
        elif name == "gpu":
            assert granted == "1" and device.startswith("refused:this job was given 1 GPU(s) (SLURM_"), line
            assert "set device: cpu" in device, line
        else:
            assert granted == "0" and device == "cpu", line
        seen[name] = visible
    assert seen == {"gpu": "0", "cpu": "-"}


@pytest.mark.slurm
@pytest.mark.e2e
def test_reduced_pipeline_under_slurm_matches_a_local_run(slurm_cluster, tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from slurm.tiny import save_tiny_llama, tiny_config

    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    # the fake GPUs have no CUDA behind them: device auto would (rightly) refuse the GPU jobs, so the CPU on purpose
    device = "cpu"
    runs = {}
    for name in ("local", "slurm"):
        config = tiny_config(model_dir, tmp_path / name / "results", device=device)
        path = tmp_path / name / "config.yaml"
        path.parent.mkdir()
        path.write_text(yaml.safe_dump(config))
        results = tmp_path / name / "results" / "tiny"
        targets = [
            str(results / "tables" / "table9.csv"),
            str(results / "tables" / "window_scores.csv"),
            str(results / "cka" / "ff_out.csv"),
            str(results / "cka" / "attn_out.csv"),
        ]
        runs[name] = {"config": path, "results": results, "targets": targets, "wd": tmp_path / name / "wd"}

    env = {**slurm_cluster.env, **OFFLINE_ENV, "FFMERGE_TEST_SLURM_POLL_SECONDS": "1"}
    local = runs["local"]
    local_cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "--configfile",
        str(local["config"]),
        "--cores",
        "1",
        "-d",
        str(local["wd"]),
        *local["targets"],
    ]
    remote = runs["slurm"]
    slurm_cmd = [
        sys.executable,
        str(FAST_POLL),
        "-s",
        str(SNAKEFILE),
        "--configfile",
        str(remote["config"]),
        "--executor",
        "slurm",
        "--workflow-profile",
        str(_test_profile(tmp_path)),
        "--default-resources",
        f"slurm_partition={slurm_cluster.partition}",
        "-d",
        str(remote["wd"]),
        *remote["targets"],
    ]

    # both at once: the SLURM run spends much of its time waiting on the queue
    started = time.monotonic()
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in runs}
    procs = {
        "local": subprocess.Popen(local_cmd, stdout=logs["local"], stderr=subprocess.STDOUT, env=env),
        "slurm": subprocess.Popen(slurm_cmd, stdout=logs["slurm"], stderr=subprocess.STDOUT, env=env),
    }
    try:
        for name, proc in procs.items():
            proc.wait(timeout=900)
            runs[name]["seconds"] = time.monotonic() - started
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs (scancel) on SIGINT
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=60)
        for log in logs.values():
            log.close()
    outputs = {name: (tmp_path / f"{name}.log").read_text() for name in runs}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{outputs[name][-6000:]}\n{slurm_cluster.daemon_logs()}"
    print(f"wall time: local {runs['local']['seconds']:.0f} s, slurm {runs['slurm']['seconds']:.0f} s")

    # every job went through sbatch: one submission per finished job, none ran in the Snakemake process itself
    out = outputs["slurm"]
    submitted = {m.group(1): m.group(2) for m in SUBMITTED.finditer(out)}
    finished = {m.group(1): m.group(2) for m in FINISHED.finditer(out)}
    local_finished = sorted(m.group(2) for m in FINISHED.finditer(outputs["local"]))
    assert "localrule" not in out
    assert sorted(finished.values()) == local_finished, "the SLURM run ran other jobs than the local run"
    assert set(submitted) == set(finished), (
        f"jobs finished without an sbatch submission: {set(finished) - set(submitted)}"
    )
    assert len(set(submitted.values())) == len(submitted)
    rules = set(finished.values())
    assert {
        "prepare_model",
        "prepare_data",
        "cache_features",
        "candidate",
        "select_window",
        "compress",
        "finetune",
        "evaluate",
        "cka",
        "tables",
    } <= rules
    assert list(finished.values()).count("candidate") == 2

    # what SLURM itself says about each job (finished jobs stay in slurmctld for MinJobAge)
    profile = _profile()
    print("SLURM jobs:")
    for job, slurm_id in sorted(submitted.items(), key=lambda kv: int(kv[1])):
        info = _scontrol_job(slurm_id, env)
        rule = finished[job]
        print(
            f"  {slurm_id:>3} {info['JobState']:<10} {rule:<15} {info['TRES']} gpus={info.get('TresPerJob', '-')} "
            f"time={info['TimeLimit']}"
        )
        assert info["JobState"] == "COMPLETED", info
        assert info["Comment"].startswith(f"rule_{rule}_"), info["Comment"]
        assert info["Partition"] == slurm_cluster.partition
        assert "mem=600M" in info["TRES"] and "cpu=1," in info["TRES"], info["TRES"]
        assert info["TimeLimit"] == _slurm_time(profile["set-resources"][rule]["runtime"]), (rule, info["TimeLimit"])
        if rule in GPU_RULES:  # sbatch --gpus=1 --cpus-per-gpu=1
            assert info.get("TresPerJob") == "gres:gpu:1" and info.get("CpusPerTres") == "gres:gpu:1", (rule, info)
        else:
            assert "TresPerJob" not in info, (rule, info)

    # the two candidate jobs (independent windows) were both queued before either finished
    candidate_events = [(m.start(), "submit") for m in SUBMITTED.finditer(out) if finished[m.group(1)] == "candidate"]
    candidate_events += [(m.start(), "finish") for m in FINISHED.finditer(out) if m.group(2) == "candidate"]
    assert [kind for _, kind in sorted(candidate_events)][:2] == ["submit", "submit"]

    # same numbers as the local run (same seed, CPU)
    for name in ("table9.csv", "window_scores.csv"):
        _same_table(local["results"] / "tables" / name, remote["results"] / "tables" / name)
    for kind in ("ff_out", "attn_out"):
        a = pd.read_csv(local["results"] / "cka" / f"{kind}.csv", index_col=0)
        b = pd.read_csv(remote["results"] / "cka" / f"{kind}.csv", index_col=0)
        pd.testing.assert_frame_equal(a, b, rtol=1e-6, atol=1e-9)
    selections = sorted((local["results"] / "selection").rglob("*.json"))
    assert selections
    for path in selections:
        mine = json.loads(path.read_text())
        theirs = json.loads((remote["results"] / path.relative_to(local["results"])).read_text())
        assert mine["best_start"] == theirs["best_start"] and mine["windows"] == theirs["windows"]
        assert mine["scores"] == pytest.approx(theirs["scores"], rel=1e-6)
    table = pd.read_csv(remote["results"] / "tables" / "table9.csv")
    assert set(table["variant"]) == {"base", "permute"}
    finetuned = json.loads((remote["results"] / "eval" / "permute" / "1of2" / "best" / "post.json").read_text())
    assert finetuned["finetune"]["steps"] == 2
