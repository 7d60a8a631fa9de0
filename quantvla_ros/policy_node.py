"""`policy_node`: a managed (lifecycle) ROS 2 node serving a VLA policy.

configure loads the model (preset, model dir or quantized artifact) and warms it up; activate
starts an inference thread that turns the newest stamp-matched camera frames, the instruction
and the joint state into a JointTrajectory carrying the whole action chunk; deactivate stops it;
cleanup frees the model. Sensor callbacks only validate, convert and store the newest frame, so
they never wait for inference (which runs in its own thread; the executor only serves callbacks).
Bad input is refused before the model, logged once per burst and counted in /diagnostics.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import sys
import threading
import time
import traceback

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import (ExternalShutdownException, MultiThreadedExecutor,
                             SingleThreadedExecutor)
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from quantvla_ros import params as P
from quantvla_ros.burst_log import BurstLogger
from quantvla_ros.chunk_aggregation import MODES, ChunkAggregator
from quantvla_ros.diagnostics import ERROR, OK, WARN, Counters, LatencyStats, RateMeter, make_status
from quantvla_ros.frame_sync import FrameStore
from quantvla_ros.image_conversion import ImageConversionError, message_to_rgb
from quantvla_ros.input_validation import InputError, check_stamp, clean_instruction, joint_state_vector
from quantvla_ros.power import SOURCES, EnergyMeter, detect_power_source

# Latency stages reported in diagnostics (model stages come from ActionChunk.timings_ms).
STAGES = ("preprocess", "vision_prefix", "denoise", "postprocess", "total", "node_overhead",
          "end_to_end")
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)

# How long an image callback sleeps after storing a frame, so the woken inference thread takes
# the GIL at once (measured: queue p50 0.6 -> 0.1 ms at 640x480 30 Hz on 2 cores).
GIL_HANDOFF_S = 1e-4

class ConfigError(ValueError):
    """Parameters or model that make configure fail; the text is the reason users see."""


def stamp_to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def duration_of(seconds: float) -> Duration:
    ns = int(round(seconds * 1e9))
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def camera_kinds(topics: list[str], types: list[str]) -> list[str]:
    """Per topic 'raw' or 'compressed'; an unset entry follows the '/compressed' suffix."""
    if types and len(types) != len(topics):
        raise ConfigError(f"camera_types has {len(types)} entries for {len(topics)} camera_topics; "
                          "give one per topic (raw or compressed) or leave it unset")
    kinds = []
    for i, topic in enumerate(topics):
        kind = types[i] if types else ""
        if kind not in ("", "raw", "compressed"):
            raise ConfigError(f"camera_types[{i}] is {kind!r}; accepted: raw, compressed")
        kinds.append(kind or ("compressed" if topic.rstrip("/").endswith("/compressed") else "raw"))
    return kinds


class PolicyNode(LifecycleNode):
    # How long deactivate/cleanup wait for an inference in flight before giving up.
    stop_timeout_s = 30.0

    def __init__(self, node_name: str = "policy_node", **kwargs):
        super().__init__(node_name, **kwargs)
        P.declare_all(self)
        self._lock = threading.Lock()
        self._lifecycle = "unconfigured"
        self._config_error = ""
        self._policy = None
        self._cfg: dict = {}
        self._subs = []
        self._traj_pub = None
        self._frames: FrameStore | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # the running thread's own stop flag (new per thread)
        self._instruction = None  # (text, receive time s) or None
        self._joint_state = None  # (vector, receive time s) or None
        self._last_stamp: list[float | None] = []
        self._reset_stats()
        self._input_group = ReentrantCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()
        self._diag_pub = self.create_publisher(
            DiagnosticArray, self.get_parameter("diagnostics_topic").value, 10)
        self._diag_timer = self.create_timer(
            self.get_parameter("diagnostics_period_s").value, self._publish_diagnostics,
            callback_group=self._diag_group)
        quiet = self.get_parameter("log_quiet_s").value
        # rclpy fixes one severity per call site, so each severity logs from its own method.
        self._warn_log = BurstLogger(self._log_warning, quiet)
        self._error_log = BurstLogger(self._log_error, quiet)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._autostart_timer = None
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.0, self._autostart,
                                                      callback_group=MutuallyExclusiveCallbackGroup())

    def _log_warning(self, text: str) -> None:
        self.get_logger().warning(text)

    def _log_error(self, text: str) -> None:
        self.get_logger().error(text)

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        for p in parameters:
            spec = P.SPEC_BY_NAME.get(p.name)
            if spec is None:
                continue
            if not spec.live and self._lifecycle != "unconfigured":
                return SetParametersResult(successful=False, reason=(
                    f"{p.name} is read at configure; change it while the node is unconfigured "
                    f"(now {self._lifecycle}); live parameters: "
                    + ", ".join(s.name for s in P.SPECS if s.live)))
            if p.name == "chunk_aggregation" and p.value not in MODES:
                return SetParametersResult(successful=False, reason=(
                    f"chunk_aggregation {p.value!r} is not one of {', '.join(MODES)}"))
            if p.name in ("action_min", "action_max") and self._policy is not None:
                dim = self._cfg["action_dim"]
                if p.value is not None and len(p.value) not in (0, dim):
                    return SetParametersResult(successful=False, reason=(
                        f"{p.name} has {len(p.value)} entries; the model has {dim} action "
                        "dimensions"))
            if p.name == "power_source" and p.value not in SOURCES:
                return SetParametersResult(successful=False, reason=(
                    f"power_source {p.value!r} is not one of {', '.join(SOURCES)}"))
        return SetParametersResult(successful=True)

    def _live(self, name: str):
        """A live parameter's current value (unset lists as [])."""
        try:
            value = self.get_parameter(name).value
        except Exception:  # noqa: BLE001 - uninitialised typed parameter
            return []
        return value if value is not None else []

    # ------------------------------------------------------------------ lifecycle
    def _autostart(self) -> None:
        self._autostart_timer.cancel()
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a clear reason
            reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self._config_error = reason
            self.get_logger().error(f"configure failed: {reason}")
            if not isinstance(exc, ConfigError):
                self.get_logger().debug(traceback.format_exc())
            self._teardown()
            self._lifecycle = "unconfigured"
            return TransitionCallbackReturn.FAILURE
        self._config_error = ""
        self._lifecycle = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        cfg = P.values(self)
        if not cfg["camera_topics"]:
            raise ConfigError("camera_topics is empty; give at least one camera topic")
        kinds = camera_kinds(cfg["camera_topics"], cfg["camera_types"])
        try:
            from quantvla_core.policy import Observation, Policy
        except ImportError as exc:
            raise ConfigError(f"the model runtime quantvla_core.policy is not importable: {exc}")
        model = cfg["model"]
        if not model:
            raise ConfigError("parameter model is empty; give a preset name (e.g. tiny), a model "
                              "directory or a quantized artifact directory")
        t0 = time.perf_counter()
        try:
            policy = Policy.load(model, device=cfg["device"], dtype=cfg["dtype"] or None)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"could not load model {model!r} on {cfg['device']}: "
                              f"{type(exc).__name__}: {exc}") from exc
        load_s = time.perf_counter() - t0
        horizon, action_dim, state_dim = policy.horizon, policy.action_dim, policy.state_dim
        max_cams = getattr(policy.config, "max_cameras", len(kinds))
        if len(kinds) > max_cams:
            raise ConfigError(f"{len(kinds)} camera_topics but model {model!r} takes at most "
                              f"{max_cams} cameras")
        joint_names = cfg["joint_names"] or [f"joint_{i}" for i in range(action_dim)]
        if len(joint_names) != action_dim:
            raise ConfigError(f"joint_names has {len(joint_names)} entries; model {model!r} "
                              f"outputs {action_dim} action dimensions")
        if cfg["state_joint_names"] and len(cfg["state_joint_names"]) != state_dim:
            raise ConfigError(f"state_joint_names has {len(cfg['state_joint_names'])} entries; "
                              f"model {model!r} takes a state of {state_dim}")
        if cfg["actions_per_chunk"] > horizon:
            raise ConfigError(f"actions_per_chunk {cfg['actions_per_chunk']} exceeds the model "
                              f"horizon {horizon}")
        self._check_limits(cfg["action_min"], cfg["action_max"], action_dim)
        if cfg["chunk_aggregation"] not in MODES:
            raise ConfigError(f"chunk_aggregation {cfg['chunk_aggregation']!r} is not one of "
                              f"{', '.join(MODES)}")
        if cfg["num_threads"] > 0:
            import torch
            torch.set_num_threads(cfg["num_threads"])
        warm = np.zeros((240, 320, 3), np.uint8)
        t0 = time.perf_counter()
        for i in range(cfg["warmup_count"]):
            try:
                policy.predict(Observation(images=[warm] * len(kinds), instruction="warm up",
                                           state=np.zeros(state_dim, np.float32)), seed=i)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"model {model!r} failed during warm-up: "
                                  f"{type(exc).__name__}: {exc}") from exc
        warm_s = time.perf_counter() - t0
        power, power_note = detect_power_source(cfg["power_source"], cfg["device"])
        self._energy = EnergyMeter(power)
        self._power_note = power_note
        self._policy, self._observation_cls = policy, Observation
        self._cfg = dict(cfg, kinds=kinds, joint_names=joint_names, horizon=horizon,
                         action_dim=action_dim, state_dim=state_dim)
        try:
            self._describe = dict(policy.describe())
        except Exception as exc:  # noqa: BLE001
            self._describe = {"scheme": f"unknown ({type(exc).__name__})", "weight_bytes": -1}
        self._aggregator = ChunkAggregator(cfg["chunk_aggregation"],
                                           cfg["aggregation_weight_new"], cfg["action_dt"])
        self._frames = FrameStore(len(kinds), cfg["sync_queue_size"])
        self._last_stamp = [None] * len(kinds)
        self._instruction = None
        self._joint_state = None
        self._reset_stats()
        for cam, (topic, kind) in enumerate(zip(cfg["camera_topics"], kinds)):
            msg_type = CompressedImage if kind == "compressed" else Image
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, cam=cam: self._on_image(cam, msg),
                qos_profile_sensor_data, callback_group=self._input_group))
        self._subs.append(self.create_subscription(
            String, cfg["instruction_topic"], self._on_instruction, INSTRUCTION_QOS,
            callback_group=self._input_group))
        if cfg["joint_state_topic"]:
            self._subs.append(self.create_subscription(
                JointState, cfg["joint_state_topic"], self._on_joint_state,
                qos_profile_sensor_data, callback_group=self._input_group))
        self._traj_pub = self.create_lifecycle_publisher(JointTrajectory, cfg["trajectory_topic"], 10)
        self._timing_pub = (self.create_lifecycle_publisher(DiagnosticArray, cfg["timing_topic"], 10)
                            if cfg["timing_topic"] else None)
        self.get_logger().info(
            f"configured: model {model!r} ({self._describe.get('scheme')}, "
            f"{self._describe.get('weight_bytes')} weight bytes) on {cfg['device']}, "
            f"horizon {horizon} x {action_dim}, state {state_dim}, cameras {cfg['camera_topics']} "
            f"({kinds}); load {load_s:.2f} s, {cfg['warmup_count']} warm-up runs {warm_s:.2f} s; "
            f"power source {power.name}")

    @staticmethod
    def _check_limits(lo: list, hi: list, action_dim: int) -> None:
        if not lo and not hi:
            return
        if len(lo) != action_dim or len(hi) != action_dim:
            raise ConfigError(f"action_min/action_max have {len(lo)}/{len(hi)} entries; give "
                              f"both with {action_dim} (the model's action_dim) or neither")
        bad = [i for i in range(action_dim) if not lo[i] < hi[i]]
        if bad:
            raise ConfigError(f"action_min must be < action_max; not so at index {bad[:5]}")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._thread is not None and self._thread.is_alive():
            self.get_logger().error("activate refused: the previous inference thread is still "
                                    "running (an inference did not finish); try again later")
            return TransitionCallbackReturn.FAILURE
        self._frames.clear()
        self._aggregator.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._inference_loop, args=(self._frames, self._stop),
                                        name="quantvla-inference", daemon=True)
        self._thread.start()
        self._lifecycle = "active"
        self.get_logger().info("activated: publishing action chunks"
                               + (" (dry_run: trajectories are computed, not published)"
                                  if self._live("dry_run") else ""))
        return super().on_activate(state)

    def _stop_thread(self) -> bool:
        """Stop the inference thread; False (and an error logged) if it is still running after
        stop_timeout_s. It keeps its own stop flag and closed store, so it exits on its own later
        and a new thread is never started beside it."""
        self._stop.set()
        if self._frames is not None:
            self._frames.close()
        if self._thread is not None:
            self._thread.join(timeout=self.stop_timeout_s)
            if self._thread.is_alive():
                self.get_logger().error(f"the inference thread did not stop within "
                                        f"{self.stop_timeout_s} s (an inference is still running)")
                return False
            self._thread = None
        return True

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self._stop_thread():
            self.get_logger().error("deactivate refused: the node stays active (it publishes at "
                                    "most the chunk in flight); deactivate again once it finished")
            return TransitionCallbackReturn.FAILURE
        self._lifecycle = "inactive"
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def _teardown(self) -> None:
        """Stop inference, drop subscriptions/publisher and free the model."""
        self._stop_thread()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._traj_pub is not None:
            self.destroy_lifecycle_publisher(self._traj_pub)
            self._traj_pub = None
        if getattr(self, "_timing_pub", None) is not None:
            self.destroy_lifecycle_publisher(self._timing_pub)
            self._timing_pub = None
        device = str(self._cfg.get("device", "cpu"))
        self._policy = None
        self._frames = None
        gc.collect()
        if device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._lifecycle = "unconfigured"
        self.get_logger().info("cleaned up: model freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self._lifecycle = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in lifecycle state {state.label}; cleaning up")
        self._teardown()
        self._lifecycle = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ inputs
    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reset_stats(self) -> None:
        self._counters = Counters()
        self._latency = LatencyStats()
        self._rate = RateMeter()
        self._last_energy = None
        self._last_blended = 0
        self._last_problem = ""

    def _refuse(self, source: str, code: str, message: str, level: str = "error") -> None:
        """Count and log (once per burst) an input that produces no action."""
        kind = "stale" if level == "warn" else "invalid"
        self._counters.bump(f"{kind}.{source}.{code}")
        self._last_problem = f"{source}: {message}"
        (self._warn_log if level == "warn" else self._error_log).report(source, code, message)

    def _on_image(self, cam: int, msg) -> None:
        source = f"camera{cam}"
        self._counters.bump(f"received.{source}")
        frames = self._frames
        if frames is None:
            return
        t_recv = time.perf_counter()
        now = self._now_s()
        stamp = stamp_to_s(msg.header.stamp)
        try:
            check_stamp(stamp, now, self._last_stamp[cam],
                        self._live("image_timeout_s"), self._live("max_future_s"))
            rgb = message_to_rgb(msg, max_pixels=self._cfg["max_image_pixels"],
                                 depth_max_m=self._cfg["depth_max_m"])
        except (InputError, ImageConversionError) as exc:
            self._refuse(source, exc.code, f"{exc} (topic {self._cfg['camera_topics'][cam]})",
                         "warn" if exc.code == "stamp_old" else "error")
            return
        except Exception as exc:  # noqa: BLE001 - never let a message kill the node
            self._refuse(source, "conversion_failed", f"{type(exc).__name__}: {exc}")
            return
        self._last_stamp[cam] = stamp
        # meta: (header stamp, node-clock receive time, perf_counter after conversion, conversion ms)
        t_done = time.perf_counter()
        frames.put(cam, stamp, rgb, meta=(msg.header.stamp, now, t_done, (t_done - t_recv) * 1e3))
        # Hand the GIL to the inference thread now: put() woke it, but it would otherwise wait for
        # the executor's own bookkeeping (~0.5 ms here) or the switch interval before it starts.
        time.sleep(GIL_HANDOFF_S)

    def _on_instruction(self, msg: String) -> None:
        self._counters.bump("received.instruction")
        try:
            text = clean_instruction(msg.data, self._live("max_instruction_chars"))
        except InputError as exc:
            with self._lock:
                self._instruction = None  # a refused newer instruction supersedes the old one
            self._refuse("instruction", exc.code, str(exc))
            return
        with self._lock:
            self._instruction = (text, self._now_s())
        self.get_logger().info(f"instruction: {text!r}")

    def _on_joint_state(self, msg: JointState) -> None:
        self._counters.bump("received.joint_state")
        try:
            vec = joint_state_vector(list(msg.name), list(msg.position), self._cfg["state_dim"],
                                     self._cfg["state_joint_names"])
        except InputError as exc:
            with self._lock:
                self._joint_state = None
            self._refuse("joint_state", exc.code, str(exc))
            return
        with self._lock:
            self._joint_state = (vec, self._now_s())

    def _too_old(self, what: str, received: float, now: float, timeout_param: str) -> bool:
        """Refuse (count, warn once per burst) an input older than its live timeout."""
        timeout = self._live(timeout_param)
        if timeout > 0 and now - received > timeout:
            self._refuse(what, "stale", f"{what.replace('_', ' ')} is {now - received:.2f} s old "
                         f"({timeout_param} {timeout})", "warn")
            return True
        return False

    def _current_inputs(self, now: float):
        """(instruction, state) for the next chunk, or None after counting why not."""
        with self._lock:
            instruction, joint_state = self._instruction, self._joint_state
        if instruction is None:
            self._refuse("instruction", "missing", "no valid instruction yet on "
                         f"{self._cfg['instruction_topic']}; no action", "warn")
            return None
        if self._too_old("instruction", instruction[1], now, "instruction_timeout_s"):
            return None
        if joint_state is None:
            if not self._cfg["joint_state_topic"] or not self._live("require_joint_state"):
                return instruction[0], np.zeros(self._cfg["state_dim"], np.float32)
            self._refuse("joint_state", "missing", "no valid joint state yet on "
                         f"{self._cfg['joint_state_topic']}; no action", "warn")
            return None
        # A state that arrived but went stale is never fed, required or not.
        if self._too_old("joint_state", joint_state[1], now, "joint_state_timeout_s"):
            return None
        return instruction[0], joint_state[0]

    # ------------------------------------------------------------------ inference
    def _inference_loop(self, frames: FrameStore, stop: threading.Event) -> None:
        """Runs until its own stop flag is set or its store is closed (never another's)."""
        retry_generation = -1
        last_start = 0.0
        while not stop.is_set() and not frames.closed:
            try:
                rate = self._live("replan_rate_hz")
                if rate > 0:
                    wait = last_start + 1.0 / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(min(wait, 0.1))
                        continue
                if not frames.wait_for_new(0.1, retry_generation):
                    continue
                matched, reason = frames.take_matched(self._live("stamp_tolerance_s"))
                if matched is None:
                    if reason.startswith("unmatched"):
                        retry_generation = frames.generation
                        self._counters.bump("unmatched")
                        self._warn_log.report("cameras", "unmatched", (
                            f"camera {reason.split(':')[1]} has no frame within "
                            f"stamp_tolerance_s {self._live('stamp_tolerance_s')} s of the "
                            "reference camera"))
                    continue
                retry_generation = -1
                last_start = time.monotonic()
                self._act(matched)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                self._counters.bump("inference_error")
                self._error_log.report("inference", type(exc).__name__,
                                       f"inference failed, no action: {type(exc).__name__}: {exc}")

    def _act(self, matched) -> None:
        t_taken = time.perf_counter()
        now = self._now_s()
        timeout = self._live("image_timeout_s")
        if timeout > 0 and now - matched.stamp_s > timeout:
            self._refuse("camera0", "stale", f"newest frame is {now - matched.stamp_s:.3f} s old "
                         f"(image_timeout_s {timeout}); no action", "warn")
            return
        inputs = self._current_inputs(now)
        if inputs is None:
            return
        instruction, state = inputs
        token = self._energy.start()
        chunk = self._policy.predict(self._observation_cls(images=matched.images,
                                                           instruction=instruction, state=state),
                                     seed=self._cfg["seed"])
        energy = self._energy.stop(token)
        actions = np.asarray(chunk.actions, dtype=np.float32)
        n = self._cfg["actions_per_chunk"] or actions.shape[0]
        actions = actions[:n]
        self._counters.bump("chunks_computed")
        if not np.all(np.isfinite(actions)):
            self._refuse("model", "nonfinite_actions", "the model returned non-finite actions; "
                         "chunk not published")
            return
        self._aggregator.mode = self._live("chunk_aggregation")
        self._aggregator.weight_new = self._live("aggregation_weight_new")
        # Limits apply to what is published: the blend with the previous chunk (limited when it
        # was published, maybe under looser limits) can leave limits tightened since.
        lo, hi = self._live("action_min"), self._live("action_max")
        # Only a limits refusal rolls the merge back, so only then is the copy needed (hot path).
        before_merge = copy.deepcopy(self._aggregator) if lo or hi else None
        actions, blended = self._aggregator.merge(actions, matched.stamp_s)
        if lo or hi:
            try:
                self._check_limits(lo, hi, actions.shape[1])
            except ConfigError as exc:  # e.g. only one of the two set yet: never act unlimited
                self._counters.bump("chunks_refused_limits")
                self._refuse("model", "action_limits_invalid", f"{exc}; chunk not published")
                self._aggregator = before_merge  # a refused chunk is not blended with later
                return
            lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
            outside = (actions < lo) | (actions > hi)
            if outside.any():
                if not self._live("clip_actions"):
                    self._counters.bump("chunks_refused_limits")
                    self._refuse("model", "action_limits", f"{int(outside.sum())} action values "
                                 "leave [action_min, action_max] and clip_actions is false; chunk "
                                 "not published")
                    self._aggregator = before_merge
                    return
                self._counters.bump("chunks_clipped")
                self._counters.bump("values_clipped", int(outside.sum()))
                actions = np.clip(actions, lo, hi)
        self._last_blended = blended
        msg = JointTrajectory()
        stamp_msg, t_recv_node, t_converted, convert_ms = matched.meta
        msg.header.stamp = stamp_msg
        msg.joint_names = list(self._cfg["joint_names"])
        dt = self._cfg["action_dt"]
        msg.points = [JointTrajectoryPoint(positions=row.astype(float).tolist(),
                                           time_from_start=duration_of(k * dt))
                      for k, row in enumerate(actions)]
        if not self._live("dry_run"):
            self._traj_pub.publish(msg)
            self._counters.bump("chunks_published")
        done = time.perf_counter()
        self._rate.tick()
        t = chunk.timings_ms
        model_total = float(t.get("total", 0.0))
        self._latency.add("preprocess", t.get("preprocess", 0.0))
        self._latency.add("vision_prefix", t.get("vision", 0.0) + t.get("prefix", 0.0))
        self._latency.add("denoise", t.get("denoise", 0.0))
        self._latency.add("postprocess", t.get("postprocess", 0.0))
        self._latency.add("total", model_total)
        node_overhead = (done - t_taken) * 1e3 - model_total
        self._latency.add("node_overhead", node_overhead)
        self._latency.add("end_to_end", (self._now_s() - matched.stamp_s) * 1e3)
        if energy is not None:
            self._last_energy = energy
        if self._timing_pub is not None:
            timing = DiagnosticArray()
            timing.header.stamp = stamp_msg
            values = dict(t, node_overhead=node_overhead, camera_skew=matched.skew_s * 1e3,
                          transport=(t_recv_node - matched.stamp_s) * 1e3, convert=convert_ms,
                          queue=(t_taken - t_converted) * 1e3,
                          published=0.0 if self._live("dry_run") else 1.0)
            if energy is not None:
                values.update(energy_j=energy[0], power_w=energy[1])
            timing.status = [make_status("chunk", self._cfg["device"], OK, "timings in ms",
                                         {k: f"{float(v):.6g}" for k, v in values.items()})]
            self._timing_pub.publish(timing)

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        try:
            arr = DiagnosticArray()
            arr.header.stamp = self.get_clock().now().to_msg()
            arr.status = [self._policy_status(), self._inputs_status(), self._resources_status()]
            self._diag_pub.publish(arr)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self._error_log.report("diagnostics", type(exc).__name__, f"diagnostics failed: {exc}")

    def _policy_status(self):
        name = f"{self.get_name()}: policy"
        desc = getattr(self, "_describe", {}) if self._policy is not None else {}
        values = {"lifecycle_state": self._lifecycle, "model": self.get_parameter("model").value,
                  "device": self.get_parameter("device").value,
                  "scheme": desc.get("scheme", "n/a"),
                  "weight_bytes": desc.get("weight_bytes", "n/a"),
                  "weight_mib": (desc["weight_bytes"] / 2**20
                                 if isinstance(desc.get("weight_bytes"), (int, float)) else "n/a"),
                  "dry_run": bool(self._live("dry_run")),
                  "chunk_aggregation": self._live("chunk_aggregation"),
                  "inference_rate_hz": self._rate.rate_hz(),
                  "chunks_computed": self._counters.get("chunks_computed"),
                  "chunks_published": self._counters.get("chunks_published"),
                  "chunks_clipped": self._counters.get("chunks_clipped"),
                  "chunks_refused_limits": self._counters.get("chunks_refused_limits"),
                  "inference_errors": self._counters.get("inference_error"),
                  "last_blended_steps": self._last_blended,
                  "model_max_text_tokens": (getattr(self._policy.config, "max_text_tokens", "n/a")
                                            if self._policy is not None else "n/a"),
                  "latency_samples": self._latency.count("total")}
        for stage in STAGES:
            pct = self._latency.percentiles(stage)
            for p in (50, 90, 99):
                values[f"{stage}_ms_p{p}"] = pct[p] if pct else "n/a"
        if self._config_error:
            return make_status(name, values["device"], ERROR,
                               f"configure failed: {self._config_error}", values)
        if self._counters.recent("inference_error", 5.0):
            return make_status(name, values["device"], ERROR, "inference failing", values)
        return make_status(name, values["device"], OK, self._lifecycle, values)

    def _inputs_status(self):
        name = f"{self.get_name()}: inputs"
        values = {}
        topics = self._cfg.get("camera_topics", self.get_parameter("camera_topics").value)
        dropped = self._frames.dropped if self._frames is not None else [0] * len(topics)
        counts = dict(self._counters.items())
        for cam, topic in enumerate(topics):
            src = f"camera{cam}"
            values[f"{src}_topic"] = topic
            values[f"{src}_received"] = counts.get(f"received.{src}", 0)
            values[f"{src}_dropped"] = dropped[cam] if cam < len(dropped) else 0
            values[f"{src}_stale"] = sum(v for k, v in counts.items() if k.startswith(f"stale.{src}."))
            values[f"{src}_invalid"] = sum(v for k, v in counts.items()
                                           if k.startswith(f"invalid.{src}."))
        values["unmatched_frame_sets"] = counts.get("unmatched", 0)
        for src in ("instruction", "joint_state"):
            values[f"{src}_received"] = counts.get(f"received.{src}", 0)
            values[f"{src}_stale"] = sum(v for k, v in counts.items() if k.startswith(f"stale.{src}."))
            values[f"{src}_invalid"] = sum(v for k, v in counts.items()
                                           if k.startswith(f"invalid.{src}."))
        values["model_output_refused"] = sum(v for k, v in counts.items()
                                             if k.startswith("invalid.model."))
        for key, value in counts.items():  # every failure class, e.g. invalid.camera0.truncated
            if key.startswith(("invalid.", "stale.")):
                values[key] = value
        with self._lock:
            values["instruction"] = self._instruction[0] if self._instruction else "(none)"
            # the model reads a bounded prompt: compare with the policy status' model_max_text_tokens
            values["instruction_utf8_bytes"] = (len(self._instruction[0].encode("utf-8"))
                                                if self._instruction else 0)
        values["last_problem"] = self._last_problem or "(none)"
        # A problem keeps its level for a few periods, so a one-off burst is seen by monitors.
        window = max(3.0 * self.get_parameter("diagnostics_period_s").value, 2.0)
        recent_invalid = self._counters.recent("invalid.", window)
        recent_stale = self._counters.recent("stale.", window)
        parts = ([f"invalid input: {', '.join(recent_invalid)}"] if recent_invalid else []) + \
            ([f"stale or missing input: {', '.join(recent_stale)}"] if recent_stale else [])
        if parts:
            return make_status(name, "", ERROR if recent_invalid else WARN, "; ".join(parts),
                               values)
        return make_status(name, "", OK, "inputs ok", values)

    def _resources_status(self):
        name = f"{self.get_name()}: resources"
        device = str(self._cfg.get("device", self.get_parameter("device").value))
        values = {}
        if device.startswith("cuda") and self._policy is not None:
            import torch
            values["gpu_memory_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
            values["gpu_memory_reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
            values["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            values["gpu_memory_allocated_mib"] = f"n/a (device {device})"
        try:
            import psutil
            values["process_rss_mib"] = psutil.Process().memory_info().rss / 2**20
        except ImportError:
            values["process_rss_mib"] = "n/a (psutil not installed)"
        meter = getattr(self, "_energy", None)
        if meter is None or not meter.available:
            values["power_source"] = "unavailable"
            values["power_note"] = getattr(self, "_power_note", "") or "not configured"
            values["power_w"] = "unavailable"
            values["energy_per_chunk_j"] = "unavailable"
        else:
            values["power_source"] = meter.source.name
            if self._last_energy is not None:
                values["energy_per_chunk_j"] = self._last_energy[0]
                values["power_w"] = self._last_energy[1]
            else:
                values["energy_per_chunk_j"] = "n/a (no chunk yet)"
                values["power_w"] = "n/a (no chunk yet)"
        return make_status(name, device, OK, f"power source: {values['power_source']}", values)


EXECUTORS = ("single_threaded", "multi_threaded")


def make_executor(kind: str):
    """The executor named by the `executor` parameter (ValueError for an unknown name)."""
    if kind == "single_threaded":
        return SingleThreadedExecutor()
    if kind == "multi_threaded":
        return MultiThreadedExecutor(4)
    raise ValueError(f"executor {kind!r} is not one of {', '.join(EXECUTORS)}")


def apply_gil_switch_interval(node) -> float:
    """sys.setswitchinterval from gil_switch_interval_ms (0 = leave CPython's); returns the
    interval now in force, in ms."""
    ms = node.get_parameter("gil_switch_interval_ms").value
    if ms > 0:
        sys.setswitchinterval(ms * 1e-3)
    return sys.getswitchinterval() * 1e3


# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def apply_malloc_thresholds(mib: int) -> str:
    """mallopt from malloc_mmap_threshold_mib; returns what is in force, for the log."""
    if mib <= 0:
        return "glibc default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as exc:
        return f"unchanged (no glibc mallopt: {exc})"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    size = int(mib) * 2**20
    if mallopt(M_MMAP_THRESHOLD, size) != 1 or mallopt(M_TRIM_THRESHOLD, 4 * size) != 1:
        return f"unchanged (mallopt refused {mib} MiB)"
    return f"mmap threshold {mib} MiB, trim threshold {4 * mib} MiB"


def main(args=None) -> int:
    rclpy.init(args=args)
    node = PolicyNode()
    kind = node.get_parameter("executor").value
    try:
        executor = make_executor(kind)
    except ValueError as exc:
        node.get_logger().error(str(exc))
        node.destroy_node()
        rclpy.try_shutdown()
        return 2
    # Process-wide, so it is set here and not per node (tests build nodes in their own process).
    gil_ms = apply_gil_switch_interval(node)
    malloc = apply_malloc_thresholds(node.get_parameter("malloc_mmap_threshold_mib").value)
    node.get_logger().info(f"executor {kind}, GIL switch interval {gil_ms:g} ms, malloc {malloc}")
    # Inference always runs in its own thread; the executor only serves callbacks.
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop_thread()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
