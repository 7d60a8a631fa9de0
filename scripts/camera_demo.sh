#!/usr/bin/env bash
# The README's main-job command for the ROS 2 side: start the synthetic camera and the policy
# node (model: $1, default tiny), print the action chunks and /diagnostics it publishes for a
# few seconds ($DEMO_SECONDS, default 6), stop both, exit 0 when chunks arrived.
# DDS stays on loopback in a domain of its own; large camera frames go through shared memory
# (config/fastdds_large_data.xml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ros_env.sh"
model=${1:-tiny}  # the tiny preset keeps 30 Hz on 2 cores; `camera_demo.sh default` runs the committed policy
seconds=${DEMO_SECONDS:-6}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
echo "[demo] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, loopback only; model $model; listening ${seconds}s"
$py -m quantvla_ros.synthetic_camera --ros-args --params-file config/default.yaml &
pids+=($!)
$py -m quantvla_ros.policy_node --ros-args --params-file config/default.yaml \
  -p autostart:=true -p "model:=$model" &
pids+=($!)
$py -m quantvla_ros.chunk_monitor --wait-active 90 --duration "$seconds" --print-every 10
