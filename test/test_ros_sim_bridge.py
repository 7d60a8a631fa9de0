"""sim_bridge: chunk playback rules (no DDS), then the closed loop over real DDS.

Integration: the sim_bridge and policy_node executables run as subprocesses with
`--ros-args --params-file`; this process listens (outcomes, chunks, joint states, images,
/clock). In the second test this process itself is the policy: a scripted expert reading the
bridge's privileged state and answering with JointTrajectory chunks, so a real success has to
travel over DDS, and its episode lengths must equal the same expert run in-process (lockstep
makes the loop deterministic).
"""

import ast
import json
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("metaworld")
pytestmark = pytest.mark.ros

from builtin_interfaces.msg import Duration, Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,  # noqa: E402
    qos_profile_sensor_data,
)
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from quantvla_ros.diagnostics import status_values  # noqa: E402
from quantvla_ros.node_process import start_node, stop_node, write_params  # noqa: E402
from quantvla_ros.sim_bridge import (
    ACTION_JOINT_NAMES,
    SPECS,
    STATE_JOINT_NAMES,  # noqa: E402
    check_config,
)
from quantvla_ros.trajectory_player import (
    ChunkPlayer,
    TrajectoryRejected,  # noqa: E402
    parse_trajectory,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(ACTION_JOINT_NAMES)
DT = 100_000_000  # 0.1 s in ns
T0 = 5_000_000_000
LATCHED = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=100,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def trajectory(rows, stamp_ns, dt_ns=DT, names=NAMES):
    msg = JointTrajectory(joint_names=list(names))
    msg.header.stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    for k, row in enumerate(rows):
        ns = k * dt_ns
        msg.points.append(
            JointTrajectoryPoint(
                positions=[float(v) for v in row], time_from_start=Duration(sec=ns // 10**9, nanosec=ns % 10**9)
            )
        )
    return msg


def chunk_rows(first, n):
    """Row k = [first + k, 0, 0, 0]: the executed value tells which point ran."""
    return [[first + k, 0.0, 0.0, 0.0] for k in range(n)]


# ---------------------------------------------------------------------- playback rules
def test_points_run_in_order_then_the_hand_holds():
    player = ChunkPlayer()
    chunk = parse_trajectory(trajectory(chunk_rows(0, 3), T0), NAMES, T0, DT)
    assert player.offer(chunk, T0, T0) == "accepted"
    got = [player.action_at(T0 + k * DT) for k in range(4)]
    assert [g[0] for g in got[:3]] == [0, 1, 2]
    assert got[3] is None  # chunk used up: no action, the bridge holds still
    assert (player.points_executed, player.points_skipped, player.chunks_used) == (3, 0, 1)


def test_replan_skips_points_that_elapsed_while_the_policy_thought():
    player = ChunkPlayer()
    player.offer(parse_trajectory(trajectory(chunk_rows(0, 8), T0), NAMES, T0, DT), T0, T0)
    assert player.action_at(T0)[0] == 0
    assert player.action_at(T0 + DT)[0] == 1
    # A chunk computed from the observation at T0 + DT arrives when the sim is at T0 + 3 DT.
    late = parse_trajectory(trajectory(chunk_rows(100, 8), T0 + DT), NAMES, T0 + 3 * DT, DT)
    assert player.offer(late, T0, T0 + 3 * DT) == "accepted"
    assert player.action_at(T0 + 3 * DT)[0] == 102  # its points 0, 1 had elapsed
    assert player.action_at(T0 + 4 * DT)[0] == 103
    assert player.points_skipped == 2 and player.chunks_used == 2


def test_future_chunk_waits_for_its_start_and_old_chunk_runs_until_then():
    player = ChunkPlayer()
    player.offer(parse_trajectory(trajectory(chunk_rows(0, 8), T0), NAMES, T0, DT), T0, T0)
    player.offer(parse_trajectory(trajectory(chunk_rows(50, 8), T0 + 2 * DT), NAMES, T0, DT), T0, T0)
    assert [player.action_at(T0 + k * DT)[0] for k in range(4)] == [0, 1, 50, 51]


def test_stale_late_zero_stamp_and_max_points():
    player = ChunkPlayer(max_points_per_chunk=2)
    old = parse_trajectory(trajectory(chunk_rows(0, 8), T0 - DT), NAMES, T0, DT)
    assert player.offer(old, T0, T0) == "stale"  # from the previous episode
    done = parse_trajectory(trajectory(chunk_rows(0, 2), T0), NAMES, T0 + 5 * DT, DT)
    assert player.offer(done, T0, T0 + 5 * DT) == "late"
    now = parse_trajectory(trajectory(chunk_rows(7, 4), 0), NAMES, T0 + 5 * DT, DT)
    assert now.start_ns == T0 + 5 * DT  # zero stamp: start on receipt
    player.offer(now, T0, T0 + 5 * DT)
    assert player.action_at(T0 + 5 * DT)[0] == 7 and player.action_at(T0 + 6 * DT)[0] == 8
    assert player.action_at(T0 + 7 * DT) is None  # max_points_per_chunk reached


def test_sync_start_only_starts_chunks_computed_from_the_current_observation():
    player = ChunkPlayer(max_points_per_chunk=2, sync_start=True)
    player.offer(parse_trajectory(trajectory(chunk_rows(0, 8), T0), NAMES, T0, DT), T0, T0)
    assert [player.action_at(T0 + k * DT)[0] for k in (0, 1)] == [0, 1]
    # Computed from the observation at T0 + DT, it arrives when the sim waits at T0 + 2 DT.
    player.offer(parse_trajectory(trajectory(chunk_rows(10, 8), T0 + DT), NAMES, T0, DT), T0, T0 + 2 * DT)
    assert player.action_at(T0 + 2 * DT) is None and player.chunks_too_old == 1
    player.offer(parse_trajectory(trajectory(chunk_rows(20, 8), T0 + 2 * DT), NAMES, T0, DT), T0, T0 + 2 * DT)
    assert player.action_at(T0 + 2 * DT)[0] == 20 and player.points_skipped == 0


def test_joints_in_another_order_are_mapped_by_name():
    msg = trajectory([[0.5, 0.1, 0.2, 0.3]], T0, names=[NAMES[3]] + NAMES[:3])
    chunk = parse_trajectory(msg, NAMES, T0, DT)
    np.testing.assert_allclose(chunk.actions[0], [0.1, 0.2, 0.3, 0.5], rtol=1e-6)
    assert chunk.end_ns == T0 + DT  # a single point lasts one control step


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda m: setattr(m, "joint_names", NAMES[:3] + ["elbow"]), "joint_names"),
        (lambda m: setattr(m, "joint_names", NAMES[:3] + [NAMES[0]]), "joint_names"),
        (lambda m: m.points.clear(), "empty"),
        (lambda m: setattr(m.points[1], "positions", [0.0, 0.0, 0.0]), "point_length"),
        (lambda m: setattr(m.points[1], "positions", [0.0, float("nan"), 0.0, 0.0]), "nonfinite"),
        (lambda m: setattr(m.points[1], "time_from_start", Duration()), "time_order"),
    ],
)
def test_bad_chunks_are_refused_whole(mutate, code):
    msg = trajectory(chunk_rows(0, 3), T0)
    mutate(msg)
    with pytest.raises(TrajectoryRejected) as err:
        parse_trajectory(msg, NAMES, T0, DT)
    assert err.value.code == code
    if code == "joint_names":
        assert "expected exactly" in str(err.value)  # the message says what is accepted


