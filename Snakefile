# ffmerge: merge feed-forward sublayers of pretrained Transformers (Verma, Murray, Duh 2025).
# Offline default: `snakemake --cores 2`; paper scale: `snakemake --configfile configs/paper.yaml ...`.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")

from ffmerge.workflow import preflight

preflight(config)


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/features.smk"
include: "rules/search.smk"
include: "rules/compress.smk"
include: "rules/finetune.smk"
include: "rules/evaluate.smk"
include: "rules/quantize.smk"
include: "rules/cka.smk"
include: "rules/tables.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
