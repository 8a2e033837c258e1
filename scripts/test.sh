#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, including the reduced end-to-end Snakemake run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
