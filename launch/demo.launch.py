"""Demo without a robot: the synthetic camera (rendered scenes, instruction, joint states)
feeding the policy node, which autostarts and publishes action chunks and /diagnostics.

    ros2 launch quantvla_ros demo.launch.py model:=tiny
    ros2 topic echo /joint_trajectory      # whole chunks
    ros2 topic echo /diagnostics           # latency percentiles, rate, memory, power

Large best-effort images between processes on one machine need a Fast DDS shared-memory
segment larger than the 512 KiB default: export FASTDDS_DEFAULT_PROFILES_FILE pointing at the
repository's config/fastdds_large_data.xml (scripts/camera_demo.sh does).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("quantvla_ros")
    params_file = os.path.join(share, "config", "default.yaml")
    args = [
        DeclareLaunchArgument("model", default_value="tiny", description="policy model"),
        DeclareLaunchArgument("width", default_value="640", description="camera width"),
        DeclareLaunchArgument("height", default_value="480", description="camera height"),
        DeclareLaunchArgument("rate_hz", default_value="30.0", description="camera rate"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="follow /clock"),
    ]
    camera = Node(
        package="quantvla_ros",
        executable="synthetic_camera",
        name="synthetic_camera",
        output="screen",
        parameters=[
            params_file,
            {
                "width": LaunchConfiguration("width"),
                "height": LaunchConfiguration("height"),
                "rate_hz": LaunchConfiguration("rate_hz"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
            },
        ],
    )
    policy = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "quantvla.launch.py")),
        launch_arguments={
            "model": LaunchConfiguration("model"),
            "params_file": params_file,
            "use_sim_time": LaunchConfiguration("use_sim_time"),
            "autostart": "true",
        }.items(),
    )
    return LaunchDescription(args + [camera, policy])
