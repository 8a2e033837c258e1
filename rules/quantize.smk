# LLM.int8() on top of the fine-tuned models (the paper's Table 4).


rule quantize_int8:
    input:
        model=f"{R}/models/{{variant}}/{{fraction}}/{{choice}}/finetuned",
        data=f"{R}/data",
    output:
        f"{R}/int8/{{variant}}/{{fraction}}/{{choice}}.json",
    params:
        cfg=task_cfg("evaluation"),
        device=DEVICE,
    log:
        f"{LOGS}/quantize_int8/{{variant}}/{{fraction}}/{{choice}}.log",
    benchmark:
        f"{BENCH}/quantize_int8/{{variant}}/{{fraction}}/{{choice}}.tsv",
    resources:
        mem_mb=12000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/quantize_int8.py"


use rule quantize_int8 as quantize_int8_base with:
    input:
        model=f"{R}/models/base/finetuned",
        data=f"{R}/data",
    output:
        f"{R}/int8/base.json",
    log:
        f"{LOGS}/quantize_int8/base.log",
    benchmark:
        f"{BENCH}/quantize_int8/base.tsv",
