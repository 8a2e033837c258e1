# The chosen window as a tied checkpoint. The job also measures the model it has just built on the test split
# (the "before fine-tuning" column): a separate evaluation job would pay a second Python start and model load.
# The checkpoint is a temp output: once its fine-tune has finished, only pre.json is kept (the model is rebuilt
# exactly, repair included, if a later change needs it; `snakemake --notemp` keeps every one). Stored in float32
# beside its fine-tuned copy, it was half of the default run's 21.4 GB.


rule compress:
    input:
        unpack(features_if_merge),
        model=f"{R}/model/base",
        data=f"{R}/data",
        selection=lambda wc: f"{R}/selection/{search_of(wc.variant)}/{{fraction}}.json".format(**wc),
    output:
        model=temp(directory(f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/compressed")),
        eval=f"{R}/eval/{{variant}}/{{fraction}}/{{choice}}/pre.json",
    params:
        cfg=compress_cfg,
        device=DEVICE,
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
