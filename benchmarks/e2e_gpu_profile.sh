#!/usr/bin/env bash
# Issue 7 in one short device call (about 4.5 minutes, capped at 320 s by inner timeouts):
#  1. benchmarks/e2e_profile.py: torch.profiler top kernels + CUDA-graph ms of one prefix pass and
#     one denoising step, pi05-3b (3 cam: fp, w8a8, w4a8) and groot-n15 (1 cam: fp, w8a8), for
#     the activation-quantization settings ieee (the library's path: row kernel, exact
#     rotation), tile (the fallback kernel), tf32x3 / tf32 (rotation on tensor cores);
#  2. benchmarks/e2e.py (whole chunks, CUDA graphs) on the library's path: pi05-3b 3 cam and
#     groot-n15 1 cam, fp,w8a8,w4a8; then, as time allows, smooth-only transforms (pi05-3b
#     fp,w8a8).  (The former fp32-cast path, "path v1" in docs/benchmarks.md, is gone.)
# Device tool:  run(command="bash benchmarks/e2e_gpu_profile.sh", timeout_s=330)
# Results: $OUT/prof.tgz (all txt/json/png) and the key tables at the end of stdout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${OUT:-/tmp/e2e_prof_out}
RES=$(mktemp -d)
PY=${PYTHON:-python3}
LIMIT=${LIMIT_S:-320}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || exit 1
SECONDS=0
left() { echo $(( LIMIT - SECONDS )); }
# run <seconds wanted> <log name> <command...>: skipped when less time is left, capped to what is
run() {
  local want=$1 name=$2; shift 2
  local t; t=$(left)
  if [ "$t" -lt 30 ]; then echo "SKIPPED $name (${t} s left)"; return 0; fi
  [ "$want" -gt "$t" ] && want=$t
  echo "=== $name (timeout ${want} s, at ${SECONDS} s)"
  timeout "$want" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "=== $name exit $rc after ${SECONDS} s"
  return 0
}
common=(--device cuda --quick --no-progress)
run 110 prof-pi05 $PY benchmarks/e2e_profile.py --preset pi05-3b --cameras 3 --device cuda --schemes fp,w8a8,w4a8 \
  --paths ieee,tile,tf32x3,tf32 --out "$RES"
run 45 prof-groot $PY benchmarks/e2e_profile.py --preset groot-n15 --cameras 1 --device cuda --schemes fp,w8a8 \
  --paths ieee,tf32x3 --out "$RES"
run 80 e2e-pi05-new $PY benchmarks/e2e.py --preset pi05-3b --cameras 3 "${common[@]}" --schemes fp,w8a8,w4a8 \
  --time-budget 55 --out "$RES" --tag e2e-new-pi05-3b
run 40 e2e-groot-new $PY benchmarks/e2e.py --preset groot-n15 --cameras 1 "${common[@]}" --schemes fp,w8a8,w4a8 \
  --time-budget 25 --out "$RES" --tag e2e-new-groot-n15
run 60 e2e-pi05-smooth $PY benchmarks/e2e.py --preset pi05-3b --cameras 3 "${common[@]}" --schemes fp,w8a8 \
  --transforms smooth --time-budget 40 --out "$RES" --tag e2e-smooth-pi05-3b
tar czf "$OUT_DIR/prof.tgz" -C "$RES" . 2>/dev/null
echo; echo "################ summary (after ${SECONDS} s)"
for f in "$RES"/*.log; do echo "--- $(basename "$f"): last lines"; grep -iE "error|warn|Traceback|FAILED" "$f" | grep -v "^\s*$" | tail -4; done
for f in "$RES"/profile-*.txt; do [ -f "$f" ] && { echo "--- $(basename "$f")"; grep -E "^== |^  " "$f" | grep -v "^== .*kernel"; }; done
for f in "$RES"/e2e-*.txt; do [ -f "$f" ] && { echo "--- $(basename "$f")"; grep -E "^(preset|pi05|groot|command|  - )" "$f"; }; done
# the top kernels of the prefix pass per setting (pi05-3b), compact
f=$(ls "$RES"/profile-pi05*.txt 2>/dev/null | head -1)
[ -n "$f" ] && awk '/^== .*prefix/{p=1; n=0; print; next} /^== /{p=0} p && n<8 {print; n++}' "$f"
ls -l "$OUT_DIR"
