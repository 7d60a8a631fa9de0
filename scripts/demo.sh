#!/usr/bin/env bash
# The README's main job: the closed loop over ROS 2 with the QUANTIZED default policy.
# sim_bridge (Meta-World MT10 behind camera / joint-state / instruction topics, owner of /clock)
# and policy_node (QuantVLA W4A8 artifact of the committed default policy, use_sim_time) talk
# over DDS on loopback; one episode per MT10 task by default, then a success table.
#   bash scripts/demo.sh [MODEL]   MODEL defaults to default-w4a8 ('default' = the FP32 policy)
# More episodes / fewer tasks: SIM_EPISODES=3 SIM_TASKS=reach-v3,push-v3 bash scripts/demo.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec bash "$root/scripts/sim_demo.sh" "${1:-default-w4a8}"
