"""synthetic_camera over real DDS (raw + compressed topics, latched instruction, joint
states), and the README demo command end to end (slow)."""

import os
import subprocess
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import (
    DurabilityPolicy,
    QoSProfile,
    ReliabilityPolicy,  # noqa: E402
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from quantvla_ros.image_conversion import compressed_to_rgb, image_to_rgb  # noqa: E402
from quantvla_ros.node_process import start_node, stop_node, write_params  # noqa: E402
from quantvla_ros.synthetic_camera import render_scene  # noqa: E402
from conftest import loopback_ros_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ros_env():
    with loopback_ros_env(100 + (os.getpid() * 7 + 31) % 100) as domain:
        yield domain


def test_render_scene_shows_the_objects_the_instruction_names():
    img = render_scene(160, 120, 0.0)
    assert img.shape == (120, 160, 3) and img.dtype == np.uint8
    red = (img[:, :, 0] > 200) & (img[:, :, 1] < 60) & (img[:, :, 2] < 60)
    green = (img[:, :, 1] > 160) & (img[:, :, 0] < 60)
    assert red.sum() > 50 and green.sum() > 50
    assert not np.array_equal(img, render_scene(160, 120, 2.0))  # the blocks move
    assert not np.array_equal(img, render_scene(160, 120, 0.0, view=1))  # views differ


def test_synthetic_camera_publishes_raw_compressed_instruction_and_joints(ros_env, tmp_path):
    params = write_params(
        str(tmp_path / "p.yaml"),
        {
            "synthetic_camera": {
                "camera_topics": ["/sc/cam0/image_raw", "/sc/cam1/image_raw/compressed"],
                "encoding": "bgr8",
                "compressed_format": "png",
                "width": 160,
                "height": 120,
                "rate_hz": 20.0,
                "instruction": "stack the blue block",
                "instruction_topic": "/sc/instruction",
                "joint_state_topic": "/sc/joints",
                "joint_names": ["a", "b", "c"],
            }
        },
    )
    proc = start_node("synthetic_camera", params, str(tmp_path / "cam.log"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_env)
    node = rclpy.create_node("sc_listener", context=ctx)
    got = {"raw": [], "png": [], "joints": [], "instruction": []}
    lock = threading.Lock()

    def keep(key):
        def cb(msg):
            with lock:
                got[key].append(msg)

        return cb

    node.create_subscription(Image, "/sc/cam0/image_raw", keep("raw"), qos_profile_sensor_data)
    node.create_subscription(CompressedImage, "/sc/cam1/image_raw/compressed", keep("png"), qos_profile_sensor_data)
    node.create_subscription(JointState, "/sc/joints", keep("joints"), qos_profile_sensor_data)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and min(len(got["raw"]), len(got["png"]), len(got["joints"])) < 3:
            ex.spin_once(timeout_sec=0.05)
        # a late joiner still gets the instruction (RELIABLE + TRANSIENT_LOCAL)
        latched = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        node.create_subscription(String, "/sc/instruction", keep("instruction"), latched)
        end = time.monotonic() + 10
        while time.monotonic() < end and not got["instruction"]:
            ex.spin_once(timeout_sec=0.05)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
        stop_node(proc)
    assert got["instruction"] and got["instruction"][0].data == "stack the blue block"
    raw = got["raw"][-1]
    assert raw.encoding == "bgr8" and (raw.width, raw.height) == (160, 120)
    rgb = image_to_rgb(raw)
    red = (rgb[:, :, 0] > 200) & (rgb[:, :, 1] < 60) & (rgb[:, :, 2] < 60)
    assert red.sum() > 50  # bgr8 converted back: the red block is red
    png = compressed_to_rgb(got["png"][-1])
    assert png.shape == (120, 160, 3)
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in got["raw"]}
    assert any((m.header.stamp.sec, m.header.stamp.nanosec) in stamps for m in got["png"])
    js = got["joints"][-1]
    assert list(js.name) == ["a", "b", "c"] and len(js.position) == 3


@pytest.mark.slow
def test_demo_command_prints_chunks_and_diagnostics(ros_env):
    env = dict(os.environ, DEMO_SECONDS="3")
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "camera_demo.sh")], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "chunk   1: 8 points x 4 joints" in out.stdout
    assert "diag [" in out.stdout and "policy_node: policy: active" in out.stdout
    assert "received 0 action" not in out.stdout
