#!/usr/bin/env bash
# Create .venv and install vlmrl into it. torch first, from the CPU build (a plain `torch` from the
# registry would pull several GB of CUDA packages). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${VLMRL_EXTRAS:-dev}"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${VLMRL_TORCH:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import vlmrl, torch; print('vlmrl', vlmrl.__version__, 'torch', torch.__version__)"
