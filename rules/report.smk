# The paper's artifacts from finished result files alone (no model in memory): figures as PNG + PDF, tables as
# CSV + Markdown + HTML, every one marked for `snakemake --report report.html`. Cross-task figures and tables
# (one panel / row group per task) go to {results_dir}/report/, per-model CKA heatmaps to {task}/figures/.
report: "../report/workflow.rst"


rule figure_ff_removed:
    input:
        table9=per_task(f"{R}/tables/table9.csv"),
    output:
        **figure_outputs("figure2_ff_removed", "../report/figure2.rst", "Figure 2: FF sublayers removed"),
    params:
        **report_params("titles"),
    log:
        f"{REPORT_LOGS}/figure2_ff_removed.log",
    benchmark:
        f"{REPORT_BENCH}/figure2_ff_removed.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figure_ff_removed.py"


rule figure_params_removed:
    input:
        table9=per_task(f"{R}/tables/table9.csv"),
    output:
        **figure_outputs("figure3_params_removed", "../report/figure3.rst", "Figure 3: parameters removed"),
    params:
        **report_params("titles"),
    log:
        f"{REPORT_LOGS}/figure3_params_removed.log",
    benchmark:
        f"{REPORT_BENCH}/figure3_params_removed.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figure_params_removed.py"


rule figure_window_scores:
    input:
        windows=per_task(f"{R}/tables/window_scores.csv"),
    output:
        **figure_outputs("figure10_window_scores", "../report/figure10.rst", "Figure 10: window search"),
    params:
        **report_params("titles", "first_fractions"),
    log:
        f"{REPORT_LOGS}/figure10_window_scores.log",
    benchmark:
        f"{REPORT_BENCH}/figure10_window_scores.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figure_window_scores.py"


rule figure_recovery_curves:
    input:
        curves=per_task(f"{R}/tables/recovery_curves.csv"),
    output:
        **figure_outputs("recovery_curves", "../report/recovery_curves.rst", "Recovery curves"),
    params:
        **report_params("titles", "first_fractions"),
    log:
        f"{REPORT_LOGS}/recovery_curves.log",
    benchmark:
        f"{REPORT_BENCH}/recovery_curves.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figure_recovery_curves.py"


rule figure_cka:
    input:
        f"{R}/cka/{{kind}}.csv",
    output:
        png=report(f"{R}/figures/cka_{{kind}}.png", caption="../report/figure_cka.rst", category="Figures",
                   subcategory=lambda wc: CKA_FIGURES[wc.kind], labels={"task": "{task}"}),
        pdf=f"{R}/figures/cka_{{kind}}.pdf",
    params:
        title=lambda wc: "{}: linear CKA of {} ({})".format(
            wc.task, {"ff_out": "FF outputs", "attn_out": "attention outputs"}[wc.kind],
            describe_model(config["tasks"][wc.task]["model"])),
    log:
        f"{LOGS}/figure_cka/{{kind}}.log",
    benchmark:
        f"{BENCH}/figure_cka/{{kind}}.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figure_cka.py"


rule table_windows:
    input:
        table9=per_task(f"{R}/tables/table9.csv"),
        windows=per_task(f"{R}/tables/window_scores.csv"),
    output:
        **table_outputs("table2_windows", "../report/table2.rst", "Table 2: best vs random windows"),
    params:
        **report_params("first_fractions"),
    log:
        f"{REPORT_LOGS}/table2_windows.log",
    benchmark:
        f"{REPORT_BENCH}/table2_windows.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report_windows.py"


rule table_anchors:
    input:
        table9=per_task(f"{R}/tables/table9.csv"),
    output:
        **table_outputs("table3_anchors", "../report/table3.rst", "Table 3: merge anchor"),
    params:
        **report_params("first_fractions"),
    log:
        f"{REPORT_LOGS}/table3_anchors.log",
    benchmark:
        f"{REPORT_BENCH}/table3_anchors.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report_anchors.py"


rule table_int8:
    input:
        tables=per_task(f"{R}/tables/int8.csv"),
    output:
        **table_outputs("table4_int8", "../report/table4.rst", "Table 4: int8"),
    params:
        **report_params(),
        table="int8",
        title="Table 4: LLM.int8() on the fine-tuned models",
    log:
        f"{REPORT_LOGS}/table4_int8.log",
    benchmark:
        f"{REPORT_BENCH}/table4_int8.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report_combine.py"


use rule table_int8 as table_results with:
    input:
        tables=per_task(f"{R}/tables/table9.csv"),
    output:
        **table_outputs("table9_results", "../report/table9.rst", "Table 9: all results"),
    params:
        **report_params(),
        table="table9",
        title="Table 9: every model after fine-tuning",
    log:
        f"{REPORT_LOGS}/table9_results.log",
    benchmark:
        f"{REPORT_BENCH}/table9_results.tsv"


rule table_paper_comparison:
    input:
        table9=per_task(f"{R}/tables/table9.csv"),
        paper=PAPER_RESULTS,
    output:
        **table_outputs("paper_comparison", "../report/paper_comparison.rst", "Ours vs the paper"),
    params:
        **report_params("configs"),
    log:
        f"{REPORT_LOGS}/paper_comparison.log",
    benchmark:
        f"{REPORT_BENCH}/paper_comparison.tsv"
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report_paper.py"
