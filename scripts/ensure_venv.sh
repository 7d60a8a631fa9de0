#!/usr/bin/env bash
# Create or reuse ./.venv with the pinned requirements and this package installed (editable).
# Idempotent: re-installs only when requirements.txt or setup.py changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.quantvla-installed"
want=$(cat "$root/requirements.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  echo "[quantvla] creating virtual environment in $venv" >&2
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[quantvla] installing pinned requirements (torch==2.13.0 CPU build from disk)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # Requirements marked for --no-deps in requirements.txt (transformers: its own list pulls the
  # Hugging Face 'kernels' package, whose setuptools hook is shadowed by this repository's
  # kernels/ folder and breaks the editable install below) go in without their dependencies.
  nodeps='^(transformers)[=<> ]'
  grep -Ev "$nodeps" "$root/requirements.txt" > "$venv/.requirements-deps.txt"
  "$venv/bin/python" -m pip install -q -r "$venv/.requirements-deps.txt" >&2
  if grep -Eq "$nodeps" "$root/requirements.txt"; then
    grep -E "$nodeps" "$root/requirements.txt" | "$venv/bin/python" -m pip install -q --no-deps -r /dev/stdin >&2
  fi
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
  echo "$want" > "$stamp"
  echo "[quantvla] ready. Put the quantvla command on PATH in this shell with:" >&2
  echo "[quantvla]   source .venv/bin/activate      (or run .venv/bin/quantvla)" >&2
fi
# The fused CPU integer linear is compiled on first use (25-40 s once per machine, cached under
# ~/.cache/torch_extensions): build it here, so a first inference (a ROS node's warm-up, a
# test waiting for a trajectory) never pays for it. Without a compiler it says why and the
# torch-op path (same numbers, slower) is used.
"$venv/bin/python" - <<'PY' >&2
from quantvla_kernels import cpu_fused
if cpu_fused.module() is None:
    print(f"[quantvla] fused CPU linear not built ({cpu_fused.failure()}): using the torch-op CPU path")
PY
