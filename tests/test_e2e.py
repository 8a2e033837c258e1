"""A reduced run of the real offline default (SmolLM2 + Wikipedia leads) through Snakemake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ffmerge.checkpoint import load_model
from ffmerge.workflow.forkserver import usage_path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def _reduced_config(results: Path) -> dict:
    """The default config with tiny budgets; the grid keeps every kind of job (merge, drop, anchor, random)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["results_dir"] = str(results)
    config["device"] = "cpu"
    task = config["tasks"]["lm"]
    task["splits"] = {"calib": 512, "valid": 256, "test": 300, "train": 4096}
    task["features"] = {"tokens": 512, "batch_size": 4, "seq_len": 128}
    task["selection"] = {"window": 128, "stride": 128, "batch_size": 2}
    task["evaluation"] = {"window": 256, "stride": 128, "batch_size": 2}
    # 28 of 30 layers: 2 merge windows and 3 drop windows, so the random-window control has a window to pick
    task["experiments"] = {"fractions": ["14/15"], "anchors": ["first", "last"], "random_windows": 1}
    task["finetune"] = {"max_steps": 4, "batch_size": 2, "seq_len": 64, "eval_every": 2, "checkpoint_every": 2}
    # the vision (DINOv2 + linear head on Fashion-MNIST) and speech (Whisper on espeak-ng) tasks, at 1/3 only
    vision = config["tasks"]["vision"]
    vision["splits"] = {"calib": 40, "valid": 40, "test": 60, "train": 300}
    vision["features"] = {"tokens": 512, "batch_size": 16}
    vision["probe"] = {"batch_size": 64, "max_iter": 30}
    vision["experiments"] = {"fractions": ["1/3"], "anchors": ["first", "last"], "random_windows": 1}
    vision["finetune"] = {"max_steps": 2, "batch_size": 8, "eval_every": 1, "checkpoint_every": 1}
    asr = config["tasks"]["asr"]
    asr["splits"] = {"calib": 6, "valid": 3, "test": 4, "train": 8}
    asr["features"] = {"tokens": 64, "batch_size": 4}
    asr["selection"] = asr["evaluation"] = {"batch_size": 4, "max_new_tokens": 24}
    asr["experiments"] = {"fractions": ["1/3"], "anchors": ["first", "last"], "random_windows": 1}
    asr["finetune"] = {"max_steps": 2, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1}
    for block in (task, vision, asr):  # the default's repair and distillation, at a fraction of the cost
        block["repair"] = {**block.get("repair", {}), "enabled": True, "steps": 5}
        block["finetune"]["distill"] = {"weight": 0.5, "temperature": 2.0}
    return config


# task -> (FF sublayers removed by the reduced config's fraction (encoder + decoder for asr), layers in the CKA
# matrix, window starts of the (permute, drop) searches)
REDUCED = {"lm": (28, 30, (2, 3)), "vision": (4, 12, (8, 9)), "asr": (2, 8, (3, 4))}


