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


rule tables:
    input:
        unpack(table_inputs),
    output:
        table9_csv=f"{R}/tables/table9.csv",
        table9_md=f"{R}/tables/table9.md",
        int8_csv=f"{R}/tables/int8.csv",
        int8_md=f"{R}/tables/int8.md",
        windows_csv=f"{R}/tables/window_scores.csv",
        recovery_csv=f"{R}/tables/recovery_curves.csv",  # every post.json's finetune.curve, tidy
    log:
        f"{LOGS}/tables.log",
    benchmark:
        f"{BENCH}/tables.tsv",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/tables.py"
