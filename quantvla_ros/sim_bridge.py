"""`sim_bridge`: Meta-World MT10 behind ROS 2 topics, so a policy node is evaluated in closed
loop exactly as it would drive a robot.

The bridge owns simulated time: it publishes /clock and stamps every message with it, so the
policy node runs with use_sim_time and the simulator can wait for a slow policy (lockstep) or
run against the wall clock (real_time_factor > 0). Per control step it publishes, all stamped
with the step's sim time t:

  /clock                         rosgraph_msgs/Clock
  <joint_state_topic>            sensor_msgs/JointState, names STATE_JOINT_NAMES: hand x/y/z (m)
                                 and gripper opening (0 closed .. 1 open); sensor-data QoS
  <camera_topic_prefix>/<camera>/image_raw   sensor_msgs/Image rgb8, frame_id = camera name,
                                 one topic per camera; sensor-data QoS
  <instruction_topic>            std_msgs/String, RELIABLE + TRANSIENT_LOCAL, once per episode
  <sim_state_topic>              (publish_sim_state only) sensor_msgs/JointState carrying
                                 Meta-World's full 39-value observation (names sim_obs_0..38,
                                 frame_id = task): privileged, for scripted experts and tests

and it consumes trajectory_msgs/JointTrajectory chunks on <trajectory_topic>: joints
`action_joint_names` (dx, dy, dz, grip in [-1, 1]), whole chunk, time_from_start = k * dt,
header.stamp = the observation's stamp (zero = start on receipt). The point due at the current
sim time is executed (trajectory_player), so replanning skips already-elapsed points. When no
point is due the bridge waits up to `chunk_timeout_s` of wall time, then holds still (zero
action) for one step. In lockstep with `sync_chunks` a new chunk may only start at the step of
the observation it was computed from, so the policy's latency costs no sim time and the loop
matches `quantvla eval` (execute up to `max_points_per_chunk` steps, then replan). Malformed chunks (wrong joint names, point length, NaN, time order) are
refused whole and counted.

Episodes run over `tasks` x the first `episodes_per_task` starts of `seeds` (held-out
evaluation seeds by default). After each episode a JSON outcome goes out on `outcome_topic`
(std_msgs/String, RELIABLE + TRANSIENT_LOCAL, format "quantvla-sim-episode"); at the end a
summary (format "quantvla-sim-summary": per-task success with Wilson 95% intervals, counters)
goes to `summary_topic`, is printed as a table and, with `results_path`, written as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.exceptions import NameValidationException, ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos import qos_profile_sensor_data
from diagnostic_msgs.msg import DiagnosticArray
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros.burst_log import BurstLogger
from quantvla_ros.diagnostics import OK, WARN, make_status
from quantvla_ros.image_conversion import rgb_to_image
from quantvla_ros.params import Spec, descriptor
from quantvla_ros.trajectory_player import ChunkPlayer, TrajectoryRejected, parse_trajectory

# Import-light: quantvla_core.sim.env pulls in mujoco/metaworld only when an env is built.
from quantvla_core.sim.env import (
    CAMERAS,
    DEFAULT_CAMERAS,
    DEFAULT_IMAGE_SIZE,  # noqa: E402
    DEFAULT_MAX_STEPS,
    EVAL_SEEDS,
    STARTS_PER_SEED,
    TASKS,
    check_task,
    starts_for,
)

STATE_JOINT_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_opening")
ACTION_JOINT_NAMES = ("hand_dx", "hand_dy", "hand_dz", "gripper")
SIM_START_NS = 1_000_000_000  # sim time starts at 1 s: a zero stamp means "unset" in ROS
OUTCOME_FORMAT, SUMMARY_FORMAT = "quantvla-sim-episode", "quantvla-sim-summary"
REJECT_CODES = ("joint_names", "empty", "point_length", "nonfinite", "time_order")

SPECS: tuple[Spec, ...] = (
    Spec(
        "tasks",
        list(TASKS),
        "MT10 tasks to run, in order.",
        constraints="each one of: " + ", ".join(TASKS),
        read_only=True,
    ),
    Spec(
        "seeds",
        list(EVAL_SEEDS[:1]),
        "metaworld.MT1 seeds the start states come from "
        f"(50 per seed; {', '.join(map(str, EVAL_SEEDS))} are the held-out evaluation seeds).",
        read_only=True,
    ),
    Spec(
        "episodes_per_task",
        1,
        "Episodes per task: the first N starts of `seeds`.",
        1,
        STARTS_PER_SEED * 100,
        read_only=True,
    ),
    Spec(
        "max_steps", DEFAULT_MAX_STEPS, "Control steps before an episode counts as failed.", 1, 100000, read_only=True
    ),
    Spec(
        "cameras",
        list(DEFAULT_CAMERAS),
        "Cameras rendered, one Image topic each, in the order the policy expects.",
        constraints="each one of: " + ", ".join(CAMERAS),
        read_only=True,
    ),
    Spec("image_size", DEFAULT_IMAGE_SIZE, "Rendered image width = height (pixels).", 16, 512, read_only=True),
    Spec(
        "control_rate_hz",
        10.0,
        "Simulated control steps per simulated second (dt = 1/rate); match the policy node's action_dt.",
        0.1,
        1000.0,
        read_only=True,
    ),
    Spec(
        "real_time_factor",
        0.0,
        "Sim seconds per wall second; 0 = lockstep: the simulation "
        "advances as fast as chunks arrive and waits for the policy (up to chunk_timeout_s).",
        0.0,
        100.0,
        read_only=True,
    ),
    Spec(
        "chunk_timeout_s",
        1.0,
        "Wall seconds to wait for a chunk when no trajectory point is "
        "due; then the hand holds still (zero action) for one step. 0 = never wait.",
        0.0,
        3600.0,
        read_only=True,
    ),
    Spec(
        "startup_timeout_s",
        120.0,
        "Wall seconds to wait before the first episode for a "
        "trajectory publisher, an observation subscriber and then a chunk answering the probe "
        "frames (model load, warm-up, activation).",
        0.0,
        86400.0,
        read_only=True,
    ),
    Spec(
        "max_points_per_chunk",
        0,
        "Most steps executed from one chunk before the bridge "
        "waits for a newer one (like the evaluator's replan_steps); 0 = the whole chunk.",
        0,
        100000,
        read_only=True,
    ),
    Spec(
        "sync_chunks",
        True,
        "Lockstep only: a new chunk may start only at the step whose "
        "observation it was computed from (older ones are dropped and the simulation waits), "
        "so policy latency costs no sim time, as in `quantvla eval`. Ignored when "
        "real_time_factor > 0.",
        read_only=True,
    ),
    Spec(
        "episode_gap_s",
        2.0,
        "Sim seconds skipped between episodes, so stamp-aligned chunk "
        "blending in the policy never mixes two episodes (keep >= horizon x action_dt).",
        0.0,
        3600.0,
        read_only=True,
    ),
    Spec("camera_topic_prefix", "camera", "Images go to <prefix>/<camera>/image_raw.", read_only=True),
    Spec(
        "joint_state_topic",
        "joint_states",
        "sensor_msgs/JointState output (names: " + ", ".join(STATE_JOINT_NAMES) + ").",
        read_only=True,
    ),
    Spec("instruction_topic", "instruction", "std_msgs/String output, RELIABLE + TRANSIENT_LOCAL.", read_only=True),
    Spec(
        "trajectory_topic",
        "joint_trajectory",
        "trajectory_msgs/JointTrajectory input: the policy's action chunks.",
        read_only=True,
    ),
    Spec(
        "action_joint_names",
        list(ACTION_JOINT_NAMES),
        "Joint names a chunk must carry (any order), mapped onto Meta-World's action (dx, dy, dz, grip).",
        read_only=True,
    ),
    Spec(
        "outcome_topic",
        "sim/episode_outcome",
        "std_msgs/String JSON per finished episode (RELIABLE + TRANSIENT_LOCAL).",
        read_only=True,
    ),
    Spec(
        "summary_topic",
        "sim/summary",
        "std_msgs/String JSON summary after the last episode (RELIABLE + TRANSIENT_LOCAL).",
        read_only=True,
    ),
    Spec(
        "diagnostics_topic",
        "/diagnostics",
        "diagnostic_msgs/DiagnosticArray after every "
        "episode: progress, success so far, chunk counters (WARN when the last episode had "
        "refused chunks or held still for most steps).",
        read_only=True,
    ),
    Spec(
        "publish_sim_state",
        False,
        "Also publish the privileged simulator observation "
        "(scripted experts, debugging); a learned policy must not read it.",
        read_only=True,
    ),
    Spec(
        "sim_state_topic",
        "sim/privileged_state",
        "Topic of the privileged observation (JointState, RELIABLE + TRANSIENT_LOCAL depth 1).",
        read_only=True,
    ),
    Spec("results_path", "", "Write the summary JSON here at the end (atomic); empty = don't.", read_only=True),
    Spec("exit_when_done", True, "Exit after the last episode (else keep running until interrupted).", read_only=True),
    Spec("progress", True, "Show a tqdm progress bar over episodes on stderr.", read_only=True),
)

LATCHED = dict(
    reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST
)


class Stop(Exception):
    """ROS shut down (Ctrl-C) while the bridge was waiting or stepping."""


def check_config(cfg: dict) -> None:
    """Refuse parameter values the episode loop cannot use, naming what is accepted."""
    if not cfg["tasks"]:
        raise ValueError(f"tasks is empty; give one or more of: {', '.join(TASKS)}")
    for task in cfg["tasks"]:
        check_task(task)
    if not cfg["seeds"]:
        raise ValueError("seeds is empty; give at least one metaworld.MT1 seed (e.g. 1000)")
    if cfg["episodes_per_task"] > STARTS_PER_SEED * len(cfg["seeds"]):
        raise ValueError(
            f"episodes_per_task {cfg['episodes_per_task']} exceeds the "
            f"{STARTS_PER_SEED} starts per seed x {len(cfg['seeds'])} seeds"
        )
    if not cfg["cameras"]:
        raise ValueError(f"cameras is empty; give one or more of: {', '.join(CAMERAS)}")
    for cam in cfg["cameras"]:
        if cam not in CAMERAS:
            raise ValueError(f"unknown camera {cam!r}; accepted: {', '.join(CAMERAS)}")
    names = list(cfg["action_joint_names"])
    if len(names) != 4 or len(set(names)) != 4:
        raise ValueError(f"action_joint_names must be 4 distinct names (dx, dy, dz, grip), got {names}")


def summarize(episodes: list[dict], counters: dict, cfg: dict, wall_s: float, complete: bool) -> dict:
    """Per-task and overall success (Wilson 95%), lengths and the bridge's chunk counters."""
    from quantvla_core.sim.stats import wilson_interval

    per_task = {}
    for task in dict.fromkeys(e["task"] for e in episodes):
        te = [e for e in episodes if e["task"] == task]
        k = sum(e["success"] for e in te)
        per_task[task] = {
            "successes": k,
            "episodes": len(te),
            "rate": k / len(te),
            "ci95": list(wilson_interval(k, len(te))),
            "mean_steps": float(np.mean([e["steps"] for e in te])),
        }
    k, n = sum(e["success"] for e in episodes), len(episodes)
    return {
        "format": SUMMARY_FORMAT,
        "version": 1,
        "complete": complete,
        "successes": k,
        "episodes": n,
        "mean_success": float(np.mean([t["rate"] for t in per_task.values()])) if n else 0.0,
        "ci95": list(wilson_interval(k, n)),
        "wall_s": round(wall_s, 2),
        "tasks": per_task,
        "counters": counters,
        "config": cfg,
        "episode_outcomes": episodes,
    }


