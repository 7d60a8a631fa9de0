"""Closed loop in simulation: sim_bridge (Meta-World MT10, owner of /clock) and the policy node
with use_sim_time, both from config/sim_demo.yaml.

    ros2 launch quantvla_ros sim_demo.launch.py model:=/path/to/artifact \
        tasks:=reach-v3,push-v3 episodes_per_task:=5 results_path:=/tmp/sim.json
    ros2 topic echo /sim/episode_outcome    # one JSON outcome per episode

The bridge exits after the last episode; the launch then shuts down the policy node too.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    IncludeLaunchDescription,
    OpaqueFunction,
    RegisterEventHandler,
)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

ARGUMENTS = (
    ("model", "default", "policy: 'default', a preset, a model or quantized artifact directory"),
    ("params_file", "", "parameters YAML for both nodes; empty = <share>/config/sim_demo.yaml"),
    ("tasks", "", "comma-separated MT10 tasks; empty = the params file's list"),
    ("episodes_per_task", "", "episodes per task; empty = the params file's value"),
    ("max_steps", "", "steps per episode; empty = the params file's value"),
    ("real_time_factor", "", "0 = lockstep, 1 = wall-clock pace; empty = the params file's"),
    ("results_path", "", "summary JSON written at the end; empty = none"),
    ("device", "", "torch device of the policy (cpu, cuda); empty = the params file's value"),
)


def _nodes(context):
    arg = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    share = get_package_share_directory("quantvla_ros")
    params_file = arg["params_file"] or os.path.join(share, "config", "sim_demo.yaml")
    overrides = {}
    if arg["tasks"]:
        overrides["tasks"] = [t.strip() for t in arg["tasks"].split(",") if t.strip()]
    for name, cast in (("episodes_per_task", int), ("max_steps", int), ("real_time_factor", float)):
        if arg[name]:
            overrides[name] = cast(arg[name])
    if arg["results_path"]:
        overrides["results_path"] = arg["results_path"]
    bridge = Node(
        package="quantvla_ros",
        executable="sim_bridge",
        name="sim_bridge",
        output="screen",
        emulate_tty=True,
        parameters=[params_file, overrides],
    )
    policy = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "quantvla.launch.py")),
        launch_arguments={
            "model": arg["model"],
            "params_file": params_file,
            "device": arg["device"],
            "use_sim_time": "true",
            "autostart": "true",
        }.items(),
    )
    stop_with_bridge = RegisterEventHandler(
        OnProcessExit(target_action=bridge, on_exit=[EmitEvent(event=Shutdown(reason="sim_bridge finished"))])
    )
    return [bridge, policy, stop_with_bridge]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text) for name, default, text in ARGUMENTS]
        + [OpaqueFunction(function=_nodes)]
    )
