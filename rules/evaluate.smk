# Test metric and sizes of the uncompressed base model. Compressed and fine-tuned models are measured by the
# compress and finetune jobs that write them (rules/compress.smk, rules/finetune.smk), into the same eval/ layout.


rule evaluate:
    input:
        model=f"{R}/model/base",
        data=f"{R}/data",
    output:
        f"{R}/eval/base/pre.json",
    params:
        cfg=task_cfg("evaluation"),
        device=DEVICE,
    log:
        f"{LOGS}/evaluate/base/pre.log",
    benchmark:
        f"{BENCH}/evaluate/base/pre.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/evaluate.py"
