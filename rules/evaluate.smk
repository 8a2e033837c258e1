def model_at(stage):
    return "compressed" if stage == "pre" else "finetuned"


rule evaluate:
    input:
        model=lambda wc: f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/{model_at(wc.stage)}".format(**wc),
        data=f"{R}/data",
    output:
        f"{R}/eval/{{variant}}/{{fraction}}/{{choice}}/{{stage}}.json",
    params:
        cfg=task_cfg("evaluation"),
        device=DEVICE,
    log:
        f"{LOGS}/evaluate/{{variant}}/{{fraction}}/{{choice}}/{{stage}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{variant}}/{{fraction}}/{{choice}}/{{stage}}.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/evaluate.py"


use rule evaluate as evaluate_base with:
    input:
        model=lambda wc: f"{R}/model/base" if wc.stage == "pre" else f"{R}/models/base/finetuned",
        data=f"{R}/data",
    output:
        f"{R}/eval/base/{{stage}}.json",
    log:
        f"{LOGS}/evaluate/base/{{stage}}.log",
    benchmark:
        f"{BENCH}/evaluate/base/{{stage}}.tsv",
