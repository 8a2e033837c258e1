# Sliding-window search. search.mode per_window: one job per (method, fraction, window start), then the best
# window; in_process: select_window itself scores every start, reusing the base model's hidden states.


rule candidate:
    input:
        unpack(features_if_merge),
        model=f"{R}/model/base",
        data=f"{R}/data",
    output:
        f"{R}/candidates/{{search}}/{{fraction}}/start{{start}}.json",
    params:
        cfg=task_cfg("selection"),
        device=DEVICE,
    log:
        f"{LOGS}/candidate/{{search}}/{{fraction}}/start{{start}}.log",
    benchmark:
        f"{BENCH}/candidate/{{search}}/{{fraction}}/start{{start}}.tsv",
    resources:
        mem_mb=4000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/candidate.py"



rule select_window:
    input:
        unpack(selection_inputs),
    output:
        f"{R}/selection/{{search}}/{{fraction}}.json",
    params:
        cfg=task_cfg("selection", "search"),
        device=DEVICE,
    log:
        f"{LOGS}/select_window/{{search}}/{{fraction}}.log",
    benchmark:
        f"{BENCH}/select_window/{{search}}/{{fraction}}.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/select_window.py"
