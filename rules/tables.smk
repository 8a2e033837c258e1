rule tables:
    input:
        unpack(table_inputs),
    output:
        table9_csv=f"{R}/tables/table9.csv",
        table9_md=f"{R}/tables/table9.md",
        int8_csv=f"{R}/tables/int8.csv",
        int8_md=f"{R}/tables/int8.md",
        windows_csv=f"{R}/tables/window_scores.csv",
        recovery_csv=f"{R}/tables/recovery_curves.csv",  # every post.json's finetune.curve, tidy
    log:
        f"{LOGS}/tables.log",
    benchmark:
        f"{BENCH}/tables.tsv",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/tables.py"
