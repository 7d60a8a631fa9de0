#!/usr/bin/env bash
# Train two candidate default policies side by side on one lent GPU (H100/H200) from a demo
# bundle that travels in parts, within one device call; the candidates differ only in the
# random-shift augmentation (SHIFTS, default "4 2" pixels; INIT, default the shipped policy, is
# where they start; TASK_WEIGHTS, e.g. "push-v3=3,pick-place-v3=3", reaches both trainings).
# The choice between them is made afterwards on the
# validation starts (`quantvla eval --eval-seeds 1002`), never on the evaluation starts.
# Measured on an H200 (2026-11-27): at batch 1024 the two processes ran 8 steps/s each with the
# GPU 100% busy, i.e. 16k samples/s together (one process at batch 256 did ~4.9k samples/s).
#
# The parts travel in separate calls on the same warm machine (each call's tree + carry must
# stay under 64 MiB). A carried path does not survive the next call (the tool replaces carried
# paths), so the first call copies its part out of the repository:
#   run(command="cp .device_carry/mt10_v3_a.npz /tmp/", carry=[".device_carry/mt10_v3_a.npz"])
#   run(command="PARTS=/tmp/mt10_v3_a.npz,.device_carry/mt10_v3_b.npz TRAIN_S=440 \
#                bash scripts/device_train_candidates.sh",
#       carry=[".device_carry/mt10_v3_b.npz"], timeout_s=585)     # within 30 s of the first
# The script stops at once if a part is missing (the machine was given back in between).
# Parts: `quantvla sim bundle --demos DIR --every K` on demo folders split by task
# (docs/default-policy.md gives the commands).
# Results come back as $OUT/res.tgz.part-* (<= 15 MiB each): cat res.tgz.part-* | tar xz -C DIR
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}; RES=/tmp/res; rm -rf "$RES"; mkdir -p "$RES"
PARTS=${PARTS:-/tmp/mt10_v3_a.npz,.device_carry/mt10_v3_b.npz}
TRAIN_S=${TRAIN_S:-480}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
SECONDS=0
pack() { tar czf - -C "$RES" . | split -b 15m - "$OUT/res.tgz.part-"; ls -l "$OUT"; }
trap pack EXIT
{ date -u; nvidia-smi -L; ls -l .device_carry; } 2>&1 | tee "$RES/machine.txt"
for p in ${PARTS//,/ }; do
  [ -s "$p" ] || { echo "bundle part $p is missing (machine not warm from the first call?)" | tee -a "$RES/machine.txt"; exit 3; }
done
# INIT may name each candidate's own start with {shift}, e.g. /tmp/init_shift{shift}.
init_for() { local i=${INIT:-quantvla_core/assets/default_policy}; echo "${i//\{shift\}/$1}"; }
for shift in ${SHIFTS:-4 2}; do  # every start is checked before any training begins
  [ -s "$(init_for "$shift")/model.safetensors" ] || { echo "start policy $(init_for "$shift") is missing" | tee -a "$RES/machine.txt"; exit 3; }
done
for shift in ${SHIFTS:-4 2}; do
  mkdir -p "$RES/shift$shift"
  OUT=$RES/shift$shift RUN=/tmp/run_shift$shift SHIFT=$shift BATCH=${BATCH:-1024} LR=${LR:-1e-3} \
    THREADS=4 timeout $(( TRAIN_S + 90 )) bash scripts/train_default_gpu.sh "$PARTS" "$TRAIN_S" \
    "$(init_for "$shift")" > "$RES/train_shift$shift.log" 2>&1 &
done
while [ "$(jobs -r | wc -l)" -gt 0 ]; do sleep 30; echo "t=${SECONDS}s"; tail -n 1 "$RES"/train_shift*.log; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done
wait
echo "all done after ${SECONDS} s"
