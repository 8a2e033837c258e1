# Paths, wildcard constraints and job planning shared by every rule.
from ffmerge.experiments import compressed_models, fraction_label, parse_fraction_label
from ffmerge.workflow import candidate_starts

R = config["results_dir"] + "/{task}"
LOGS = config["results_dir"] + "/logs/{task}"
BENCH = config["results_dir"] + "/benchmarks/{task}"  # per-job wall time and peak memory
DEVICE = config["device"]


wildcard_constraints:
    task="[A-Za-z0-9_-]+",
    search="permute|vanilla|drop|ffdrop",
    variant="(permute|vanilla)(@(first|middle|last))?|drop|ffdrop",
    fraction="[0-9]+of[0-9]+|all-but-one",
    choice="best|random[0-9]+",
    start="[0-9]+",
    kind="ff_out|attn_out",
    prepared="base|backbone",


def task_cfg(*keys):
    """Only the config blocks a rule reads, so editing one block (say, finetune) reruns only its jobs.

    Keys a task type does not use (image_size for a language model) are simply absent."""

    def params(wildcards):
        cfg = config["tasks"][wildcards.task]
        return {key: cfg[key] for key in ("type", "seed", *keys) if key in cfg}

    return params


# Tasks whose baseline classifier is a linear head fitted on a bare backbone (config key `probe`): their source
# model is prepared as model/backbone and rule fit_head writes model/base. The regex matches no name when none.
PROBE_TASKS = "|".join(t for t, c in config["tasks"].items() if "probe" in c) or "(?!)"


def prepared_name(task):
    return "backbone" if "probe" in config["tasks"][task] else "base"


def source_model_dir(task):
    return f"{R}/model/{prepared_name(task)}".format(task=task)


def search_of(variant):
    """The window search a variant reuses: anchor ablations keep the window chosen with the first anchor."""
    return variant.split("@")[0]


def features_if_merge(wildcards):
    """Merges read the feature cache; permute merges also the pairs solved by rule align (in-process searches)."""
    method = search_of(wildcards.get("search", wildcards.get("variant", "")))
    if method in ("drop", "ffdrop"):
        return {}
    inputs = {"features": f"{R}/features".format(task=wildcards.task)}
    if method == "permute" and config["tasks"][wildcards.task]["search"]["mode"] == "in_process":
        inputs["alignment"] = f"{R}/alignment/permute.safetensors".format(task=wildcards.task)
    return inputs


def all_outputs():
    outputs = []
    for task, cfg in config["tasks"].items():
        exp = cfg["experiments"]
        outputs += expand(f"{R}/tables/table9.md", task=task)
        outputs += expand(f"{R}/cka/{{kind}}.csv", task=task, kind=["ff_out", "attn_out"])
    outputs += report_outputs()  # figures and paper tables (rules/report.smk)
    return outputs
