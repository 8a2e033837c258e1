checkpoint prepare_model:
    output:
        directory(f"{R}/model/base"),
    params:
        source=lambda wc: config["tasks"][wc.task]["model"],
    log:
        f"{LOGS}/prepare_model.log",
    benchmark:
        f"{BENCH}/prepare_model.tsv",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/prepare_model.py"


rule prepare_data:
    input:
        model=f"{R}/model/base",
    output:
        directory(f"{R}/data"),
    params:
        cfg=task_cfg("data", "splits"),
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCH}/prepare_data.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/prepare_data.py"
