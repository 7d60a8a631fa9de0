#!/usr/bin/env bash
# The README's test command: set up ./.venv if needed, lint, then run the whole suite on the CPU.
# ROS 2 traffic stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) in a domain of
# its own; Triton kernels run in the interpreter.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_venv.sh || exit 1
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 101 ))}
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYTHONUNBUFFERED=1
# Lint first (rules in pyproject.toml: bugs and dead code, not style), then the formatter check
# (ruff format, line length 120); a failure of either fails the run.
.venv/bin/python -m ruff check . || { echo "lint failed: fix the findings above (.venv/bin/python -m ruff check .)" >&2; exit 1; }
.venv/bin/python -m ruff format --check . || { echo "format check failed: run .venv/bin/python -m ruff format ." >&2; exit 1; }
.venv/bin/python -m pytest -q "$@" test
rc=$?
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
if [ $rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit $rc
