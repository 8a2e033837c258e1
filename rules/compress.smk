rule compress:
    input:
        unpack(features_if_merge),
        model=f"{R}/model/base",
        selection=lambda wc: f"{R}/selection/{search_of(wc.variant)}/{{fraction}}.json".format(**wc),
    output:
        directory(f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/compressed"),
    params:
        cfg=task_cfg(),
    log:
        f"{LOGS}/compress/{{variant}}/{{fraction}}/{{choice}}.log",
    benchmark:
        f"{BENCH}/compress/{{variant}}/{{fraction}}/{{choice}}.tsv",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/compress.py"
