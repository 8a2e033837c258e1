# Recovery fine-tuning, then the fine-tuned model's test metric (the "after fine-tuning" column) in the same job.
# Checkpoints live in work/ (not a Snakemake output, so a failed or killed job keeps them) and a rerun resumes
# from the last one.


rule finetune:
    input:
        model=f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/compressed",
        data=f"{R}/data",
        teacher=f"{R}/model/base",  # the uncompressed model, for finetune.distill
    output:
        model=directory(f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/finetuned"),
        eval=f"{R}/eval/{{variant}}/{{fraction}}/{{choice}}/post.json",
    params:
        cfg=task_cfg("finetune", "selection", "evaluation"),
        device=DEVICE,
        work=f"{R}/work/finetune/{{variant}}/{{fraction}}/{{choice}}",
    log:
        f"{LOGS}/finetune/{{variant}}/{{fraction}}/{{choice}}.log",
    benchmark:
        f"{BENCH}/finetune/{{variant}}/{{fraction}}/{{choice}}.tsv",
    resources:
        mem_mb=12000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/finetune.py"


use rule finetune as finetune_base with:
    input:
        model=f"{R}/model/base",
        data=f"{R}/data",
        teacher=f"{R}/model/base",
    output:
        model=directory(f"{R}/models/base/finetuned"),
        eval=f"{R}/eval/base/post.json",
    params:
        cfg=task_cfg("finetune", "selection", "evaluation"),
        device=DEVICE,
        work=f"{R}/work/finetune/base",
    log:
        f"{LOGS}/finetune/base.log",
    benchmark:
        f"{BENCH}/finetune/base.tsv",
