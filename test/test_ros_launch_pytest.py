"""Launch files run for real with launch_pytest (ROS 2 installs with launch / launch_ros).

launch, launch_ros and launch_pytest are not installable from PyPI, so this module skips
where they are missing; test_ros_policy_node.py covers the same scenarios by starting the
executables directly.
"""

import os
import threading
import time

import pytest

launch_pytest = pytest.importorskip("launch_pytest")
launch = pytest.importorskip("launch")
pytest.importorskip("launch_ros")
rclpy = pytest.importorskip("rclpy")

from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


@pytest.fixture(scope="module")
def loopback_domain():
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = (
        os.environ.get("ROS_DOMAIN_ID")  # the run's, else our own
        or str(100 + (os.getpid() * 13) % 100)
    )
    os.environ.setdefault(
        "FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(os.path.dirname(LAUNCH_DIR), "config", "fastdds_large_data.xml")
    )
    return int(os.environ["ROS_DOMAIN_ID"])


def _include(name, **args):
    return IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(LAUNCH_DIR, name)),
        launch_arguments={k: str(v) for k, v in args.items()}.items(),
    )


@launch_pytest.fixture
def demo_launch(loopback_domain):
    return launch.LaunchDescription(
        [
            _include("demo.launch.py", model="tiny", width=320, height=240, rate_hz=10.0),
            launch_pytest.actions.ReadyToTest(),
        ]
    )


def _collect(topic_type, topic, count, timeout_s):
    from rclpy.executors import SingleThreadedExecutor

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    node = rclpy.create_node("launch_test_listener", context=ctx)
    got, lock = [], threading.Lock()

    def keep(msg):
        with lock:
            got.append(msg)

    node.create_subscription(topic_type, topic, keep, 10)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end and len(got) < count:
            ex.spin_once(timeout_sec=0.1)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return got


@pytest.mark.launch(fixture=demo_launch)
def test_demo_launch_publishes_whole_chunks():
    from trajectory_msgs.msg import JointTrajectory

    chunks = _collect(JointTrajectory, "/joint_trajectory", 3, 60.0)
    assert len(chunks) >= 3
    assert all(len(c.points) == 8 and len(c.joint_names) == 4 for c in chunks)


@pytest.mark.launch(fixture=demo_launch)
def test_demo_launch_publishes_diagnostics():
    from diagnostic_msgs.msg import DiagnosticArray

    arrays = _collect(DiagnosticArray, "/diagnostics", 3, 30.0)
    names = {s.name for a in arrays for s in a.status}
    assert {"policy_node: policy", "policy_node: inputs", "policy_node: resources"} <= names


@launch_pytest.fixture
def policy_launch_without_camera(loopback_domain):
    return launch.LaunchDescription(
        [
            _include("quantvla.launch.py", model="tiny", namespace="robot1", camera_topics="/robot1/cam/image_raw"),
            launch_pytest.actions.ReadyToTest(),
        ]
    )


@pytest.mark.launch(fixture=policy_launch_without_camera)
def test_policy_launch_namespaces_and_reports_missing_camera():
    from diagnostic_msgs.msg import DiagnosticArray

    arrays = _collect(DiagnosticArray, "/diagnostics", 10, 40.0)
    policy = [s for a in arrays for s in a.status if s.name == "policy_node: policy"]
    assert policy and any(kv.value == "active" for s in policy for kv in s.values if kv.key == "lifecycle_state")
    inputs = [s for a in arrays for s in a.status if s.name == "policy_node: inputs"]
    assert any(kv.value == "/robot1/cam/image_raw" for s in inputs for kv in s.values)
