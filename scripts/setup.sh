#!/usr/bin/env bash
# Create .venv and install vlmrl into it. torch first, from the CPU build (a plain `torch` from the
# registry would pull several GB of CUDA packages). Every package at the exact version of
# constraints.txt, the versions the suite last passed on. Idempotent: a second run only checks.
#   VLMRL_EXTRAS=dev,alfworld   extras to install (default: dev)
#   VLMRL_LATEST=1              the newest releases the pyproject ranges allow, into .venv-latest
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${VLMRL_EXTRAS:-dev}"
TORCH="${VLMRL_TORCH:-2.13.0}"
if [ "${VLMRL_LATEST:-0}" = 1 ]; then
  VENV=.venv-latest
  PIN=(--upgrade --upgrade-strategy eager)
  PIP=(--upgrade pip)
else
  VENV=.venv
  PIN=(-c constraints.txt)
  PIP=("pip==$(sed -n 's/^pip==//p' constraints.txt)")
fi
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
quiet python -m pip install -q "${PIP[@]}"
python -c "import torch" 2>/dev/null || quiet python -m pip install -q "torch==${TORCH}"
quiet python -m pip install -q "${PIN[@]}" -e ".[${EXTRAS}]"
python -c "import vlmrl, torch, transformers; print('vlmrl', vlmrl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
