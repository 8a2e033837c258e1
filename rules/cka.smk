rule cka:
    input:
        features=f"{R}/features",
    output:
        ff_out=f"{R}/cka/ff_out.csv",
        attn_out=f"{R}/cka/attn_out.csv",
    log:
        f"{LOGS}/cka.log",
    benchmark:
        f"{BENCH}/cka.tsv",
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/cka.py"