def format_table(summary: dict) -> str:
    rows = [f"{'task':<26}{'success':>10}{'rate':>8}{'95% CI':>16}{'steps':>8}"]
    for task, t in summary["tasks"].items():
        lo, hi = t["ci95"]
        rows.append(
            f"{task:<26}{t['successes']:>5}/{t['episodes']:<4}{t['rate']:>8.2f}"
            f"{f'[{lo:.2f}, {hi:.2f}]':>16}{t['mean_steps']:>8.1f}"
        )
    lo, hi = summary["ci95"]
    rows.append(
        f"{'all':<26}{summary['successes']:>5}/{summary['episodes']:<4}"
        f"{summary['mean_success']:>8.2f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
    )
    return "\n".join(rows)


class SimBridge(Node):
    def __init__(self, **kwargs):
        super().__init__("sim_bridge", **kwargs)
        for spec in SPECS:
            self.declare_parameter(spec.name, spec.default, descriptor(spec))
        cfg = {s.name: self.get_parameter(s.name).value for s in SPECS}
        for key in ("tasks", "seeds", "cameras", "action_joint_names"):
            cfg[key] = list(cfg[key])
        check_config(cfg)
        self.cfg = cfg
        self.dt_ns = int(round(1e9 / cfg["control_rate_hz"]))
        self.t_ns = SIM_START_NS
        self.episode_start_ns = SIM_START_NS
        self.sync = bool(cfg["sync_chunks"]) and cfg["real_time_factor"] == 0
        self.player = ChunkPlayer(cfg["max_points_per_chunk"], sync_start=self.sync)
        self._cond = threading.Condition()
        self._pending: list = []  # parsed chunks not yet offered to the player
        self._counters = {
            "chunks_received": 0,
            "chunks_accepted": 0,
            "chunks_stale": 0,
            "chunks_late": 0,
            "chunks_too_old": 0,
            **{f"rejected_{c}": 0 for c in REJECT_CODES},
        }
        self._log = BurstLogger(lambda text: self.get_logger().warning(text), 5.0)
        self.starts = [s for task in cfg["tasks"] for s in starts_for(task, cfg["seeds"])[: cfg["episodes_per_task"]]]
        n = len(self.starts)
        self._clock_pub = self.create_publisher(Clock, "/clock", 10)
        self._joint_pub = self.create_publisher(JointState, cfg["joint_state_topic"], qos_profile_sensor_data)
        prefix = cfg["camera_topic_prefix"].rstrip("/")
        self.camera_topics = [f"{prefix}/{cam}/image_raw" if prefix else f"{cam}/image_raw" for cam in cfg["cameras"]]
        self._image_pubs = [
            self.create_publisher(Image, topic, qos_profile_sensor_data) for topic in self.camera_topics
        ]
        self._instruction_pub = self.create_publisher(String, cfg["instruction_topic"], QoSProfile(depth=1, **LATCHED))
        self._outcome_pub = self.create_publisher(
            String, cfg["outcome_topic"], QoSProfile(depth=min(max(n, 1), 1000), **LATCHED)
        )
        self._summary_pub = self.create_publisher(String, cfg["summary_topic"], QoSProfile(depth=1, **LATCHED))
        self._sim_state_pub = (
            self.create_publisher(JointState, cfg["sim_state_topic"], QoSProfile(depth=1, **LATCHED))
            if cfg["publish_sim_state"]
            else None
        )
        self._diag_pub = self.create_publisher(DiagnosticArray, cfg["diagnostics_topic"], 10)
        self.create_subscription(JointTrajectory, cfg["trajectory_topic"], self._on_trajectory, 10)
        self.get_logger().info(
            f"{n} episodes over {cfg['tasks']} x seeds {cfg['seeds']}, max {cfg['max_steps']} "
            f"steps at {cfg['control_rate_hz']} Hz sim, "
            + (
                ("lockstep" + (", chunks start at their own stamp" if self.sync else ""))
                if cfg["real_time_factor"] == 0
                else f"{cfg['real_time_factor']}x real time"
            )
            + f"; cameras {self.camera_topics}; chunks on {cfg['trajectory_topic']}"
        )

    # ------------------------------------------------------------------ chunks in
    def _on_trajectory(self, msg: JointTrajectory) -> None:
        """Validate on arrival (executor thread); the episode loop offers it to the player."""
        with self._cond:
            self._counters["chunks_received"] += 1
            now = self.t_ns
        try:
            chunk = parse_trajectory(msg, self.cfg["action_joint_names"], now, self.dt_ns)
        except TrajectoryRejected as exc:
            with self._cond:
                self._counters[f"rejected_{exc.code}"] += 1
            self._log.report("trajectory", exc.code, f"refused, not executed: {exc}")
            return
        with self._cond:
            self._pending.append(chunk)
            self._cond.notify_all()

    def _take_pending(self) -> None:
        """Offer arrived chunks to the player (called with the condition held)."""
        for chunk in self._pending:
            verdict = self.player.offer(chunk, self.episode_start_ns, self.t_ns)
            self._counters[f"chunks_{verdict}"] += 1
        self._pending.clear()

    def _next_action(self, timeout_s: float) -> np.ndarray | None:
        """The action due now, waiting up to `timeout_s` wall seconds for one; None = hold."""
        deadline = time.monotonic() + timeout_s
        next_clock = time.monotonic() + 0.5
        with self._cond:
            while True:
                self._take_pending()
                action = self.player.action_at(self.t_ns)
                if action is not None:
                    return action
                now = time.monotonic()
                if now >= deadline:
                    return None
                if not rclpy.ok(context=self.context):
                    raise Stop()
                if now >= next_clock:  # keep late joiners' clocks set while waiting
                    self._publish_clock()
                    next_clock = now + 0.5
                self._cond.wait(min(deadline - now, 0.1))

    # ------------------------------------------------------------------ observations out
    def _stamp(self) -> Time:
        return Time(sec=self.t_ns // 1_000_000_000, nanosec=self.t_ns % 1_000_000_000)

    def _publish_clock(self) -> None:
        self._clock_pub.publish(Clock(clock=self._stamp()))

    def _publish_observation(self, obs: dict, env) -> None:
        stamp = self._stamp()
        self._clock_pub.publish(Clock(clock=stamp))
        js = JointState(name=list(STATE_JOINT_NAMES), position=[float(v) for v in obs["state"]])
        js.header.stamp = stamp
        self._joint_pub.publish(js)
        for cam, pub, rgb in zip(self.cfg["cameras"], self._image_pubs, obs["images"]):
            img = rgb_to_image(rgb, "rgb8")
            img.header.stamp = stamp
            img.header.frame_id = cam
            pub.publish(img)
        if self._sim_state_pub is not None:
            full = JointState(
                name=[f"sim_obs_{i}" for i in range(len(env.sim_obs))], position=[float(v) for v in env.sim_obs]
            )
            full.header.stamp = stamp
            full.header.frame_id = env.task
            self._sim_state_pub.publish(full)

    def _publish_state_only(self, obs: dict) -> None:
        """Clock and joint state without frames: the policy computes nothing from it (used at
        an episode's end, so subscribers see where it ended, and before its first frame)."""
        self._clock_pub.publish(Clock(clock=self._stamp()))
        js = JointState(name=list(STATE_JOINT_NAMES), position=[float(v) for v in obs["state"]])
        js.header.stamp = self._stamp()
        self._joint_pub.publish(js)

    def _advance(self, ns: int, wall_t0: float, sim_t0: int) -> None:
        with self._cond:
            self.t_ns += ns
        factor = self.cfg["real_time_factor"]
        if factor > 0:  # pace: sim time t is due at wall_t0 + (t - sim_t0) / factor
            wait = wall_t0 + (self.t_ns - sim_t0) * 1e-9 / factor - time.monotonic()
            if wait > 0:
                time.sleep(wait)

    # ------------------------------------------------------------------ episodes
    def wait_for_policy(self, env, start) -> bool:
        """Before the first episode: until a trajectory publisher and an observation subscriber
        exist, then until the policy answers a probe frame (model loaded, warmed up, active).

        Probe frames show the first start's scene and instruction at advancing sim time
        (physics is not stepped); their chunks are never executed (stamped before episode 0).
        """
        deadline = time.monotonic() + self.cfg["startup_timeout_s"]
        topics = self.camera_topics + [self.cfg["joint_state_topic"]]
        if self._sim_state_pub is not None:
            topics.append(self.cfg["sim_state_topic"])
        while not (
            self.count_publishers(self.cfg["trajectory_topic"]) > 0
            and any(self.count_subscribers(t) > 0 for t in topics)
        ):
            if time.monotonic() > deadline:
                return self._no_policy(
                    "no publisher on " + self.cfg["trajectory_topic"] + " or no subscriber to the observations"
                )
            if not rclpy.ok(context=self.context):
                raise Stop()
            self._publish_clock()
            time.sleep(0.1)
        time.sleep(0.3)  # let the remaining endpoints match too
        obs = env.reset(start.seed, start.index)
        self._instruction_pub.publish(String(data=env.instruction))
        while True:
            self._publish_observation(obs, env)
            wait_until = min(deadline, time.monotonic() + 0.5)
            with self._cond:
                while not self._pending and time.monotonic() < wait_until:
                    if not rclpy.ok(context=self.context):
                        raise Stop()
                    self._cond.wait(0.05)
                if self._pending:
                    self.t_ns += self.dt_ns
                    return True
                self.t_ns += self.dt_ns
            if time.monotonic() >= deadline:
                return self._no_policy("no valid chunk answered the probe frames")

    def _no_policy(self, why: str) -> bool:
        self.get_logger().warning(
            f"no policy after {self.cfg['startup_timeout_s']} s ({why}); running anyway: the hand holds still"
        )
        return False

    def run_episode(self, env, start, number: int) -> dict:
        wall0 = time.monotonic()
        with self._cond:
            before = dict(self._counters)
            self.player.reset()
            self.episode_start_ns = self.t_ns
            self._take_pending()  # leftovers from the last episode count as stale
        obs = env.reset(start.seed, start.index)
        self._instruction_pub.publish(String(data=env.instruction))
        # The new episode's state and instruction reach the policy before its first frames, so
        # the first chunk is not computed from the previous episode's (now stale) joint state.
        self._publish_state_only(obs)
        time.sleep(0.05)
        hand0 = obs["state"][:3].copy()
        hand, path, holds = hand0.copy(), 0.0, 0
        sim0 = self.t_ns
        while not env.done:
            self._publish_observation(obs, env)
            action = self._next_action(self.cfg["chunk_timeout_s"])
            if action is None:
                holds += 1
                action = np.zeros(4, np.float32)
            obs, _ = env.step(action)
            path += float(np.linalg.norm(obs["state"][:3] - hand))
            hand = obs["state"][:3].copy()
            self._advance(self.dt_ns, wall0, sim0)
        self._publish_state_only(obs)
        end_ns = self.t_ns
        with self._cond:  # one more tick: the next episode's stamps are strictly newer
            self.t_ns += self.dt_ns
            delta = {k: v - before[k] for k, v in self._counters.items()}
            played = (
                self.player.points_executed,
                self.player.points_skipped,
                self.player.chunks_used,
                self.player.chunks_too_old,
            )
            self._counters["chunks_too_old"] += played[3]
        return {
            "format": OUTCOME_FORMAT,
            "version": 1,
            "episode": number,
            "task": start.task,
            "seed": start.seed,
            "index": start.index,
            "instruction": env.instruction,
            "success": bool(env.success),
            "steps": env.steps,
            "sim_time_start_s": sim0 * 1e-9,
            "sim_time_end_s": end_ns * 1e-9,
            "wall_s": round(time.monotonic() - wall0, 3),
            "hold_steps": holds,
            "points_executed": played[0],
            "points_skipped": played[1],
            "chunks_used": played[2],
            "chunks_too_old": played[3],
            "chunks_received": delta["chunks_received"],
            "chunks_rejected": sum(delta[f"rejected_{c}"] for c in REJECT_CODES),
            "chunks_stale": delta["chunks_stale"],
            "chunks_late": delta["chunks_late"],
            "hand_start": hand0.round(5).tolist(),
            "hand_end": hand.round(5).tolist(),
            "hand_path_m": round(path, 5),
        }

    def run(self) -> dict:
        """Every episode in order; returns the summary (also published and written)."""
        from tqdm import tqdm

        from quantvla_core.sim.demos import EnvSettings

        cfg = self.cfg
        settings = EnvSettings(tuple(cfg["cameras"]), cfg["image_size"], cfg["max_steps"])
        wall0 = time.monotonic()
        outcomes, env, complete = [], None, False
        bar = tqdm(total=len(self.starts), desc="sim_bridge", unit="ep", file=sys.stderr, disable=not cfg["progress"])
        try:
            for number, start in enumerate(self.starts):
                if env is None or env.task != start.task:
                    if env is not None:
                        env.close()
                    env = settings.make(start.task)
                if number == 0:
                    self.wait_for_policy(env, start)
                outcome = self.run_episode(env, start, number)
                outcomes.append(outcome)
                self._outcome_pub.publish(String(data=json.dumps(outcome)))
                self._publish_diagnostics(outcomes)
                wins = sum(o["success"] for o in outcomes)
                self.get_logger().info(
                    f"episode {number + 1}/{len(self.starts)} {start.task} seed {start.seed} "
                    f"start {start.index}: {'SUCCESS' if outcome['success'] else 'failure'} in "
                    f"{outcome['steps']} steps ({outcome['points_executed']} points executed, "
                    f"{outcome['hold_steps']} held, {outcome['chunks_rejected']} chunks "
                    f"rejected); {wins}/{len(outcomes)} so far"
                )
                bar.set_postfix(success=f"{wins}/{len(outcomes)}", refresh=False)
                bar.update(1)
                if cfg["episode_gap_s"] > 0 and number + 1 < len(self.starts):
                    self._advance(int(round(cfg["episode_gap_s"] * 1e9)), time.monotonic(), self.t_ns)
                    self._publish_clock()
                    time.sleep(0.05)  # the new time reaches the policy before the next frames
            complete = True
        finally:
            bar.close()
            if env is not None:
                env.close()
            with self._cond:
                self._counters["chunks_stale"] += len(self._pending)  # arrived after the end
                self._pending.clear()
                counters = dict(self._counters)
            summary = summarize(outcomes, counters, cfg, time.monotonic() - wall0, complete)
            self._finish(summary)
        return summary

    def _publish_diagnostics(self, outcomes: list[dict]) -> None:
        last = outcomes[-1]
        wins = sum(o["success"] for o in outcomes)
        problems = []
        if last["chunks_rejected"]:
            problems.append(f"{last['chunks_rejected']} chunks refused")
        if last["hold_steps"] * 2 > last["steps"]:
            problems.append(f"held still {last['hold_steps']} of {last['steps']} steps")
        with self._cond:
            counters = dict(self._counters)
        values = {
            "episodes_done": len(outcomes),
            "episodes_total": len(self.starts),
            "successes": wins,
            "success_rate": wins / len(outcomes),
            "last_task": last["task"],
            "last_success": last["success"],
            "last_steps": last["steps"],
            "last_hold_steps": last["hold_steps"],
            "last_points_executed": last["points_executed"],
            **counters,
        }
        arr = DiagnosticArray()
        arr.header.stamp = self._stamp()
        arr.status = [
            make_status(
                f"{self.get_name()}: episodes",
                "mt10",
                WARN if problems else OK,
                "; ".join(problems) or f"{wins}/{len(outcomes)} successes",
                values,
            )
        ]
        self._diag_pub.publish(arr)

    def _finish(self, summary: dict) -> None:
        if rclpy.ok(context=self.context):
            self._summary_pub.publish(String(data=json.dumps(summary)))
        if self.cfg["results_path"]:
            from quantvla_core.fileio import atomic_write_json

            atomic_write_json(self.cfg["results_path"], summary)
        if summary["episodes"]:
            print(format_table(summary), flush=True)
        counters = {k: v for k, v in summary["counters"].items() if v}
        log = (
            self.get_logger().info
            if rclpy.ok(context=self.context)
            else lambda text: print(f"[sim_bridge] {text}", file=sys.stderr)
        )
        log(
            f"done: {summary['successes']}/{summary['episodes']} successes"
            f"{'' if summary['complete'] else ' (interrupted)'}; chunk counters {counters}"
            + (f"; results in {self.cfg['results_path']}" if self.cfg["results_path"] else "")
        )


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = SimBridge()
    except (ValueError, ParameterException, NameValidationException) as exc:
        print(
            f"sim_bridge: bad parameters: {exc} (see config/sim_demo.yaml and `ros2 param describe sim_bridge <name>`)",
            file=sys.stderr,
        )
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def spin() -> None:
        try:
            executor.spin()
        except ExternalShutdownException:  # Ctrl-C: the episode loop notices via rclpy.ok
            pass

    spinner = threading.Thread(target=spin, name="sim_bridge-executor", daemon=True)
    spinner.start()
    code = 0
    try:
        summary = node.run()
        time.sleep(0.5)  # reliable outcome/summary samples reach their subscribers
        if not node.cfg["exit_when_done"]:
            while rclpy.ok(context=node.context):
                time.sleep(0.2)
        code = 0 if summary["complete"] else 1
    except (KeyboardInterrupt, ExternalShutdownException, Stop):
        code = 130
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
