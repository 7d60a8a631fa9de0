#!/usr/bin/env bash
# One prepared device call (H100/H200, < 10 min): train the default MT10 policy for TRAIN_S
# seconds from the current default, then the GPU end-to-end benchmark (benchmarks/e2e_gpu.sh).
# Everything is packed into $OUT as res.tgz.part-* (<= 15 MiB each; the device tool returns at
# most 8 files of 16 MiB). Unpack here: cat res.tgz.part-* | tar xz -C runs/device
#   run(command="bash scripts/device_session.sh", carry=[".device_carry/mt10_demos_v2.npz"], timeout_s=590)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}; RES=/tmp/res; rm -rf "$RES"; mkdir -p "$RES"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
SECONDS=0
pack() { tar czf - -C "$RES" . | split -b 15m - "$OUT/res.tgz.part-"; ls -l "$OUT"; }
trap pack EXIT
{ date -u; nvidia-smi; python3 -c "import torch, triton, cv2; print(torch.__version__, triton.__version__, cv2.__version__)"; } \
  2>&1 | tee "$RES/machine.txt"
OUT=$RES timeout $(( ${TRAIN_S:-290} + 60 )) bash scripts/train_default_gpu.sh .device_carry/mt10_demos_v2.npz \
  "${TRAIN_S:-290}" quantvla_core/assets/default_policy 2>&1 | tee "$RES/train.log"
echo "training done after ${SECONDS} s"
mkdir -p "$RES/e2e"
OUT=$RES/e2e timeout 235 bash benchmarks/e2e_gpu.sh 2>&1 | tee "$RES/e2e.log"
echo "all done after ${SECONDS} s"