def test_bad_parameters_name_what_is_accepted():
    cfg = {s.name: s.default for s in SPECS}
    for key, value, words in (
        ("tasks", ["reach-v2"], "reach-v3"),
        ("cameras", ["wrist"], "topview"),
        ("episodes_per_task", 51, "50 starts"),
        ("action_joint_names", ["a", "a", "b", "c"], "4 distinct"),
    ):
        with pytest.raises(ValueError, match=words):
            check_config(dict(cfg, **{key: value}))


def test_launch_file_and_params_file_match_the_nodes():
    from quantvla_ros.params import SPEC_BY_NAME
    import yaml

    tree = ast.parse(open(os.path.join(ROOT, "launch", "sim_demo.launch.py")).read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"sim_bridge", "quantvla.launch.py", "use_sim_time", "model", "sim_demo.yaml"} <= strings
    assert "generate_launch_description" in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    params = yaml.safe_load(open(os.path.join(ROOT, "config", "sim_demo.yaml")))
    assert set(params["sim_bridge"]["ros__parameters"]) == {s.name for s in SPECS}
    policy = params["policy_node"]["ros__parameters"]
    assert set(policy) - {"use_sim_time"} <= set(SPEC_BY_NAME) and policy["use_sim_time"]
    assert policy["joint_names"] == params["sim_bridge"]["ros__parameters"]["action_joint_names"]
    assert policy["state_joint_names"] == list(STATE_JOINT_NAMES)
    assert policy["action_dt"] * params["sim_bridge"]["ros__parameters"]["control_rate_hz"] == 1


# ---------------------------------------------------------------------- over DDS
@pytest.fixture
def ros_domain(monkeypatch):
    """Loopback-only discovery in a domain of this test's own (inherited by the nodes)."""
    # The run's domain (conftest sets one per run unless CI / a developer gave one).
    domain = int(os.environ.get("ROS_DOMAIN_ID") or random.SystemRandom().randint(1, 100))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    return domain


class Listener:
    """Test-side node in its own context, spun in a background thread."""

    def __init__(self, domain: int, prefix: str):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=domain)
        self.node = rclpy.create_node(f"sim_test_{prefix}", context=self.ctx)
        self.lock = threading.Lock()
        self.outcomes, self.chunks, self.joints, self.images, self.clock = [], [], [], [], []
        n = self.node
        n.create_subscription(
            String, f"/{prefix}/sim/episode_outcome", lambda m: self._add(self.outcomes, json.loads(m.data)), LATCHED
        )
        n.create_subscription(JointTrajectory, f"/{prefix}/joint_trajectory", lambda m: self._add(self.chunks, m), 50)
        n.create_subscription(
            JointState, f"/{prefix}/joint_states", lambda m: self._add(self.joints, m), qos_profile_sensor_data
        )
        n.create_subscription(
            Image, f"/{prefix}/camera/corner/image_raw", lambda m: self._add(self.images, m), qos_profile_sensor_data
        )
        n.create_subscription(Clock, "/clock", lambda m: self._add(self.clock, m), 50)
        self.diags = []
        n.create_subscription(DiagnosticArray, f"/{prefix}/diagnostics", lambda m: self._add(self.diags, m), 50)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _add(self, items, value):
        with self.lock:
            items.append(value)

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


def bridge_params(prefix, tmp_path, **extra):
    p = {
        "seeds": [1000],
        "episodes_per_task": 2,
        "cameras": ["corner", "topview"],
        "image_size": 64,
        "camera_topic_prefix": f"/{prefix}/camera",
        "joint_state_topic": f"/{prefix}/joint_states",
        "instruction_topic": f"/{prefix}/instruction",
        "trajectory_topic": f"/{prefix}/joint_trajectory",
        "outcome_topic": f"/{prefix}/sim/episode_outcome",
        "summary_topic": f"/{prefix}/sim/summary",
        "sim_state_topic": f"/{prefix}/sim/privileged_state",
        "diagnostics_topic": f"/{prefix}/diagnostics",
        "results_path": str(tmp_path / "summary.json"),
        "progress": False,
    }
    p.update(extra)
    return p


def wait_exit(proc, log_path, timeout_s):
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop_node(proc)
        pytest.fail("sim_bridge did not finish in time:\n" + open(log_path).read()[-3000:])


def wait_until(predicate, timeout_s=5.0):
    """Poll until predicate() (a message the bridge sent before exiting has arrived)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not predicate():
        time.sleep(0.02)


def stamp_ns(stamp):
    return stamp.sec * 10**9 + stamp.nanosec


def test_policy_node_closes_the_loop_with_sim_bridge(tmp_path, ros_domain):
    prefix = f"sbp{os.getpid()}"
    b = bridge_params(
        prefix,
        tmp_path,
        tasks=["reach-v3"],
        max_steps=30,
        chunk_timeout_s=5.0,
        startup_timeout_s=90.0,
        max_points_per_chunk=4,
    )
    policy = {
        "model": "tiny",
        "use_sim_time": True,
        "autostart": True,
        "warmup_count": 1,
        "num_threads": 1,
        "camera_topics": [f"/{prefix}/camera/corner/image_raw", f"/{prefix}/camera/topview/image_raw"],
        "joint_state_topic": b["joint_state_topic"],
        "state_joint_names": list(STATE_JOINT_NAMES),
        "instruction_topic": b["instruction_topic"],
        "trajectory_topic": b["trajectory_topic"],
        "joint_names": NAMES,
        "action_dt": 0.1,
        "action_min": [-1.0] * 4,
        "action_max": [1.0] * 4,
        "diagnostics_topic": f"/{prefix}/diagnostics",
    }
    params = write_params(str(tmp_path / "params.yaml"), {"sim_bridge": b, "policy_node": policy})
    listener = Listener(ros_domain, prefix)
    logs = {k: str(tmp_path / f"{k}.log") for k in ("policy", "bridge")}
    policy_proc = start_node("policy_node", params, logs["policy"])
    bridge = start_node("sim_bridge", params, logs["bridge"])
    try:
        rc = wait_exit(bridge, logs["bridge"], 100)
        # the last outcome and diagnostics were sent before the bridge exited
        wait_until(
            lambda: (
                len(listener.outcomes) >= 2
                and sum(st.name == "sim_bridge: episodes" for arr in listener.diags for st in arr.status) >= 2
            )
        )
    finally:
        stop_node(bridge)
        stop_node(policy_proc)
        listener.close()
    bridge_log = open(logs["bridge"]).read()
    assert rc == 0, bridge_log[-3000:] + open(logs["policy"]).read()[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["format"] == "quantvla-sim-summary" and summary["complete"]
    assert summary["episodes"] == 2 and [e["index"] for e in summary["episode_outcomes"]] == [0, 1]
    for ep in summary["episode_outcomes"]:
        assert ep["steps"] == 30 or ep["success"]
        assert ep["points_executed"] > 0 and ep["chunks_used"] > 0, ep
        assert ep["points_executed"] + ep["hold_steps"] == ep["steps"]
        assert ep["hold_steps"] < ep["steps"] // 2, ep  # the policy, not the timeout, drove
        assert ep["hand_path_m"] > 0.01, ep  # the trajectories moved the hand
        # Lockstep + sync_chunks: every chunk started at its own observation's step.
        assert ep["points_skipped"] == 0 and ep["points_executed"] <= 4 * ep["chunks_used"]
    c = summary["counters"]
    assert not any(v for k, v in c.items() if k.startswith("rejected_"))
    assert c["chunks_received"] == c["chunks_accepted"] + c["chunks_stale"] + c["chunks_late"]
    # Outcomes arrived over DDS, one per episode, equal to the summary's records.
    with listener.lock:
        outcomes, chunks = list(listener.outcomes), list(listener.chunks)
        joints, images, clock = list(listener.joints), list(listener.images), list(listener.clock)
    assert outcomes == summary["episode_outcomes"]
    with listener.lock:
        bridge_diags = [
            status_values(st) for arr in listener.diags for st in arr.status if st.name == "sim_bridge: episodes"
        ]
    # one status per finished episode; /diagnostics is volatile, so a status sent before DDS
    # matched this listener's subscription is not delivered to it (seen under load): the counts
    # seen must rise and end at 2
    done = [int(d["episodes_done"]) for d in bridge_diags]
    assert done and done[-1] == 2 and done == sorted(set(done)) and set(done) <= {1, 2}, done
    assert 0 < int(bridge_diags[-1]["chunks_received"]) <= c["chunks_received"]
    # The policy node acted on sim time: its chunks carry observation stamps on the sim grid.
    assert len(chunks) >= summary["counters"]["chunks_accepted"] > 0
    for msg in chunks[:5]:
        assert list(msg.joint_names) == NAMES and len(msg.points) == 8
        assert (stamp_ns(msg.header.stamp) - 10**9) % DT == 0
        assert stamp_ns(msg.points[3].time_from_start) == 3 * DT
    clock_ns = [stamp_ns(c.clock) for c in clock]
    assert clock_ns == sorted(clock_ns) and clock_ns[-1] >= 10**9 + 60 * DT
    hands = np.array([m.position[:3] for m in joints])
    assert list(joints[0].name) == list(STATE_JOINT_NAMES)
    assert np.ptp(hands, axis=0).max() > 0.01  # the hand moved as seen on joint_states
    assert images and images[0].encoding == "rgb8" and images[0].height == 64
    assert images[0].header.frame_id == "corner"


class ExpertPolicy:
    """This process as the policy: Meta-World's expert on the bridge's privileged state."""

    def __init__(self, listener: Listener, prefix: str, bad_first: list):
        from quantvla_core.sim.expert import ScriptedExpert

        self.experts = {"reach-v3": ScriptedExpert("reach-v3")}
        self.bad_first = bad_first
        node = listener.node
        self.pub = node.create_publisher(JointTrajectory, f"/{prefix}/joint_trajectory", 10)
        node.create_subscription(
            JointState,
            f"/{prefix}/sim/privileged_state",
            self._on_state,
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL),
        )
        self.answered = 0

    def _on_state(self, msg: JointState) -> None:
        # Inside episode 0 (after the bridge's probe frame, which this expert answers at once):
        # bad chunks, refused by the bridge, then the good one for the same step.
        while self.answered == 10 and self.bad_first:
            self.pub.publish(self.bad_first.pop(0))
        action = self.experts[msg.header.frame_id].action(np.asarray(msg.position))
        order = [3, 0, 1, 2]  # joints sent in another order: the bridge maps them by name
        reply = trajectory([action[order]], stamp_ns(msg.header.stamp), names=[NAMES[i] for i in order])
        self.pub.publish(reply)
        self.answered += 1


def test_scripted_expert_over_dds_succeeds_like_in_process(tmp_path, ros_domain):
    prefix = f"sbe{os.getpid()}"
    b = bridge_params(
        prefix,
        tmp_path,
        tasks=["reach-v3"],
        max_steps=60,
        cameras=["topview"],
        image_size=32,
        chunk_timeout_s=20.0,
        startup_timeout_s=60.0,
        publish_sim_state=True,
    )
    params = write_params(str(tmp_path / "params.yaml"), {"sim_bridge": b})
    listener = Listener(ros_domain, prefix)
    bad = [
        trajectory([[0.0, 0.0, 0.0, 0.0]], 0, names=["j0", "j1", "j2", "j3"]),
        trajectory([[0.0, float("nan"), 0.0, 0.0]], 0),
        trajectory([[0.0, 0.0, 0.0]], 0),
    ]
    expert = ExpertPolicy(listener, prefix, bad)
    log = str(tmp_path / "bridge.log")
    bridge = start_node("sim_bridge", params, log)
    try:
        # The reference: the same expert on the same starts, in this process, meanwhile.
        from quantvla_core.sim.env import MT10Env
        from quantvla_core.sim.expert import ScriptedExpert

        reference = []
        with MT10Env("reach-v3", cameras=("topview",), image_size=32, max_steps=60) as env:
            ref_expert = ScriptedExpert("reach-v3")
            for index in (0, 1):
                env.reset(1000, index)
                while not env.done:
                    env.step(ref_expert.action(env.sim_obs))
                reference.append((env.success, env.steps))
        rc = wait_exit(bridge, log, 90)
        wait_until(lambda: len(listener.outcomes) >= 2)
    finally:
        stop_node(bridge)
        listener.close()
    assert rc == 0, open(log).read()[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    got = [(e["success"], e["steps"]) for e in summary["episode_outcomes"]]
    assert reference[0][0] and reference[1][0]
    assert got == reference  # lockstep over DDS = the in-process loop, step for step
    with listener.lock:
        outcomes = list(listener.outcomes)
    assert [(o["success"], o["steps"]) for o in outcomes] == reference
    assert all(o["hold_steps"] == 0 and o["points_executed"] == o["steps"] for o in outcomes)
    c = summary["counters"]
    rejected = (c["rejected_joint_names"], c["rejected_nonfinite"], c["rejected_point_length"])
    assert rejected == (1, 1, 1)
    assert outcomes[0]["chunks_rejected"] == 3 and outcomes[1]["chunks_rejected"] == 0
    assert expert.answered > sum(steps for _, steps in reference)  # + the probe frame(s)


def test_bad_parameters_stop_the_executable_with_a_clear_message(ros_domain):
    for arg, words in (("max_steps:=0", "max_steps out of range"), ("tasks:=[reach-v2]", "accepted: reach-v3")):
        run = subprocess.run(
            [sys.executable, "-m", "quantvla_ros.sim_bridge", "--ros-args", "-p", arg],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2 and words in run.stderr, run.stderr[-2000:]


def _boundary_jumps(chunks, dt_ns=DT):
    """Per pair of consecutive published chunks A, B (stamps on the sim grid): how far B's
    first action is from the action A had planned for that instant, max over joints."""
    jumps = []
    for a, b in zip(chunks, chunks[1:]):
        offset = (stamp_ns(b.header.stamp) - stamp_ns(a.header.stamp)) // dt_ns
        if 1 <= offset < len(a.points):
            jumps.append(float(np.abs(np.subtract(b.points[0].positions, a.points[offset].positions)).max()))
    return np.asarray(jumps)


def test_chunk_boundary_smoothing_in_the_closed_loop(tmp_path, ros_domain):
    """The same MT10 episode driven twice at once, chunk_aggregation latest_only vs inpaint:
    with smoothing every chunk starts exactly where the committed plan was (no jump at the
    boundary), without it the robot is commanded a jump at every replan."""
    runs = {}
    for mode in ("latest_only", "inpaint"):
        prefix = f"sbs{mode[:3]}{os.getpid()}"
        b = bridge_params(
            prefix,
            tmp_path / mode,
            tasks=["reach-v3"],
            episodes_per_task=1,
            max_steps=20,
            chunk_timeout_s=5.0,
            startup_timeout_s=90.0,
            max_points_per_chunk=4,
            cameras=["corner"],
            image_size=32,
        )
        policy = {
            "model": "tiny",
            "use_sim_time": True,
            "autostart": True,
            "warmup_count": 1,
            "num_threads": 1,
            "camera_topics": [f"/{prefix}/camera/corner/image_raw"],
            "joint_state_topic": b["joint_state_topic"],
            "state_joint_names": list(STATE_JOINT_NAMES),
            "instruction_topic": b["instruction_topic"],
            "trajectory_topic": b["trajectory_topic"],
            "joint_names": NAMES,
            "action_dt": 0.1,
            "action_min": [-1.0] * 4,
            "action_max": [1.0] * 4,
            "chunk_aggregation": mode,
            "smoothing_steps": 3,
            "diagnostics_topic": f"/{prefix}/diagnostics",
        }
        (tmp_path / mode).mkdir()
        params = write_params(str(tmp_path / mode / "params.yaml"), {"sim_bridge": b, "policy_node": policy})
        logs = {k: str(tmp_path / mode / f"{k}.log") for k in ("policy", "bridge")}
        runs[mode] = dict(
            listener=Listener(ros_domain, prefix),
            logs=logs,
            policy=start_node("policy_node", params, logs["policy"]),
            bridge=start_node("sim_bridge", params, logs["bridge"]),
            summary=tmp_path / mode / "summary.json",
        )
    try:
        for run in runs.values():
            run["rc"] = wait_exit(run["bridge"], run["logs"]["bridge"], 120)
    finally:
        for run in runs.values():
            stop_node(run["bridge"])
            run["policy_rc"] = stop_node(run["policy"])
            run["listener"].close()
    jumps = {}
    for mode, run in runs.items():
        assert run["rc"] == 0 and run["policy_rc"] == 0, open(run["logs"]["policy"]).read()[-3000:]
        summary = json.load(open(run["summary"]))
        ep = summary["episode_outcomes"][0]
        assert ep["points_executed"] > 0 and ep["hold_steps"] < ep["steps"] // 2, ep
        with run["listener"].lock:
            chunks = list(run["listener"].chunks)
        jumps[mode] = _boundary_jumps(chunks)
        assert len(jumps[mode]) >= 3, (mode, len(chunks))
    assert jumps["inpaint"].max() < 1e-5, jumps["inpaint"]
    assert jumps["latest_only"].mean() > 1e-3, jumps["latest_only"]
