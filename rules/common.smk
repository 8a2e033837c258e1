# Paths, wildcard constraints and the input functions of all the rule files (snakemake --lint wants those to hold
# rules only).
import os

from ffmerge.experiments import (MERGES_WITH, compressed_models, fraction_label, parse_fraction_label, search_of,
                                 split_variant)
from ffmerge.fips import METHOD as FIPS
from ffmerge.group import METHOD as GROUP
from ffmerge.workflow.preflight import candidate_starts
from ffmerge.workflow.settings import params_view

R = os.path.join(config["results_dir"], "{task}")
LOGS = os.path.join(config["results_dir"], "logs", "{task}")
BENCH = os.path.join(config["results_dir"], "benchmarks", "{task}")  # per-job wall time and peak memory
DEVICE = config["device"]


wildcard_constraints:
    task="[A-Za-z0-9_-]+",
    search="permute|vanilla|drop|ffdrop",
    variant="(permute|vanilla)(@(first|middle|last))?|drop|ffdrop|tie_random|onewide|group|fips|wide",
    fraction="[0-9]+of[0-9]+|all-but-one",
    choice="best|random[0-9]+",
    start="[0-9]+",
    kind="ff_out|attn_out",
    prepared="base|backbone",


def control_model(path):
    """Fine-tuned control models are temp outputs, deleted once used, unless the config says keep_models all."""
    return temp(path) if config["keep_models"] == "chosen" else path


def work_dir(subfolder):
    """A fine-tune's resume-state folder: below results_dir, or below scratch_dir (expanded in the job, so that
    $TMPDIR or $USER are the job's own) when the config sets one."""
    scratch = config.get("scratch_dir")
    if not scratch:
        return os.path.join(R, "work", subfolder)
    return os.path.join(scratch, "{task}", subfolder)


def task_cfg(*keys):
    """Only the config blocks a rule reads, so editing one block (say, finetune) reruns only its jobs.

    Keys a task type does not use (image_size for a language model) are simply absent, and so are keys added
    after results existed while they hold their default (ffmerge.workflow.settings: no rerun on upgrade)."""

    def params(wildcards):
        cfg = config["tasks"][wildcards.task]
        return {key: params_view(key, cfg[key]) for key in ("type", "seed", *keys) if key in cfg}

    return params


def compress_cfg(wildcards):
    """Rule compress's params: the blocks it reads, and a method's own block for that method only (fips; group where
    it differs from its default), so that adding or editing one leaves every other compressed model as it is."""
    params = task_cfg("evaluation", "repair", "features")(wildcards)
    cfg = config["tasks"][wildcards.task]
    method = split_variant(wildcards.get("variant", ""))[0]
    if method == FIPS:
        params["fips"] = cfg["fips"]
    group = params_view("group", cfg["group"])
    if method == GROUP and group:
        params["group"] = group
    return params


def align_cfg(wildcards):
    """Rule align's params: only the fractions decide which pairs it solves, so adding a method, an anchor or random
    windows to `experiments` leaves its output, and every search and model built on it, as it is."""
    cfg = config["tasks"][wildcards.task]
    return {"type": cfg["type"], "seed": cfg["seed"], "experiments": {"fractions": cfg["experiments"]["fractions"]}}


# Tasks whose baseline classifier is a linear head fitted on a bare backbone (config key `probe`): their source
# model is prepared as model/backbone and rule fit_head writes model/base. The regex matches no name when none.
PROBE_TASKS = "|".join(t for t, c in config["tasks"].items() if "probe" in c) or "(?!)"


def prepared_name(task):
    return "backbone" if "probe" in config["tasks"][task] else "base"


def source_model_dir(task):
    return f"{R}/model/{prepared_name(task)}".format(task=task)


# search_of (ffmerge.experiments): the window search a variant reuses, its own method's except for the anchor
# ablations (the first anchor's window) and tie_random (the permute search's window, never a search of its own).


def features_if_merge(wildcards):
    """Merges read the feature cache; permute merges also the pairs solved by rule align (in-process and proxy
    searches), and so do onewide (a permute merge of its shared stack), group (a permute merge of its members) and
    wide (permute merges of its parts).
    fips reads the features only (its factors are fitted to the cached FF inputs and outputs; nothing is aligned).
    Deleting (drop, ffdrop) and tie_random (a fresh block, no alignment, no repair) read neither."""
    variant_method = wildcards.get("search") or split_variant(wildcards.get("variant", ""))[0]
    if variant_method == FIPS:
        return {"features": f"{R}/features".format(task=wildcards.task)}
    method = MERGES_WITH.get(variant_method)
    if method is None:
        return {}
    inputs = {"features": f"{R}/features".format(task=wildcards.task)}
    if method == "permute" and config["tasks"][wildcards.task]["search"]["mode"] != "per_window":
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


# ---- window search (rules/search.smk) ----


def candidate_files(wildcards):
    model_dir = checkpoints.prepare_model.get(task=wildcards.task, prepared=prepared_name(wildcards.task)).output[0]
    starts = candidate_starts(model_dir, wildcards.search, parse_fraction_label(wildcards.fraction))
    return expand(f"{R}/candidates/{{search}}/{{fraction}}/start{{start}}.json", start=starts,
                  task=wildcards.task, search=wildcards.search, fraction=wildcards.fraction)


def selection_inputs(wildcards):
    mode = config["tasks"][wildcards.task]["search"]["mode"]
    if mode == "per_window":
        return {"candidates": candidate_files(wildcards)}
    paths = {"model": f"{R}/model/base", "data": f"{R}/data", **features_if_merge(wildcards)}
    if mode == "proxy":  # every method's proxy comes from the feature cache (deletions: FF and attention outputs)
        paths["features"] = f"{R}/features"
    return {key: path.format(task=wildcards.task) for key, path in paths.items()}