@pytest.mark.e2e
def test_reduced_default_pipeline_end_to_end(tmp_path):
    results = tmp_path / "results"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_reduced_config(results)))
    command = [*SNAKEMAKE, "--cores", "2", "--configfile", str(config_path), "-d", str(tmp_path / "wd")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    for task, (removed, cka_layers, (merge_starts, drop_starts)) in REDUCED.items():
        out = results / task
        table = pd.read_csv(out / "tables" / "table9.csv")
        assert set(table["variant"]) == {"base", "permute", "vanilla", "drop", "ffdrop", "permute@last"}, task
        base = table[table["variant"] == "base"].iloc[0]
        compressed = table[table["variant"] != "base"]
        assert (compressed["parameters"] < base["parameters"]).all(), task
        assert (compressed["ffs_removed"] == removed).all(), task
        assert set(compressed["choice"]) == {"best", "random0"}, task
        assert (out / "tables" / "table9.md").read_text().count("\n") == len(table) + 2
        int8 = pd.read_csv(out / "tables" / "int8.csv")
        assert set(int8["variant"]) == {"base", "permute", "vanilla"}, task
        ratios = int8.pivot(index="variant", columns="int8", values="ratio")
        assert (ratios[True] < ratios[False]).all(), task
        assert ratios.loc["permute", True] < ratios.loc["base", True], task  # merging and int8 compose

        # the in-process search scored every window start in full
        fraction = "14of15" if task == "lm" else "1of3"
        for search, starts in (("permute", merge_starts), ("drop", drop_starts), ("ffdrop", drop_starts)):
            selection = json.loads((out / "selection" / search / f"{fraction}.json").read_text())
            assert sorted(selection["scores"], key=int) == [str(s) for s in range(starts)], (task, search)
            assert not selection["screened"]
            best = max if task == "vision" else min
            assert selection["best_valid"] == best(selection["scores"].values())

        # merges were repaired (and every other model was not); every fine-tune records its budget and curve
        pre = json.loads((out / "eval" / "permute" / fraction / "best" / "pre.json").read_text())
        assert all(s["error_repaired"] <= s["error_merged"] for s in pre["repair"]["stacks"].values()), task
        assert json.loads((out / "eval" / "ffdrop" / fraction / "best" / "pre.json").read_text())["repair"] is None
        for variant in ("permute", "ffdrop"):
            ft = json.loads((out / "eval" / variant / fraction / "best" / "post.json").read_text())["finetune"]
            assert ft["distill"] == {"weight": 0.5, "temperature": 2.0}, task
            assert ft["budget"]["total"] == ft["budget"]["per_step"] * ft["steps"] > 0, task
            assert [c["step"] for c in ft["curve"]][0] == 0 and ft["curve"][-1]["step"] == ft["steps"], task

        cka = pd.read_csv(out / "cka" / "ff_out.csv", index_col=0)
        assert cka.shape == (cka_layers, cka_layers), task
        assert (abs(cka.values.diagonal() - 1) < 1e-6).all(), task

    lm = results / "lm"
    # the saved compressed model really is smaller: tied FF modules are one object, stored once
    merged = load_model(lm / "models" / "permute" / "14of15" / "best" / "finetuned")
    base_model = load_model(lm / "model" / "base", auto_class="AutoModelForCausalLM")
    assert merged.num_parameters() < base_model.num_parameters()
    assert merged.model.layers[0].mlp.down_proj is merged.model.layers[28].mlp.down_proj
    finetune_info = json.loads((lm / "eval" / "permute" / "14of15" / "best" / "post.json").read_text())["finetune"]
    assert finetune_info["steps"] == 4

    # the model jobs ran in forks of the fork server (all but those that started while it was importing),
    # whose CPU time and memory were recorded beside their logs; the server stopped with the run
    server_log = (results / "logs" / "fork_server.log").read_text().splitlines()
    forked = [line for line in server_log if line.startswith("job ") and ": exit " in line]
    assert forked and all(": exit 0," in line for line in forked), server_log
    finetune_logs = list((results / "logs").glob("*/finetune/**/*.log"))
    assert finetune_logs and all(usage_path(log).is_file() for log in finetune_logs)
    socket_path = Path(server_log[0].split(" listening on ")[1])
    assert not socket_path.exists()

    # pre-fine-tuning checkpoints are temp outputs: gone once fine-tuned, their metric kept in pre.json; of the
    # fine-tuned models only the chosen permute merge (keep_models: chosen) and the fine-tuned base stay, the
    # controls' metrics in post.json
    for task in ("lm", "vision", "asr"):
        models = results / task / "models"
        fraction = "14of15" if task == "lm" else "1of3"
        assert not list(models.glob("*/*/*/compressed")), task
        kept = sorted(str(p.relative_to(models)) for p in models.glob("**/finetuned"))
        assert kept == ["base/finetuned", f"permute/{fraction}/best/finetuned"], task
        assert len(list((results / task / "eval").glob("*/*/*/post.json"))) == 6, task  # 4 methods, anchor, random
        assert list((results / task / "eval").glob("*/*/*/pre.json")), task

    again = subprocess.run([*command, "-n"], capture_output=True, text=True)
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr
