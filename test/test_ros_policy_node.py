"""policy_node over real DDS: the executable runs as a subprocess with a params file; this test
process publishes cameras (best effort), instruction (latched) and joint states, and reads the
JointTrajectory chunks, /diagnostics and the lifecycle services.

Two node processes per run: one autostarted with the default single-threaded executor (happy
path, every bad input, live parameters), one with executor multi_threaded driven through
lifecycle change_state (a missing and a corrupt model, a saved model directory, use_sim_time).
"""

import math
import os
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,  # noqa: E402
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from quantvla_ros.diagnostics import level_of, status_values  # noqa: E402
from quantvla_ros.image_conversion import rgb_to_compressed, rgb_to_image  # noqa: E402
from quantvla_ros.node_process import start_node, stop_node, write_params  # noqa: E402
from quantvla_ros.synthetic_camera import render_scene  # noqa: E402
from conftest import loopback_ros_env  # noqa: E402

LATCHED = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
JOINTS = ["shoulder", "elbow", "wrist", "gripper"]
HORIZON, DT = 8, 0.05
# The node's stamp_tolerance_s here: camera frames further apart than this are not one set.
STAMP_TOLERANCE_S = 0.02
# How much later than a timeout a test looks: the input is then older than the timeout for sure
# (the node's clock and this process's sleep differ by scheduling jitter, not by more).
TIMEOUT_MARGIN_S = 0.1
# send_pair publishes camera1 this long before camera0 (the reference camera), so the partner
# frame is usually at the node first; a reference arriving first is still matched on the
# partner's arrival, but is counted as an unmatched set meanwhile. DDS orders nothing across
# topics, so only time can make this order likely.
PARTNER_LEAD_S = 0.005


def wait_past(timeout_s: float) -> None:
    """Let real time pass beyond a node timeout (an input going stale is what such a test is
    about: no event can stand in for the clock)."""
    time.sleep(timeout_s + TIMEOUT_MARGIN_S)


FASTDDS_PROFILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "fastdds_large_data.xml"
)  # the tiny preset's horizon; action_dt given to the node


class Harness:
    """A test-side rclpy node in its own context, spun in a background thread."""

    def __init__(self, domain_id: int, prefix: str):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain_id)
        self.node = rclpy.create_node(f"test_harness_{prefix}", context=self.ctx)
        self.lock = threading.Lock()
        self.trajectories: list[JointTrajectory] = []
        self.diags: dict[str, object] = {}
        n = self.node
        n.create_subscription(JointTrajectory, f"/{prefix}/traj", self._on_traj, 50)
        n.create_subscription(DiagnosticArray, f"/{prefix}/diagnostics", self._on_diag, 50)
        self.cam0 = n.create_publisher(Image, f"/{prefix}/cam0/image_raw", qos_profile_sensor_data)
        self.cam1 = n.create_publisher(CompressedImage, f"/{prefix}/cam1/image_raw/compressed", qos_profile_sensor_data)
        self.instruction = n.create_publisher(String, f"/{prefix}/instruction", LATCHED)
        self.joints = n.create_publisher(JointState, f"/{prefix}/joint_states", 10)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.rgb = render_scene(64, 48, 0.0)
        self.jpeg = bytes(rgb_to_compressed(self.rgb, "jpeg").data)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)

    def _on_traj(self, msg):
        with self.lock:
            self.trajectories.append(msg)

    def _on_diag(self, msg):
        with self.lock:
            for s in msg.status:
                self.diags[s.name.split(": ")[-1]] = s

    # --- inputs
    def now(self):
        return self.node.get_clock().now()

    def stamp(self, offset_s=0.0):
        t = self.now().nanoseconds + int(offset_s * 1e9)
        msg = self.now().to_msg()
        msg.sec, msg.nanosec = t // 10**9, t % 10**9
        return msg

    def image(self, stamp, encoding="rgb8"):
        msg = rgb_to_image(self.rgb, encoding)
        msg.header.stamp = stamp
        return msg

    def jpeg_msg(self, stamp, data=None):
        msg = CompressedImage()
        msg.format, msg.data, msg.header.stamp = "jpeg", data if data is not None else self.jpeg, stamp
        return msg

    def send_pair(self, stamp=None, cam0=None, cam1=None):
        stamp = stamp or self.stamp()
        if cam1 is not False:  # False: a one-camera node
            self.cam1.publish(cam1 if cam1 is not None else self.jpeg_msg(stamp))
            time.sleep(PARTNER_LEAD_S)
        self.cam0.publish(cam0 if cam0 is not None else self.image(stamp))
        return stamp

    def send_joints(self, positions=(0.1, -0.2, 0.3, 0.0), names=None):
        js = JointState()
        js.header.stamp = self.stamp()
        js.name = list(names) if names is not None else list(JOINTS)
        js.position = [float(p) for p in positions]
        self.joints.publish(js)

    # --- outputs
    def trajectory_for(self, stamp):
        with self.lock:
            for msg in self.trajectories:
                if (msg.header.stamp.sec, msg.header.stamp.nanosec) == (stamp.sec, stamp.nanosec):
                    return msg
        return None

    def act(self, timeout_s=15.0, joints=False, log=None):
        """Send valid pairs until one produces a trajectory; returns (stamp, trajectory).
        joints=True sends a fresh joint state with every pair (for short state timeouts);
        log: the node's log file, whose tail a failure then shows."""
        end = time.monotonic() + timeout_s
        sent = []
        while time.monotonic() < end:
            if joints:
                self.send_joints()
            sent.append(self.send_pair())
            wait_end = time.monotonic() + 0.4
            while time.monotonic() < wait_end:
                for s in sent:
                    msg = self.trajectory_for(s)
                    if msg is not None:
                        return s, msg
                time.sleep(0.01)
        tail = "".join(open(log).readlines()[-15:]) if log else ""
        raise AssertionError(
            f"no trajectory came back for valid inputs in {timeout_s} s "
            f"({len(sent)} pairs sent){'; node log tail:' + chr(10) + tail if tail else ''}"
        )

    def values(self, status):
        with self.lock:
            s = self.diags.get(status)
        return status_values(s) if s is not None else {}

    def status(self, status):
        with self.lock:
            return self.diags.get(status)

    def wait_for(self, predicate, timeout_s=10.0, what="condition"):
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; inputs: {self.values('inputs')}")

    def counter(self, key):
        return int(self.values("inputs").get(key, "0"))

    def refused_after(self, key, send):
        """Call send() and wait until the node counted `key` again: it has taken (and refused)
        what was sent, so asserting that no trajectory came needs no fixed sleep."""
        before = self.counter(key)
        out = send()
        self.wait_for(lambda: self.counter(key) > before, 5.0, f"{key} counted")
        return out

    def call(self, srv_type, name, request, timeout_s=20.0):
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout_s), f"service {name} missing"
            future = client.call_async(request)
            end = time.monotonic() + timeout_s
            while not future.done() and time.monotonic() < end:
                time.sleep(0.01)
            assert future.done(), f"service {name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def set_params(self, node, **params):
        req = SetParameters.Request()
        req.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in params.items()]
        return self.call(SetParameters, f"/{node}/set_parameters", req).results


def _domain_id(offset):
    """The run's ROS_DOMAIN_ID (given by CI / a developer, else conftest's per-run default);
    a pid-derived one only when none is set at all."""
    given = os.environ.get("ROS_DOMAIN_ID")
    if given:
        return int(given)
    return 100 + (os.getpid() * 7 + offset) % 100


def _node_params(prefix, **over):
    params = {
        "model": "tiny",
        "camera_topics": [f"/{prefix}/cam0/image_raw", f"/{prefix}/cam1/image_raw/compressed"],
        "instruction_topic": f"/{prefix}/instruction",
        "joint_state_topic": f"/{prefix}/joint_states",
        "trajectory_topic": f"/{prefix}/traj",
        "diagnostics_topic": f"/{prefix}/diagnostics",
        "joint_names": JOINTS,
        "action_dt": DT,
        "diagnostics_period_s": 0.2,
        "log_quiet_s": 60.0,
        "stamp_tolerance_s": STAMP_TOLERANCE_S,
        "image_timeout_s": 2.0,
        "joint_state_timeout_s": 0.0,
        "warmup_count": 1,
        "max_image_pixels": 1_000_000,
        "num_threads": 1,
    }
    params.update(over)
    return params


@pytest.fixture(scope="module")
def ros_env():
    """Loopback-only discovery in a domain of this run's own (set here, never in the node)."""
    with loopback_ros_env(_domain_id(0)) as domain:
        yield domain


@pytest.fixture(scope="module")
def active_node(ros_env, tmp_path_factory):
    """An autostarted node; the instruction is latched BEFORE it starts (late joiner)."""
    tmp = tmp_path_factory.mktemp("node_a")
    h = Harness(ros_env, "qa")
    h.instruction.publish(String(data="pick up the red block"))
    # Non-default process settings, so the log shows they travel from the YAML into main().
    params = write_params(
        str(tmp / "params.yaml"),
        {"policy_node": _node_params("qa", autostart=True, gil_switch_interval_ms=0.5, malloc_mmap_threshold_mib=8)},
    )
    log = str(tmp / "node.log")
    proc = start_node("policy_node", params, log)
    try:
        h.wait_for(
            lambda: h.values("policy").get("lifecycle_state") == "active",
            60.0,
            "the node to autostart (configure + activate)",
        )
        h.send_joints()
        yield h, proc, log
    finally:
        rc = stop_node(proc)
        h.close()
    assert rc is not None


def _log_lines(log, needle):
    with open(log) as f:
        return [line for line in f if needle in line]


def test_chunk_arrives_with_joint_names_points_timing_and_stamp(active_node):
    h, proc, _ = active_node
    assert h.cam0.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT  # camera-style QoS
    stamp, msg = h.act()
    assert list(msg.joint_names) == JOINTS
    assert len(msg.points) == HORIZON
    for k, point in enumerate(msg.points):
        t = point.time_from_start.sec + point.time_from_start.nanosec * 1e-9
        assert t == pytest.approx(k * DT, abs=1e-9)
        assert len(point.positions) == len(JOINTS)
        assert all(math.isfinite(v) for v in point.positions)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (stamp.sec, stamp.nanosec)
    h.wait_for(
        lambda: h.values("inputs")["instruction"] == "pick up the red block",
        5.0,
        "the instruction latched before the node started (late joiner)",
    )
    assert proc.poll() is None


def test_diagnostics_carry_every_stage_and_resource_field(active_node):
    h, _, _ = active_node
    for _ in range(3):
        h.act()
    h.wait_for(lambda: int(h.values("policy").get("latency_samples", "0")) >= 3, 5.0, "samples")
    v = h.values("policy")
    for stage in ("preprocess", "vision_prefix", "denoise", "postprocess", "total", "node_overhead", "end_to_end"):
        p50, p90, p99 = (float(v[f"{stage}_ms_p{p}"]) for p in (50, 90, 99))
        assert p50 <= p90 <= p99, stage
    assert float(v["total_ms_p50"]) > 0 and float(v["inference_rate_hz"]) >= 0
    assert v["scheme"] == "fp32" and int(v["weight_bytes"]) > 100_000
    assert int(v["chunks_published"]) >= 3
    r = h.values("resources")
    assert r["power_source"].split(":")[0] in ("unavailable", "nvml", "ina3221", "rapl")
    assert "energy_per_chunk_j" in r and float(r["process_rss_mib"]) > 50
    assert "gpu_memory_allocated_mib" in r
    i = h.values("inputs")
    assert int(i["camera0_received"]) >= 3 and int(i["camera1_received"]) >= 3


def _raw(h, stamp, **fields):
    msg = h.image(stamp)
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


BAD_IMAGES = {
    "unsupported_encoding": lambda h, s: _raw(h, s, encoding="yuv422"),
    "size_mismatch": lambda h, s: _raw(h, s, step=10),
    "truncated": lambda h, s: _raw(h, s, data=bytes(h.image(s).data)[:-100]),
    "empty": lambda h, s: _raw(h, s, width=0, height=0, step=0, data=b""),
    "too_large": lambda h, s: _raw(h, s, width=100000, height=100000, step=300000),
}


@pytest.mark.parametrize("code", list(BAD_IMAGES))
def test_bad_raw_image_is_refused_counted_and_logged_once(active_node, code):
    h, proc, log = active_node
    before = h.counter(f"invalid.camera0.{code}")
    stamps = []
    for i in range(3):
        s = h.stamp()
        stamps.append(s)
        h.send_pair(s, cam0=BAD_IMAGES[code](h, s))
    h.wait_for(lambda: h.counter(f"invalid.camera0.{code}") > before, 5.0, f"{code} counted")
    h.wait_for(
        lambda: level_of(h.status("inputs")) == 2 and code in h.status("inputs").message,
        2.0,
        "an ERROR naming the failure class",
    )
    h.act()  # still alive and acting on valid input
    assert all(h.trajectory_for(s) is None for s in stamps)
    assert proc.poll() is None
    assert len(_log_lines(log, "(topic /qa/cam0/image_raw)")) >= 1
    logged = [line for line in _log_lines(log, "camera0:") if BAD_IMAGES_TEXT[code] in line]
    assert len(logged) == 1, logged  # one line per burst, not per message


BAD_IMAGES_TEXT = {
    "unsupported_encoding": "yuv422",
    "size_mismatch": "step 10",
    "truncated": "bytes; step",
    "empty": "is 0x0",
    "too_large": "100000x100000",
}


def test_really_large_image_is_refused(active_node):
    h, proc, _ = active_node
    before = h.counter("invalid.camera0.too_large")
    big = rgb_to_image(np.zeros((800, 1300, 3), np.uint8)[:, :, :1].repeat(3, 2), "mono8")
    stamps = []
    for _ in range(3):
        s = h.stamp()
        big.header.stamp = s
        stamps.append(h.send_pair(s, cam0=big))
    h.wait_for(lambda: h.counter("invalid.camera0.too_large") > before, 5.0, "1300x800 refused")
    h.act()
    assert all(h.trajectory_for(s) is None for s in stamps) and proc.poll() is None


def test_corrupt_jpeg_on_compressed_camera_gives_no_action(active_node):
    h, proc, _ = active_node
    before = h.counter("invalid.camera1.corrupt")
    unmatched = int(h.values("inputs")["unmatched_frame_sets"])
    wait_past(STAMP_TOLERANCE_S)  # older valid camera1 frames are now out of stamp_tolerance_s
    stamps = [h.send_pair(cam1=h.jpeg_msg(h.stamp(), h.jpeg[:100] + bytes(200))) for _ in range(3)]
    h.wait_for(lambda: h.counter("invalid.camera1.corrupt") > before, 5.0, "corrupt jpeg counted")
    h.wait_for(
        lambda: int(h.values("inputs")["unmatched_frame_sets"]) > unmatched,
        5.0,
        "camera0 frames without a camera1 partner counted as unmatched",
    )
    # The valid camera0 frames of those stamps may still pair with a valid camera1 frame
    # sent within stamp_tolerance_s; keep the next valid pair further away than that.
    wait_past(STAMP_TOLERANCE_S)
    h.act()
    assert all(h.trajectory_for(s) is None for s in stamps) and proc.poll() is None


def test_old_and_out_of_order_stamps(active_node):
    h, proc, _ = active_node
    old = h.stamp(-10.0)
    h.send_pair(old)
    h.wait_for(lambda: h.counter("stale.camera0.stamp_old") > 0, 5.0, "old stamp counted")
    assert h.trajectory_for(old) is None
    newest, _ = h.act()
    earlier = h.stamp(-0.5)
    h.send_pair(earlier)
    h.wait_for(lambda: h.counter("invalid.camera0.stamp_out_of_order") > 0, 5.0, "out of order")
    assert h.trajectory_for(earlier) is None and proc.poll() is None


@pytest.mark.parametrize(
    "positions,names,code",
    [
        ((0.1, math.nan, 0.0, 0.0), None, "joint_state_nonfinite"),
        ((0.1, math.inf, 0.0, 0.0), None, "joint_state_nonfinite"),
        ((0.1, 0.2), ["a", "b"], "joint_state_length"),
    ],
)
def test_bad_joint_state_stops_actions_until_a_valid_one(active_node, positions, names, code):
    h, proc, _ = active_node
    before = h.counter(f"invalid.joint_state.{code}")
    h.send_joints(positions, names)
    h.wait_for(lambda: h.counter(f"invalid.joint_state.{code}") > before, 5.0, code)
    stamps = h.refused_after("stale.joint_state.missing", lambda: [h.send_pair() for _ in range(3)])
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.send_joints()
    h.act()
    assert proc.poll() is None


@pytest.mark.parametrize(
    "text,code",
    [
        ("", "instruction_empty"),
        ("go " * 400, "instruction_too_long"),
        ("pick \u202eup the cup", "instruction_bad_char"),
        ("pick\x07up", "instruction_bad_char"),
    ],
)
def test_bad_instruction_stops_actions_until_a_valid_one(active_node, text, code):
    h, proc, log = active_node
    before = h.counter(f"invalid.instruction.{code}")
    h.instruction.publish(String(data=text))
    h.wait_for(lambda: h.counter(f"invalid.instruction.{code}") > before, 5.0, code)
    stamps = h.refused_after("stale.instruction.missing", lambda: [h.send_pair() for _ in range(3)])
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.instruction.publish(String(data="pick up the red block \U0001f7e5 \u00e9"))  # odd but valid
    h.act()
    h.wait_for(lambda: h.values("inputs")["instruction"].endswith("\u00e9"), 5.0, "instruction")
    assert proc.poll() is None


def test_live_parameters_limits_clipping_dry_run_and_refusals(active_node):
    h, _, _ = active_node
    lim = 0.05
    res = h.set_params("policy_node", action_min=[-lim] * 4, action_max=[lim] * 4)
    assert all(r.successful for r in res)
    _, msg = h.act()
    values = np.array([p.positions for p in msg.points])
    assert values.min() >= -lim - 1e-9 and values.max() <= lim + 1e-9
    assert np.isclose(np.abs(values), lim).any()  # the tiny model's raw actions exceed 0.05
    h.wait_for(lambda: int(h.values("policy")["chunks_clipped"]) >= 1, 5.0, "clip counted")
    assert all(r.successful for r in h.set_params("policy_node", clip_actions=False))
    stamps = [h.send_pair() for _ in range(3)]
    h.wait_for(lambda: int(h.values("policy")["chunks_refused_limits"]) >= 1, 5.0, "refusal")
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.set_params("policy_node", action_min=[-1e6] * 4, action_max=[1e6] * 4, clip_actions=True, dry_run=True)
    with h.lock:
        received = len(h.trajectories)
    h.wait_for(lambda: int(h.values("policy")["chunks_published"]) >= received, 5.0, "settled")
    computed = int(h.values("policy")["chunks_computed"])
    published = int(h.values("policy")["chunks_published"])
    stamps = [h.send_pair() for _ in range(3)]
    h.wait_for(lambda: int(h.values("policy")["chunks_computed"]) > computed, 5.0, "dry run chunk")
    assert int(h.values("policy")["chunks_published"]) == published  # the node's own count
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.set_params("policy_node", dry_run=False)
    res = h.set_params("policy_node", model="other")
    assert not res[0].successful and "unconfigured" in res[0].reason
    res = h.set_params("policy_node", chunk_aggregation="average")
    assert not res[0].successful and "weighted_average" in res[0].reason
    res = h.set_params("policy_node", action_min=[-1.0] * 3)
    assert not res[0].successful and "4 action dimensions" in res[0].reason
    assert not h.set_params("policy_node", diagnostics_period_s=0.5)[0].successful  # read-only


def test_instruction_and_joint_state_watchdogs(active_node):
    h, proc, _ = active_node
    timeout_s = 0.3
    assert all(r.successful for r in h.set_params("policy_node", instruction_timeout_s=timeout_s))
    wait_past(timeout_s)  # the latched instruction is now older than the timeout
    stamps = [h.send_pair() for _ in range(2)]
    h.wait_for(lambda: h.counter("stale.instruction.stale") > 0, 5.0, "stale instruction")
    assert level_of(h.status("inputs")) >= 1  # WARN (ERROR if an invalid input is also recent)
    assert "stale.instruction.stale" in h.status("inputs").message
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.set_params("policy_node", instruction_timeout_s=0.0)
    h.act()
    h.set_params("policy_node", joint_state_timeout_s=timeout_s)
    wait_past(timeout_s)  # the last joint state is now older than the timeout
    stamps = [h.send_pair() for _ in range(2)]
    h.wait_for(lambda: h.counter("stale.joint_state.stale") > 0, 5.0, "stale joint state")
    assert all(h.trajectory_for(s) is None for s in stamps)
    h.act(joints=True)  # fresh states within the timeout: it acts again
    h.set_params("policy_node", joint_state_timeout_s=0.0)
    assert proc.poll() is None


def test_replan_rate_keeps_newest_frame_and_callbacks_keep_running(active_node):
    h, _, _ = active_node
    rate_hz, frame_period_s = 2.0, 0.05  # frames at 20 Hz into a node that may act at 2 Hz
    assert all(r.successful for r in h.set_params("policy_node", replan_rate_hz=rate_hz))
    # The limiter spaces inferences 1 / rate_hz apart from the last one (of an earlier test);
    # a full period must pass so that it counts from a finished inference, not from that one.
    wait_past(1.0 / rate_hz)
    before = h.values("inputs")
    with h.lock:
        n_traj = len(h.trajectories)
    t0 = time.monotonic()
    for _ in range(30):  # a camera stream: real time between frames is the point
        h.send_pair()
        time.sleep(frame_period_s)
    elapsed = time.monotonic() - t0
    time.sleep(1.0 / rate_hz)  # the newest frame held by the limiter is run one period later
    h.set_params("policy_node", replan_rate_hz=0.0)
    with h.lock:
        chunks = len(h.trajectories) - n_traj
    assert 1 <= chunks <= math.ceil((elapsed + 1.0 / rate_hz) * rate_hz) + 1  # rate_hz over the window
    h.wait_for(
        lambda: int(h.values("inputs")["camera0_received"]) >= int(before["camera0_received"]) + 25,
        5.0,
        "every frame received",
    )
    assert int(h.values("inputs")["camera0_dropped"]) >= int(before["camera0_dropped"]) + 20


def test_weighted_average_blends_overlap_aligned_by_stamp(active_node):
    h, _, _ = active_node
    h.set_params("policy_node", chunk_aggregation="latest_only")
    _, raw = h.act()  # same image/state/instruction/seed every time: the model output is fixed
    raw = np.array([p.positions for p in raw.points])
    assert all(r.successful for r in h.set_params("policy_node", chunk_aggregation="weighted_average"))
    wait_past(HORIZON * DT)  # the chunk has played out: the next one has nothing to blend with
    s1 = h.send_pair()
    h.wait_for(lambda: h.trajectory_for(s1) is not None, 5.0, "first chunk")
    first = h.trajectory_for(s1)
    np.testing.assert_allclose([p.positions for p in first.points], raw, rtol=1e-5, atol=1e-6)
    t1 = s1.sec + s1.nanosec * 1e-9
    s2 = h.stamp()
    t2 = t1 + 2 * DT  # two steps later: old steps 2.. overlap new steps 0..
    s2.sec, s2.nanosec = int(t2), int(round((t2 - int(t2)) * 1e9))
    h.send_pair(s2)
    h.wait_for(lambda: h.trajectory_for(s2) is not None, 5.0, "second chunk")
    second = np.array([p.positions for p in h.trajectory_for(s2).points])
    expect = raw.copy()
    expect[: HORIZON - 2] = 0.7 * raw[: HORIZON - 2] + 0.3 * raw[2:]
    np.testing.assert_allclose(second, expect, rtol=1e-5, atol=1e-6)
    h.set_params("policy_node", chunk_aggregation="latest_only")


def test_stale_joint_state_gives_no_action_even_when_not_required(active_node):
    """require_joint_state false feeds zeros only before any state came; a state that came and
    went stale is refused like on the required path (docs: stale joint states give no action)."""
    h, proc, _ = active_node
    timeout_s = 0.5
    assert all(
        r.successful for r in h.set_params("policy_node", require_joint_state=False, joint_state_timeout_s=timeout_s)
    )
    try:
        h.act(joints=True)
        before = h.counter("stale.joint_state.stale")
        wait_past(timeout_s)  # the last joint state is now older than the timeout
        stamps = [h.send_pair() for _ in range(2)]
        h.wait_for(
            lambda: h.counter("stale.joint_state.stale") > before,
            5.0,
            "a stale joint state refused although not required",
        )
        assert all(h.trajectory_for(s) is None for s in stamps)
        h.act(joints=True)  # a fresh state makes it act again
    finally:
        h.set_params("policy_node", require_joint_state=True, joint_state_timeout_s=0.0)
    assert proc.poll() is None


def test_limits_apply_to_the_blended_chunk(active_node):
    """A chunk published without limits, then limits tightened: the weighted_average blend of
    the (clipped) new chunk with the old tail must still be inside the limits."""
    h, _, _ = active_node
    h.set_params(
        "policy_node", chunk_aggregation="latest_only", clip_actions=True, action_min=[-1e6] * 4, action_max=[1e6] * 4
    )
    _, raw = h.act()  # the fixed model output (same inputs and seed every time)
    raw = np.array([p.positions for p in raw.points])
    # a limit at which blending the clipped new chunk with the unclipped old tail leaves it
    lim = next(
        (
            f * np.abs(raw).max()
            for f in (0.9, 0.7, 0.5, 0.3, 0.1)
            if (
                np.abs(0.7 * np.clip(raw[: HORIZON - 2], -f * np.abs(raw).max(), f * np.abs(raw).max()) + 0.3 * raw[2:])
                > f * np.abs(raw).max() + 1e-4
            ).any()
        ),
        None,
    )
    assert lim is not None, "no limit separates blend-then-clip from clip-then-blend"
    try:
        assert all(r.successful for r in h.set_params("policy_node", chunk_aggregation="weighted_average"))
        wait_past(HORIZON * DT)  # the chunk has played out: the next one has nothing to blend with
        s1 = h.send_pair()
        h.wait_for(lambda: h.trajectory_for(s1) is not None, 5.0, "unlimited first chunk")
        np.testing.assert_allclose([p.positions for p in h.trajectory_for(s1).points], raw, rtol=1e-5, atol=1e-6)
        assert all(r.successful for r in h.set_params("policy_node", action_min=[-lim] * 4, action_max=[lim] * 4))
        t2 = s1.sec + s1.nanosec * 1e-9 + 2 * DT  # old steps 2.. overlap new steps 0..
        s2 = h.stamp()
        s2.sec, s2.nanosec = int(t2), int(round((t2 - int(t2)) * 1e9))
        h.send_pair(s2)
        h.wait_for(lambda: h.trajectory_for(s2) is not None, 5.0, "blended chunk")
        second = np.array([p.positions for p in h.trajectory_for(s2).points])
        expect = raw.copy()
        expect[: HORIZON - 2] = 0.7 * raw[: HORIZON - 2] + 0.3 * raw[2:]
        expect = np.clip(expect, -lim, lim)
        assert np.abs(second).max() <= lim * (1 + 1e-6)
        np.testing.assert_allclose(second, expect, rtol=1e-5, atol=1e-6)
    finally:
        h.set_params("policy_node", chunk_aggregation="latest_only", action_min=[-1e6] * 4, action_max=[1e6] * 4)


@pytest.fixture(scope="module")
def managed_node(ros_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node_b")
    h = Harness(ros_env, "qb")
    h.instruction.publish(String(data="open the drawer"))
    params = write_params(
        str(tmp / "params.yaml"),
        {
            "lc_node": _node_params(
                "qb",
                camera_topics=["/qb/cam0/image_raw"],
                joint_state_topic="",
                warmup_count=0,
                model="/nonexistent/quantvla-model",
                executor="multi_threaded",
            )
        },
    )
    log = str(tmp / "node.log")
    proc = start_node("policy_node", params, log, extra_args=["-r", "__node:=lc_node"])
    try:
        yield h, proc, log, tmp
    finally:
        stop_node(proc)
        h.close()


def _transition(h, tid):
    req = ChangeState.Request()
    req.transition.id = tid
    return h.call(ChangeState, "/lc_node/change_state", req).success


def _state(h):
    return h.call(GetState, "/lc_node/get_state", GetState.Request()).current_state.label


def test_lifecycle_transitions_and_model_failures(managed_node):
    h, proc, log, tmp = managed_node
    assert _state(h) == "unconfigured"
    # missing model: configure fails with a reason in the log and in diagnostics
    assert _transition(h, Transition.TRANSITION_CONFIGURE) is False
    assert _state(h) == "unconfigured"
    h.wait_for(
        lambda: "could not load model" in (h.status("policy").message if h.status("policy") else ""), 5.0, "reason"
    )
    assert level_of(h.status("policy")) == 2 and "/nonexistent/quantvla-model" in h.status("policy").message
    assert _log_lines(log, "configure failed: could not load model '/nonexistent/quantvla-model'")
    # corrupt model directory
    bad = tmp / "corrupt_model"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    (bad / "model.safetensors").write_bytes(os.urandom(256))
    assert all(r.successful for r in h.set_params("lc_node", model=str(bad)))
    assert _transition(h, Transition.TRANSITION_CONFIGURE) is False
    assert _log_lines(log, f"configure failed: could not load model '{bad}'")
    # parameters that do not fit the model fail configure with the reason
    assert all(r.successful for r in h.set_params("lc_node", model="tiny", joint_names=["a", "b", "c"]))
    assert _transition(h, Transition.TRANSITION_CONFIGURE) is False
    assert _log_lines(log, "configure failed: joint_names has 3 entries; model 'tiny' outputs 4")
    assert all(r.successful for r in h.set_params("lc_node", joint_names=JOINTS))
    # CUDA graphs on a CPU device: configure fails, naming why
    assert all(r.successful for r in h.set_params("lc_node", cuda_graphs=True))
    assert _transition(h, Transition.TRANSITION_CONFIGURE) is False
    assert _log_lines(log, "CUDA graphs need a CUDA device; this policy runs on cpu")
    assert all(r.successful for r in h.set_params("lc_node", cuda_graphs=False))
    # an unknown integer-kernel backend is refused when set, naming what is accepted
    res = h.set_params("lc_node", kernel_backend="cuda-magic")
    assert not res[0].successful and "auto, triton, torch" in res[0].reason
    # a real model directory (tiny, saved here): configure -> inactive publishes nothing
    from quantvla_core.checkpoint import save_model_dir
    from quantvla_core.policy import Policy

    tiny = Policy.load("tiny")
    model_dir = save_model_dir(tmp / "tiny_model", tiny.config, tiny.model.state_dict())
    assert all(r.successful for r in h.set_params("lc_node", model=str(model_dir), actions_per_chunk=5))
    assert _transition(h, Transition.TRANSITION_CONFIGURE) is True
    assert _state(h) == "inactive"
    h.wait_for(lambda: h.status("policy").message == "inactive", 5.0, "diag inactive")
    assert level_of(h.status("policy")) == 0
    received = int(h.values("inputs").get("camera0_received", "0"))
    stamps = [h.send_pair(cam1=False) for _ in range(3)]
    h.wait_for(
        lambda: int(h.values("inputs")["camera0_received"]) >= received + 3, 5.0, "the frames reached the node"
    )  # it has them; an inactive node must not act
    assert all(h.trajectory_for(s) is None for s in stamps)
    assert not h.set_params("lc_node", model="tiny")[0].successful  # read-only once configured
    h.wait_for(
        lambda: h.values("policy").get("weight_bytes") == str(tiny.describe()["weight_bytes"]),
        5.0,
        "diagnostics report the loaded model's weight bytes",
    )
    # activate -> acts (no joint_state_topic: zero state)
    assert _transition(h, Transition.TRANSITION_ACTIVATE) is True
    assert _state(h) == "active"
    _, msg = h.act()
    assert len(msg.points) == 5  # actions_per_chunk: the first 5 of the 8-step chunk
    # deactivate -> silent again
    assert _transition(h, Transition.TRANSITION_DEACTIVATE) is True
    received = int(h.values("inputs").get("camera0_received", "0"))
    stamps = [h.send_pair(cam1=False) for _ in range(3)]
    h.wait_for(
        lambda: int(h.values("inputs")["camera0_received"]) >= received + 3, 5.0, "the frames reached the node"
    )  # it has them; an inactive node must not act
    assert all(h.trajectory_for(s) is None for s in stamps)
    # cleanup frees the model
    assert _transition(h, Transition.TRANSITION_CLEANUP) is True
    assert _state(h) == "unconfigured"
    h.wait_for(lambda: h.values("policy").get("scheme") == "n/a", 5.0, "model freed in diag")
    assert proc.poll() is None


def test_use_sim_time_judges_stamps_against_clock(managed_node):
    """With use_sim_time the node's clock is /clock: sim-time stamps act, wall stamps are
    'future' (the robot sim's time is far behind the wall clock here)."""
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock

    h, proc, _, _ = managed_node
    assert _state(h) == "unconfigured"
    assert all(r.successful for r in h.set_params("lc_node", use_sim_time=True))
    clock = h.node.create_publisher(Clock, "/clock", 10)
    sim = [1000.0]
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            sim[0] += 0.01
            clock.publish(Clock(clock=Time(sec=int(sim[0]), nanosec=int((sim[0] % 1) * 1e9))))
            time.sleep(0.01)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        assert _transition(h, Transition.TRANSITION_CONFIGURE) is True
        assert _transition(h, Transition.TRANSITION_ACTIVATE) is True
        before = h.counter("invalid.camera0.stamp_future")
        wall = h.send_pair(cam1=False)
        h.wait_for(lambda: h.counter("invalid.camera0.stamp_future") > before, 5.0, "wall stamp")
        got = None
        end = time.monotonic() + 10
        while got is None and time.monotonic() < end:
            t = sim[0]
            stamp = Time(sec=int(t), nanosec=int((t % 1) * 1e9))
            h.send_pair(stamp, cam1=False)
            h_end = time.monotonic() + 0.5
            while got is None and time.monotonic() < h_end:
                got = h.trajectory_for(stamp)
                time.sleep(0.02)
        assert got is not None and got.header.stamp.sec >= 1000
        assert h.trajectory_for(wall) is None and proc.poll() is None
    finally:
        stop.set()
        ticker.join()


# ---------------------------------------------------------------- in-process lifecycle checks
def _inproc_node(ros_env, name, **over):
    """A PolicyNode in this process (own context) driven through its callbacks directly."""
    from quantvla_ros.policy_node import PolicyNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_env)
    params = _node_params(name, camera_topics=[f"/{name}/cam0/image_raw"], joint_state_topic="", warmup_count=0)
    params.update(over)
    node = PolicyNode(name, context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    return ctx, node


def _close_inproc(ctx, node):
    node._stop_thread()
    node.destroy_node()
    rclpy.try_shutdown(context=ctx)


class _GatedPolicy:
    """The real tiny policy behind a gate: predict blocks until the test opens it, like an
    inference (e.g. a hung GPU call) that outlives the node's stop timeout."""

    def __init__(self, policy):
        self.policy, self.config = policy, policy.config
        self.entered, self.gate = threading.Event(), threading.Event()

    def predict(self, observation, seed=0):
        self.entered.set()
        self.gate.wait(30.0)
        return self.policy.predict(observation, seed=seed)


def _inference_threads():
    return [t for t in threading.enumerate() if t.name == "quantvla-inference" and t.is_alive()]


def _feed(node):
    msg = rgb_to_image(render_scene(64, 48, 0.0), "rgb8")
    msg.header.stamp = node.get_clock().now().to_msg()
    node._on_image(0, msg)


def test_stuck_inference_refuses_deactivate_and_never_runs_two_threads(ros_env):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    ctx, node = _inproc_node(ros_env, "qc")
    gated = None
    try:
        assert node.trigger_configure() == R.SUCCESS
        gated = _GatedPolicy(node._policy)
        node._policy = gated
        node.stop_timeout_s = 0.3
        node._on_instruction(String(data="pick up the red block"))
        assert node.trigger_activate() == R.SUCCESS
        _feed(node)
        assert gated.entered.wait(10.0), "the inference never started"
        assert node.trigger_deactivate() == R.FAILURE  # the thread did not stop in time
        assert node.lifecycle_state == "active" and len(_inference_threads()) == 1
        gated.gate.set()  # the stuck inference returns; its own stop flag ends the thread
        end = time.monotonic() + 10.0
        while _inference_threads() and time.monotonic() < end:
            time.sleep(0.02)
        assert not _inference_threads()
        assert node.trigger_deactivate() == R.SUCCESS
        assert node.trigger_activate() == R.SUCCESS and len(_inference_threads()) == 1
        assert node.trigger_deactivate() == R.SUCCESS and not _inference_threads()
    finally:
        if gated is not None:
            gated.gate.set()
        _close_inproc(ctx, node)


def test_chunk_from_a_frame_that_went_stale_during_inference_is_not_published(ros_env):
    """An inference slower than image_timeout_s: its chunk is dropped (counted), not sent."""
    from rclpy.lifecycle import TransitionCallbackReturn as R

    image_timeout_s = 0.3
    ctx, node = _inproc_node(ros_env, "qf", image_timeout_s=image_timeout_s)
    gated = None
    try:
        assert node.trigger_configure() == R.SUCCESS
        gated = _GatedPolicy(node._policy)
        node._policy = gated
        node._on_instruction(String(data="pick up the red block"))
        assert node.trigger_activate() == R.SUCCESS
        _feed(node)
        assert gated.entered.wait(10.0), "the inference never started"
        wait_past(image_timeout_s)  # the frame's age passes image_timeout_s while the model runs
        gated.gate.set()
        end = time.monotonic() + 10.0
        while node._counters.get("chunks_dropped_stale") == 0 and time.monotonic() < end:
            time.sleep(0.01)
        assert node._counters.get("chunks_dropped_stale") == 1
        assert node._counters.get("chunks_published") == 0
        assert node._counters.get("stale.camera0.stale_at_publish") == 1
        assert node.trigger_deactivate() == R.SUCCESS
    finally:
        if gated is not None:
            gated.gate.set()
        _close_inproc(ctx, node)


def test_inference_loop_exits_when_its_store_is_closed(ros_env):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    ctx, node = _inproc_node(ros_env, "qd")
    try:
        assert node.trigger_configure() == R.SUCCESS
        assert node.trigger_activate() == R.SUCCESS
        thread = node._worker._thread
        node._gate.frames.close()  # e.g. a store left behind by cleanup: the loop must not spin on it
        thread.join(5.0)
        assert not thread.is_alive()
        assert node.trigger_deactivate() == R.SUCCESS
    finally:
        _close_inproc(ctx, node)


def test_blank_camera_type_entry_infers_from_topic_at_configure(ros_env):
    from rclpy.lifecycle import TransitionCallbackReturn as R

    ctx, node = _inproc_node(
        ros_env,
        "qe",
        camera_topics=["/qe/cam0/image_raw", "/qe/cam1/image_raw/compressed"],
        camera_types=["", "compressed"],
    )
    try:
        assert node.trigger_configure() == R.SUCCESS, node._config_error
        assert node._cfg["kinds"] == ["raw", "compressed"]
        assert node._cfg["camera_types"] == ["", "compressed"]
    finally:
        _close_inproc(ctx, node)


def test_relative_camera_topics_follow_namespace_and_remaps(ros_env, tmp_path):
    """Relative camera topics resolve in the node's namespace and its remap rules apply."""
    h = Harness(ros_env, "qn")
    h.instruction.publish(String(data="push the button"))
    params = write_params(
        str(tmp_path / "params.yaml"),
        {"/**": _node_params("qn", camera_topics=["cam0/image_raw", "front/compressed"], autostart=True)},
    )
    log = str(tmp_path / "node.log")
    proc = start_node(
        "policy_node",
        params,
        log,
        extra_args=["-r", "__ns:=/qn", "-r", "front/compressed:=/qn/cam1/image_raw/compressed"],
    )
    try:
        h.wait_for(lambda: h.values("policy").get("lifecycle_state") == "active", 60.0, "the node to autostart")
        h.send_joints()
        _, msg = h.act(log=log)
        assert len(msg.points) == HORIZON
        assert ("policy_node", "/qn") in set(h.node.get_node_names_and_namespaces())
        assert proc.poll() is None
    finally:
        stop_node(proc)
        h.close()


# ---------------------------------------------------------------- process-wide latency settings
def test_executable_applies_gil_switch_interval_and_malloc_thresholds_from_params(active_node):
    _, proc, log = active_node
    assert proc.poll() is None
    lines = _log_lines(log, "GIL switch interval")
    assert len(lines) == 1, lines
    assert (
        "executor single_threaded, GIL switch interval 0.5 ms, malloc mmap threshold 8 MiB, trim threshold 32 MiB"
    ) in lines[0]


@pytest.mark.parametrize(
    "name, value",
    [("gil_switch_interval_ms", 500.0), ("gil_switch_interval_ms", -1.0), ("malloc_mmap_threshold_mib", 64)],
)
def test_out_of_range_process_settings_are_refused_at_start(ros_env, name, value):
    from rclpy.exceptions import InvalidParameterValueException

    from quantvla_ros.policy_node import PolicyNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ros_env)
    try:
        with pytest.raises(InvalidParameterValueException):
            PolicyNode("qg", context=ctx, parameter_overrides=[Parameter(name, value=value)])
    finally:
        rclpy.try_shutdown(context=ctx)