def search_repair(wildcards):
    """The repair block as a search's params hold it: only a merge search that repairs its candidates
    (search.repair) has one, so a config without search.repair leaves finished searches as they are."""
    cfg = config["tasks"][wildcards.task]
    if cfg["search"].get("repair") and wildcards.search in MERGES_WITH:
        return {"repair": params_view("repair", cfg["repair"])}
    return {}


def candidate_cfg(wildcards):
    """Rule candidate's params: the selection block, and for repaired candidates the flag and the repair block."""
    params = task_cfg("selection")(wildcards)
    repair = search_repair(wildcards)
    return {**params, "search": {"repair": True}, **repair} if repair else params


def search_cfg(wildcards):
    """Rule select_window's params: the selection block and the search keys its mode reads, so that a key only
    another mode reads leaves a finished search as it is (proxy_keep, added to the schema after runs of the other
    modes existed, would otherwise rerun every search of them and everything built on it). A merge search that
    repairs its candidates (search.repair) also gets the repair block."""
    params = task_cfg("selection", "search")(wildcards)
    search = params["search"]
    unused = ("screen_share", "screen_keep") if search["mode"] == "proxy" else ("proxy_keep",)
    searched = {key: value for key, value in search.items() if key not in unused}
    return {**params, "search": searched, **search_repair(wildcards)}


# ---- per-task tables (rules/tables.smk) ----


def table_inputs(wildcards):
    cfg = config["tasks"][wildcards.task]
    exp = cfg["experiments"]
    models = compressed_models(exp)
    base_stage = "post" if exp["finetune_baseline"] else "pre"
    inputs = {
        "base_pre": f"{R}/eval/base/pre.json",
        "base": f"{R}/eval/base/{base_stage}.json",
        "pre": [f"{R}/eval/{v}/{f}/{c}/pre.json" for v, f, c in models],
        "post": [f"{R}/eval/{v}/{f}/{c}/post.json" for v, f, c in models],
        "selections": sorted({f"{R}/selection/{search_of(v)}/{f}.json" for v, f, c in models}),
    }
    if exp["int8"]:
        head = fraction_label(exp["fractions"][0])
        best = [(v, f, c) for v, f, c in models if f == head and c == "best" and v in ("permute", "vanilla")]
        inputs["int8"] = [f"{R}/int8/{v}/{f}/{c}.json" for v, f, c in best] + [f"{R}/int8/base.json"]
    return {k: [p.format(task=wildcards.task) for p in v] if isinstance(v, list) else v.format(task=wildcards.task)
            for k, v in inputs.items()}


# ---- report: cross-task figures and tables (rules/report.smk) ----

REPORT = os.path.join(config["results_dir"], "report")
REPORT_LOGS = os.path.join(config["results_dir"], "logs", "report")
REPORT_BENCH = os.path.join(config["results_dir"], "benchmarks", "report")
REPORT_TASKS = list(config["tasks"])
PAPER_RESULTS = os.path.join(workflow.basedir, "data", "paper_results.yaml")
TABLE_FORMATS = ("csv", "md", "html")
CKA_FIGURES = {"ff_out": "Figure 5: CKA of FF outputs", "attn_out": "Figure 6: CKA of attention outputs"}


def per_task(path):
    """One file per configured task, in config order (the scripts pair them with params.tasks)."""
    return expand(path, task=REPORT_TASKS)


def report_params(*keys):
    """The task names (in the order of the per-task inputs) plus the named extras a script needs."""
    tasks = config["tasks"]
    extras = {
        "titles": lambda: {t: f"{t} ({describe_model(tasks[t]['model'])})" for t in REPORT_TASKS},
        "first_fractions": lambda: {t: tasks[t]["experiments"]["fractions"][0] for t in REPORT_TASKS},
        "configs": lambda: {t: tasks[t] for t in REPORT_TASKS},
    }
    return {"tasks": REPORT_TASKS} | {key: extras[key]() for key in keys}


def describe_model(source):
    """A model's name for figure titles: the hub id, or the folder or file name (a full path overflows them)."""
    local = source.get("path") or source.get("file", "?")
    return source.get("id") or os.path.basename(os.path.normpath(local))


def figure_outputs(name, caption, subcategory):
    return {
        "png": report(f"{REPORT}/{name}.png", caption=caption, category="Figures", subcategory=subcategory),
        "pdf": f"{REPORT}/{name}.pdf",
    }


def table_outputs(name, caption, subcategory):
    return {
        "csv": report(f"{REPORT}/{name}.csv", caption=caption, category="Tables", subcategory=subcategory,
                      labels={"table": subcategory, "format": "CSV"}),
        "md": f"{REPORT}/{name}.md",
        "html": report(f"{REPORT}/{name}.html", caption=caption, category="Tables", subcategory=subcategory,
                       labels={"table": subcategory, "format": "HTML"}),
    }


def report_outputs():
    """Every artifact of rules/report.smk; the `all` rule asks for them."""
    figures = [f"{REPORT}/{n}.{ext}" for n in ("figure2_ff_removed", "figure3_params_removed",
                                               "figure10_window_scores", "recovery_curves")
               for ext in ("png", "pdf")]
    cka = expand(f"{R}/figures/cka_{{kind}}.{{ext}}", task=REPORT_TASKS, kind=["ff_out", "attn_out"],
                 ext=["png", "pdf"])
    tables = [f"{REPORT}/{n}.{ext}" for n in ("table2_windows", "table3_anchors", "table4_int8", "table9_results",
                                              "paper_comparison") for ext in TABLE_FORMATS]
    return figures + cka + tables
