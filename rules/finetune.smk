# Recovery fine-tuning, then the fine-tuned model's test metric (the "after fine-tuning" column) in the same job.
# Checkpoints live in work/ (not a Snakemake output, so a failed or killed job keeps them) and a rerun resumes
# from the last one.
#
# Which fine-tuned models stay on disk (config `keep_models`): "chosen" keeps the product, the chosen permute
# merge of every fraction (rule finetune) and the fine-tuned base (rule finetune_base); the controls (vanilla,
# drop, ffdrop, tie_random, onewide, group, fips, wide, the anchor ablations and the random windows: rule
# finetune_control) are temp outputs, deleted once their metric is in post.json and int8 (which reads the vanilla
# merge) has used them.
# "all" keeps them too.
# The three rules split the same path pattern by their wildcard constraints, so exactly one matches each model.


rule finetune:
    input:
        model=f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/compressed",
        data=f"{R}/data",
        teacher=f"{R}/model/base",  # the uncompressed model, for finetune.distill
    output:
        model=directory(f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/finetuned"),
        eval=f"{R}/eval/{{variant}}/{{fraction}}/{{choice}}/post.json",
    wildcard_constraints:
        variant="permute",
        choice="best",
    params:
        cfg=task_cfg("finetune", "selection", "evaluation"),
        device=DEVICE,
        work=work_dir("finetune/{variant}/{fraction}/{choice}"),
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
        work=work_dir("finetune/base"),
    log:
        f"{LOGS}/finetune/base.log",
    benchmark:
        f"{BENCH}/finetune/base.tsv",


use rule finetune as finetune_control with:
    output:
        model=control_model(directory(f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/finetuned")),
        eval=f"{R}/eval/{{variant}}/{{fraction}}/{{choice}}/post.json",
    wildcard_constraints:
        # every variant but the plain permute merge, at the chosen window
        variant=(
            "(vanilla|permute@(first|middle|last)|vanilla@(first|middle|last)|drop|ffdrop|tie_random|onewide|group"
            "|fips|wide)"
        ),
        choice="best",


use rule finetune_control as finetune_random with:
    wildcard_constraints:
        # the random-window controls, of any variant
        variant="(permute|vanilla)(@(first|middle|last))?|drop|ffdrop",
        choice="random[0-9]+",
