"""Serve a VLA policy as a managed ROS 2 node.

    ros2 launch quantvla_ros quantvla.launch.py model:=/path/to/artifact \
        camera_topics:=/cam_high/image_raw,/cam_wrist/image_raw/compressed use_sim_time:=true

Parameters come from `params_file` (default: the package's config/default.yaml); the launch
arguments below override it where given (empty = the params file's value). The shipped YAML
does not autostart: a lifecycle manager or `ros2 lifecycle set` configures and activates the
node, or autostart:=true makes it do so itself. dry_run:=true computes chunks and diagnostics
without publishing a trajectory (set it for the first runs on a robot).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

ARGUMENTS = (
    ("model", "", "preset name, model directory or quantized artifact directory; empty = the params file's value"),
    ("params_file", "", "parameters YAML; empty = <share>/quantvla_ros/config/default.yaml"),
    ("namespace", "", "namespace of the policy node (and of its relative topics)"),
    ("use_sim_time", "false", "follow /clock (Gazebo / Isaac Sim bridges)"),
    (
        "camera_topics",
        "",
        "comma-separated camera topics (a '/compressed' suffix selects "
        "CompressedImage); empty = the params file's value",
    ),
    ("device", "", "torch device (cpu, cuda, cuda:N); empty = the params file's value"),
    (
        "autostart",
        "",
        "true: configure + activate on start-up; empty = the params file's value "
        "(false in the shipped config/default.yaml)",
    ),
    ("dry_run", "", "true: compute and report chunks, publish no trajectory; empty = the params file's value"),
    ("log_level", "info", "ROS log level of the policy node"),
)


def _policy_node(context):
    arg = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    params_file = arg["params_file"] or os.path.join(
        get_package_share_directory("quantvla_ros"), "config", "default.yaml"
    )
    overrides = {"use_sim_time": arg["use_sim_time"].lower() in ("true", "1", "yes")}
    for flag in ("autostart", "dry_run"):  # only when given: the YAML's value otherwise
        if arg[flag]:
            overrides[flag] = arg[flag].lower() in ("true", "1", "yes")
    if arg["model"]:
        overrides["model"] = arg["model"]
    if arg["device"]:
        overrides["device"] = arg["device"]
    topics = [t.strip() for t in arg["camera_topics"].split(",") if t.strip()]
    if topics:
        overrides["camera_topics"] = topics
    return [
        LifecycleNode(
            package="quantvla_ros",
            executable="policy_node",
            name="policy_node",
            namespace=arg["namespace"],
            output="screen",
            emulate_tty=True,
            parameters=[params_file, overrides],
            arguments=["--ros-args", "--log-level", arg["log_level"]],
        )
    ]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text) for name, default, text in ARGUMENTS]
        + [OpaqueFunction(function=_policy_node)]
    )
