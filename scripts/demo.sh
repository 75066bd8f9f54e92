#!/usr/bin/env bash
# The README's first command: install (torch CPU first), then the whole method on NumberLine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT="${1:-runs/demo-$(date +%Y%m%d-%H%M%S)}"
exec vlmrl demo --out "$OUT"
