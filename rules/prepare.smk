# The model as the task's source gives it, the data splits, and for a backbone without a classifier (the offline
# vision default) a linear head fitted on frozen features: every later rule reads {R}/model/base.


checkpoint prepare_model:
    output:
        directory(f"{R}/model/{{prepared}}"),
    params:
        cfg=task_cfg("model"),
    log:
        f"{LOGS}/prepare_model_{{prepared}}.log",
    benchmark:
        f"{BENCH}/prepare_model_{{prepared}}.tsv",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/prepare_model.py"


rule prepare_data:
    input:
        model=lambda wc: source_model_dir(wc.task),
    output:
        directory(f"{R}/data"),
    params:
        cfg=task_cfg("data", "splits", "image_size", "speech", "bleu_tokenize"),
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCH}/prepare_data.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/prepare_data.py"


rule fit_head:
    input:
        model=f"{R}/model/backbone",
        data=f"{R}/data",
    output:
        directory(f"{R}/model/base"),
    params:
        cfg=task_cfg("probe", "image_size"),
        device=DEVICE,
    wildcard_constraints:
        task=PROBE_TASKS,
    log:
        f"{LOGS}/fit_head.log",
    benchmark:
        f"{BENCH}/fit_head.tsv",
    resources:
        mem_mb=4000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/fit_head.py"


ruleorder: fit_head > prepare_model
