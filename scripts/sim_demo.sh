#!/usr/bin/env bash
# Closed loop in simulation over ROS 2: sim_bridge (Meta-World MT10 behind ROS topics, owner of
# /clock) and policy_node (use_sim_time) from config/sim_demo.yaml. Prints one line per episode
# and a success table, writes the summary JSON, exits with the bridge's status.
#   scripts/sim_demo.sh [MODEL]      MODEL: default (committed policy), a preset, a model or
#                                    quantized artifact directory
# Environment: SIM_TASKS (comma-separated MT10 tasks; default: all 10), SIM_EPISODES (per task,
# default 1), SIM_MAX_STEPS (default 200), SIM_RESULTS (default runs/sim_demo/summary.json),
# SIM_DEVICE (cpu | cuda). DDS stays on loopback in a domain of its own.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ros_env.sh"
export MUJOCO_GL=${MUJOCO_GL:-egl}
model=${1:-default}
results=${SIM_RESULTS:-runs/sim_demo/summary.json}
bridge_args=(-p "results_path:=$results")
[ -n "${SIM_TASKS:-}" ] && bridge_args+=(-p "tasks:=[${SIM_TASKS}]")
[ -n "${SIM_EPISODES:-}" ] && bridge_args+=(-p "episodes_per_task:=${SIM_EPISODES}")
[ -n "${SIM_MAX_STEPS:-}" ] && bridge_args+=(-p "max_steps:=${SIM_MAX_STEPS}")
policy_args=(-p "model:=$model")
[ -n "${SIM_DEVICE:-}" ] && policy_args+=(-p "device:=${SIM_DEVICE}")
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
echo "[sim_demo] ROS_DOMAIN_ID=$ROS_DOMAIN_ID, loopback only; policy $model; results $results"
$py -m quantvla_ros.policy_node --ros-args --params-file config/sim_demo.yaml "${policy_args[@]}" &
pid=$!
$py -m quantvla_ros.sim_bridge --ros-args --params-file config/sim_demo.yaml "${bridge_args[@]}"