def test_gil_switch_interval_is_applied_read_only_and_zero_keeps_cpythons(ros_env):
    import sys

    from quantvla_ros.policy_node import apply_gil_switch_interval

    before = sys.getswitchinterval()
    ctx, node = _inproc_node(ros_env, "qh", gil_switch_interval_ms=0.25)
    ctx0, node0 = _inproc_node(ros_env, "qi", gil_switch_interval_ms=0.0)
    try:
        assert apply_gil_switch_interval(node) == pytest.approx(0.25)
        assert sys.getswitchinterval() == pytest.approx(0.25e-3)
        sys.setswitchinterval(before)
        assert apply_gil_switch_interval(node0) == pytest.approx(before * 1e3)
        assert sys.getswitchinterval() == before
        result = node.set_parameters([Parameter("gil_switch_interval_ms", value=2.0)])[0]
        assert not result.successful  # applied once in main(); a later value would be a lie
        assert node.get_parameter("gil_switch_interval_ms").value == pytest.approx(0.25)
    finally:
        sys.setswitchinterval(before)
        _close_inproc(ctx, node)
        _close_inproc(ctx0, node0)


def test_malloc_thresholds_let_frame_sized_buffers_reuse_pages():
    """The node's hot path frees ~3 frame-sized copies per image; with glibc's dynamic default
    the freed heap top is trimmed and every frame page-faults again (measured ~700 faults per
    640x480 rgb8 frame in the node); the setting keeps the pages."""
    import subprocess
    import sys

    script = (
        "import resource, numpy as np\n"
        "from quantvla_ros.policy_node import apply_malloc_thresholds\n"
        "def faults():\n"
        "    for i in range(35):\n"
        "        if i == 5: f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "        bufs = [np.ones(921_600, np.uint8) for _ in range(3)]; del bufs\n"
        "    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 30\n"
        "print(faults(), apply_malloc_thresholds(16), faults())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    default, tuned = float(out[0]), float(out[-1])
    assert "16 MiB" in " ".join(out[1:-1])
    assert default > 200 and tuned < 20, (default, tuned)
