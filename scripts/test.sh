#!/usr/bin/env bash
# The test command of the README: installs what it needs (the locked versions of constraints.txt),
# then runs the whole suite (CPU, minutes). VLMRL_LATEST=1 tests the newest releases instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VLMRL_EXTRAS="dev,alfworld,bench" bash scripts/setup.sh
if [ "${VLMRL_LATEST:-0}" = 1 ]; then . .venv-latest/bin/activate; else . .venv/bin/activate; fi
# ALFWorld game files live beside the checkout; tests that need them skip with a message otherwise.
if [ -z "${ALFWORLD_DATA:-}" ] && [ -d ../shared/data/alfworld ]; then
  export ALFWORLD_DATA="$(cd ../shared/data/alfworld && pwd)"
fi
exec python -m pytest -q "$@"
