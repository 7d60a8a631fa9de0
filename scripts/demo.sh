#!/usr/bin/env bash
# The README's main job: set up ./.venv if needed, then run the default policy on synthetic
# camera frames and print chunks and timings.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_venv.sh
exec .venv/bin/quantvla demo "$@"
