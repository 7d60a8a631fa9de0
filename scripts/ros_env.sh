# Sourced by every script that starts ROS 2 here (never by the nodes: robots need the network).
# Sets up ./.venv, keeps DDS discovery on loopback in a domain of its own, and gives camera-sized
# messages Fast DDS's large shared-memory segment (config/fastdds_large_data.xml).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_venv.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${DEMO_ROS_DOMAIN_ID:-$(( (RANDOM % 90) + 110 ))}
export FASTDDS_DEFAULT_PROFILES_FILE=${FASTDDS_DEFAULT_PROFILES_FILE:-$root/config/fastdds_large_data.xml}
export PYTHONUNBUFFERED=1 RCUTILS_COLORIZED_OUTPUT=0
py=.venv/bin/python
