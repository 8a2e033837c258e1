# Sliding-window search. search.mode per_window: one job per (method, fraction, window start), then the best
# window; in_process: select_window itself scores every start, reusing the base model's hidden states; proxy: it
# ranks every start from the feature cache and scores only the search.proxy_keep best that way.


rule candidate:
    input:
        unpack(features_if_merge),
        model=f"{R}/model/base",
        data=f"{R}/data",
    output:
        f"{R}/candidates/{{search}}/{{fraction}}/start{{start}}.json",
    params:
        cfg=candidate_cfg,  # the selection block (and the repair block where search.repair repairs candidates)
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
        cfg=search_cfg,  # the search keys of its mode only (rules/common.smk)
        device=DEVICE,
    log:
        f"{LOGS}/select_window/{{search}}/{{fraction}}.log",
    benchmark:
        f"{BENCH}/select_window/{{search}}/{{fraction}}.tsv",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow_scripts/select_window.py"
