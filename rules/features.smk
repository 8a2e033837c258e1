rule cache_features:
    input:
        model=f"{R}/model/base",
        data=f"{R}/data",
    output:
        directory(f"{R}/features"),
    params:
        cfg=task_cfg,
        device=DEVICE,
    log:
        f"{LOGS}/cache_features.log",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cache_features.py"
