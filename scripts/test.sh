#!/usr/bin/env bash
# The test command of the README: installs what it needs, then runs the whole suite (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
VLMRL_EXTRAS="dev,alfworld" bash scripts/setup.sh
. .venv/bin/activate
# ALFWorld game files live beside the checkout; tests that need them skip with a message otherwise.
if [ -z "${ALFWORLD_DATA:-}" ] && [ -d ../shared/data/alfworld ]; then
  export ALFWORLD_DATA="$(cd ../shared/data/alfworld && pwd)"
fi
exec python -m pytest -q "$@"
