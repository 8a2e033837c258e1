rule cache_features:
    input:
        model=f"{R}/model/base",
        data=f"{R}/data",
    output:
        directory(f"{R}/features"),
    params:
        cfg=task_cfg("features"),
        device=DEVICE,
    log:
        f"{LOGS}/cache_features.log",
    benchmark:
        f"{BENCH}/cache_features.tsv",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cache_features.py"


# In-process searches: the (anchor, layer) pairs that the permute windows of every fraction align, each solved
# once (windows of different starts and sizes share most pairs); the searches and compress jobs read them.


rule align:
    input:
        features=f"{R}/features",
    output:
        f"{R}/alignment/permute.safetensors",
    params:
        cfg=align_cfg,  # the fractions only (rules/common.smk)
    log:
        f"{LOGS}/align.log",
    benchmark:
        f"{BENCH}/align.tsv",
    resources:
        mem_mb=4000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/align.py"
