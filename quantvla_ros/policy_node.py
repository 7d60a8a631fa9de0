"""`policy_node`: a managed (lifecycle) ROS 2 node serving a VLA policy.

configure loads the model (preset, model dir or quantized artifact) and warms it up; activate
starts the inference worker that turns the newest stamp-matched camera frames, the instruction
and the joint state into a JointTrajectory carrying the whole action chunk; deactivate stops
it; cleanup frees the model. The lifecycle state is rclpy's state machine's (`ros2 lifecycle
get` and /diagnostics agree by construction). The pieces live in their own modules:

- `gating`: sensor callbacks, validation, newest-value stores, camera ages;
- `inference_worker`: the inference thread;
- `chunk_aggregation`: how a new chunk meets the committed one (blend / smoothing);
- `publishing`: the output gate that nothing publishes around, trajectory building, deadlines;
- `node_diagnostics`: the /diagnostics statuses;
- `node_runtime`: executor, process settings and the signal-driven clean shutdown.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "policy_node":
    # The executable: a stop request during the heavy imports below is kept for main().
    from quantvla_ros import early_signals

    early_signals.capture()

import gc  # noqa: E402
import math
import threading
import time
import traceback

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros import node_diagnostics as ND
from quantvla_ros import params as P
from quantvla_ros.burst_log import BurstLogger
from quantvla_ros.chunk_aggregation import MODES, ChunkAggregator
from quantvla_ros.diagnostics import OK, Counters, LatencyStats, RateMeter, make_status
from quantvla_ros.gating import InputGate
from quantvla_ros.inference_worker import InferenceWorker
from quantvla_ros.node_runtime import (
    EXECUTORS,  # noqa: F401  (re-exported: tests and tools reach the runtime through the node)
    StopSignal,
    apply_gil_switch_interval,
    apply_malloc_thresholds,
    make_executor,
    spin_until,
)
from quantvla_ros.power import SOURCES, EnergyMeter, detect_power_source
from quantvla_ros.publishing import DeadlineMonitor, OutputGate, build_trajectory, duration_of  # noqa: F401

STAGES = ND.STAGES
INSTRUCTION_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


class ConfigError(ValueError):
    """Parameters or model that make configure fail; the text is the reason users see."""


def stamp_to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def camera_kinds(topics: list[str], types: list[str]) -> list[str]:
    """Per topic 'raw' or 'compressed'; an unset entry follows the '/compressed' suffix."""
    if types and len(types) != len(topics):
        raise ConfigError(
            f"camera_types has {len(types)} entries for {len(topics)} camera_topics; "
            "give one per topic (raw or compressed) or leave it unset"
        )
    kinds = []
    for i, topic in enumerate(topics):
        kind = types[i] if types else ""
        if kind not in ("", "raw", "compressed"):
            raise ConfigError(f"camera_types[{i}] is {kind!r}; accepted: raw, compressed")
        kinds.append(kind or ("compressed" if topic.rstrip("/").endswith("/compressed") else "raw"))
    return kinds


def limits_problem(lo: list, hi: list, action_dim: int | None) -> str | None:
    """Why a pair of action limits is unusable, or None. `action_dim` None: not known yet (no
    model), so only the pair's own consistency is checked."""
    if not lo and not hi:
        return None
    if action_dim is not None and (len(lo) not in (0, action_dim) or len(hi) not in (0, action_dim)):
        return f"action_min/action_max have {len(lo)}/{len(hi)} entries; the model has {action_dim} action dimensions"
    bad_values = [v for v in list(lo) + list(hi) if not math.isfinite(v)]
    if bad_values:
        return f"action limits must be finite, got {bad_values[:3]}"
    if lo and hi and len(lo) == len(hi):
        bad = [i for i in range(len(lo)) if not lo[i] < hi[i]]
        if bad:
            return f"action_min must be < action_max; not so at index {bad[:5]} ({[(lo[i], hi[i]) for i in bad[:3]]})"
    return None


class PolicyNode(LifecycleNode):
    # How long deactivate/cleanup wait for an inference in flight before giving up.
    stop_timeout_s = 30.0

    def __init__(self, node_name: str = "policy_node", **kwargs):
        super().__init__(node_name, **kwargs)
        P.declare_all(self)
        self._config_error = ""
        self._policy = None
        self._describe: dict = {}
        self._cfg: dict = {}
        self._subs = []
        self._traj_pub = None
        self._timing_pub = None
        self._gate: InputGate | None = None
        self._worker: InferenceWorker | None = None
        self._aggregator: ChunkAggregator | None = None
        self._energy: EnergyMeter | None = None
        self._power_note = ""
        self._output = OutputGate()
        self._reset_stats()
        self._input_group = ReentrantCallbackGroup()
        self._diag_group = MutuallyExclusiveCallbackGroup()
        self._diag_pub = self.create_publisher(DiagnosticArray, self.get_parameter("diagnostics_topic").value, 10)
        self._diag_timer = self.create_timer(
            self.get_parameter("diagnostics_period_s").value, self._publish_diagnostics, callback_group=self._diag_group
        )
        quiet = self.get_parameter("log_quiet_s").value
        # rclpy fixes one severity per call site, so each severity logs from its own method.
        self._warn_log = BurstLogger(self._log_warning, quiet)
        self._error_log = BurstLogger(self._log_error, quiet)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._autostart_timer = None
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(
                0.0, self._autostart, callback_group=MutuallyExclusiveCallbackGroup()
            )

    @property
    def lifecycle_state(self) -> str:
        """rclpy's lifecycle state label (unconfigured, inactive, active, finalized, or a
        transition state such as configuring)."""
        return self._state_machine.current_state[1]

    def _log_warning(self, text: str) -> None:
        self.get_logger().warning(text)

    def _log_error(self, text: str) -> None:
        self.get_logger().error(text)

    def _log_info(self, text: str) -> None:
        self.get_logger().info(text)

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, parameters) -> SetParametersResult:
        state = self.lifecycle_state
        new = {p.name: p.value for p in parameters}
        for p in parameters:
            spec = P.SPEC_BY_NAME.get(p.name)
            if spec is None:
                continue
            if not spec.live and state != "unconfigured":
                return SetParametersResult(
                    successful=False,
                    reason=(
                        f"{p.name} is read at configure; change it while the node is unconfigured "
                        f"(now {state}); live parameters: " + ", ".join(s.name for s in P.SPECS if s.live)
                    ),
                )
            if p.name == "chunk_aggregation" and p.value not in MODES:
                return SetParametersResult(
                    successful=False, reason=(f"chunk_aggregation {p.value!r} is not one of {', '.join(MODES)}")
                )
            if p.name == "kernel_backend" and p.value not in P.KERNEL_BACKENDS:
                return SetParametersResult(
                    successful=False,
                    reason=(f"kernel_backend {p.value!r} is not one of {', '.join(P.KERNEL_BACKENDS)}"),
                )
            if p.name == "power_source" and p.value not in SOURCES:
                return SetParametersResult(
                    successful=False, reason=(f"power_source {p.value!r} is not one of {', '.join(SOURCES)}")
                )
        if "action_min" in new or "action_max" in new:
            # The pair as it would be after this set: inverted or non-finite limits are refused
            # here, not discovered at the next chunk.
            lo = new["action_min"] if "action_min" in new else self._live("action_min")
            hi = new["action_max"] if "action_max" in new else self._live("action_max")
            dim = self._cfg.get("action_dim") if self._policy is not None else None
            problem = limits_problem(list(lo or []), list(hi or []), dim)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
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
        if self._output.closed:
            return
        if (
            self.trigger_configure() == TransitionCallbackReturn.SUCCESS and not self._output.closed
        ):  # a stop request during configure: stay inactive
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
            return TransitionCallbackReturn.FAILURE
        self._config_error = ""
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
            raise ConfigError(
                "parameter model is empty; give a preset name (e.g. tiny), a model "
                "directory or a quantized artifact directory"
            )
        if cfg["kernel_backend"] not in P.KERNEL_BACKENDS:
            raise ConfigError(f"kernel_backend {cfg['kernel_backend']!r} is not one of {', '.join(P.KERNEL_BACKENDS)}")
        import quantvla_kernels  # the process's integer kernels (one policy per node process)

        quantvla_kernels.set_default_backend(P.KERNEL_BACKENDS[cfg["kernel_backend"]])
        t0 = time.perf_counter()
        try:
            policy = Policy.load(
                model, device=cfg["device"], dtype=cfg["dtype"] or None, cuda_graphs=bool(cfg["cuda_graphs"])
            )
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"could not load model {model!r} on {cfg['device']}: {type(exc).__name__}: {exc}"
            ) from exc
        load_s = time.perf_counter() - t0
        horizon, action_dim, state_dim = policy.horizon, policy.action_dim, policy.state_dim
        max_cams = getattr(policy.config, "max_cameras", len(kinds))
        if len(kinds) > max_cams:
            raise ConfigError(f"{len(kinds)} camera_topics but model {model!r} takes at most {max_cams} cameras")
        joint_names = cfg["joint_names"] or [f"joint_{i}" for i in range(action_dim)]
        if len(joint_names) != action_dim:
            raise ConfigError(
                f"joint_names has {len(joint_names)} entries; model {model!r} outputs {action_dim} action dimensions"
            )
        if cfg["state_joint_names"] and len(cfg["state_joint_names"]) != state_dim:
            raise ConfigError(
                f"state_joint_names has {len(cfg['state_joint_names'])} entries; "
                f"model {model!r} takes a state of {state_dim}"
            )
        if cfg["actions_per_chunk"] > horizon:
            raise ConfigError(f"actions_per_chunk {cfg['actions_per_chunk']} exceeds the model horizon {horizon}")
        self._check_limits(cfg["action_min"], cfg["action_max"], action_dim)
        if cfg["chunk_aggregation"] not in MODES:
            raise ConfigError(f"chunk_aggregation {cfg['chunk_aggregation']!r} is not one of {', '.join(MODES)}")
        if cfg["num_threads"] > 0:
            import torch

            torch.set_num_threads(cfg["num_threads"])
        warm = np.zeros((240, 320, 3), np.uint8)
        t0 = time.perf_counter()
        for i in range(cfg["warmup_count"]):
            try:
                policy.predict(
                    Observation(
                        images=[warm] * len(kinds), instruction="warm up", state=np.zeros(state_dim, np.float32)
                    ),
                    seed=i,
                )
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"model {model!r} failed during warm-up: {type(exc).__name__}: {exc}") from exc
        warm_s = time.perf_counter() - t0
        power, power_note = detect_power_source(cfg["power_source"], cfg["device"])
        self._energy = EnergyMeter(power)
        self._power_note = power_note
        self._policy, self._observation_cls = policy, Observation
        self._cfg = dict(
            cfg, kinds=kinds, joint_names=joint_names, horizon=horizon, action_dim=action_dim, state_dim=state_dim
        )
        try:
            self._describe = dict(policy.describe())
        except Exception as exc:  # noqa: BLE001
            self._describe = {"scheme": f"unknown ({type(exc).__name__})", "weight_bytes": -1}
        self._aggregator = ChunkAggregator(
            cfg["chunk_aggregation"], cfg["aggregation_weight_new"], cfg["action_dt"], cfg["smoothing_steps"]
        )
        self._reset_stats()
        self._gate = InputGate(self._cfg, self._live, self._now_s, self._refuse, self._counters, self._log_info)
        gate = self._gate
        for cam, (topic, kind) in enumerate(zip(cfg["camera_topics"], kinds)):
            msg_type = CompressedImage if kind == "compressed" else Image
            self._subs.append(
                self.create_subscription(
                    msg_type,
                    topic,
                    lambda msg, cam=cam: gate.on_image(cam, msg),
                    qos_profile_sensor_data,
                    callback_group=self._input_group,
                )
            )
        self._subs.append(
            self.create_subscription(
                String, cfg["instruction_topic"], gate.on_instruction, INSTRUCTION_QOS, callback_group=self._input_group
            )
        )
        if cfg["joint_state_topic"]:
            self._subs.append(
                self.create_subscription(
                    JointState,
                    cfg["joint_state_topic"],
                    gate.on_joint_state,
                    qos_profile_sensor_data,
                    callback_group=self._input_group,
                )
            )
        self._traj_pub = self.create_lifecycle_publisher(JointTrajectory, cfg["trajectory_topic"], 10)
        self._timing_pub = (
            self.create_lifecycle_publisher(DiagnosticArray, cfg["timing_topic"], 10) if cfg["timing_topic"] else None
        )
        self.get_logger().info(
            f"configured: model {model!r} ({self._describe.get('scheme')}, "
            f"{self._describe.get('weight_bytes')} weight bytes) on {cfg['device']}, "
            f"horizon {horizon} x {action_dim}, state {state_dim}, cameras {cfg['camera_topics']} "
            f"({kinds}); load {load_s:.2f} s, {cfg['warmup_count']} warm-up runs {warm_s:.2f} s; "
            f"power source {power.name}"
        )

    @staticmethod
    def _check_limits(lo: list, hi: list, action_dim: int) -> None:
        if not lo and not hi:
            return
        if len(lo) != action_dim or len(hi) != action_dim:
            raise ConfigError(
                f"action_min/action_max have {len(lo)}/{len(hi)} entries; give "
                f"both with {action_dim} (the model's action_dim) or neither"
            )
        problem = limits_problem(lo, hi, action_dim)
        if problem:
            raise ConfigError(problem)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._worker is not None and self._worker.alive:
            self.get_logger().error(
                "activate refused: the previous inference thread is still "
                "running (an inference did not finish); try again later"
            )
            return TransitionCallbackReturn.FAILURE
        if self._output.closed:
            return TransitionCallbackReturn.FAILURE
        self._gate.restart_watch()
        self._aggregator.reset()
        self._worker = InferenceWorker(
            self._gate.frames, self._live, self._counters, self._warn_log, self._error_log, self._act
        )
        self._worker.start()
        self.get_logger().info(
            "activated: publishing action chunks"
            + (" (dry_run: trajectories are computed, not published)" if self._live("dry_run") else "")
        )
        return super().on_activate(state)

    def _stop_thread(self, timeout_s: float | None = None) -> bool:
        """Stop the inference worker; False (and an error logged) if it is still running after
        the timeout. It keeps its own stop flag and closed store, so it exits on its own later
        and a new thread is never started beside it."""
        if self._worker is None:
            return True
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if not self._worker.stop(timeout_s):
            self.get_logger().error(
                f"the inference thread did not stop within {timeout_s} s (an inference is still running)"
            )
            return False
        return True

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self._stop_thread():
            self.get_logger().error(
                "deactivate refused: the node stays active (it publishes at "
                "most the chunk in flight); deactivate again once it finished"
            )
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info("deactivated")
        return super().on_deactivate(state)

    def _teardown(self, timeout_s: float | None = None) -> None:
        """Stop inference, drop subscriptions/publishers and free the model."""
        self._stop_thread(timeout_s)
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        with self._output.holding():
            if self._traj_pub is not None:
                self.destroy_lifecycle_publisher(self._traj_pub)
                self._traj_pub = None
            if self._timing_pub is not None:
                self.destroy_lifecycle_publisher(self._timing_pub)
                self._timing_pub = None
        device = str(self._cfg.get("device", "cpu"))
        self._policy = None
        self._gate = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.get_logger().info("cleaned up: model freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        # From a process stop the worker was already given shutdown_timeout_s: don't wait twice.
        self._teardown(0.0 if self._output.closed else self.get_parameter("shutdown_timeout_s").value)
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in lifecycle state {state.label}; cleaning up")
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ process shutdown
    def begin_shutdown(self) -> bool:
        """First step of a process stop: nothing is published any more, timers are cancelled
        and the inference thread is stopped (shutdown_timeout_s). True if it stopped."""
        self._output.close()
        for timer in (self._diag_timer, self._autostart_timer):
            if timer is not None:
                timer.cancel()
        return self._stop_thread(self.get_parameter("shutdown_timeout_s").value)

    def finish_shutdown(self) -> None:
        """Last step, with the executor stopped: the lifecycle shutdown transition (to
        finalized), which frees the model and drops the node's entities."""
        if self.lifecycle_state in ("unconfigured", "inactive", "active"):
            try:
                self.trigger_shutdown()
            except Exception as exc:  # noqa: BLE001 - exiting anyway; say why it was unclean
                self.get_logger().warning(f"lifecycle shutdown transition failed: {exc}")
                self._teardown(0.0)

    # ------------------------------------------------------------------ inputs
    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reset_stats(self) -> None:
        self._counters = Counters()
        self._latency = LatencyStats()
        self._rate = RateMeter()
        self._deadline = DeadlineMonitor()
        self._last_energy = None
        self._last_blended = 0
        self._last_problem = ""

    def _refuse(self, source: str, code: str, message: str, level: str = "error") -> None:
        """Count and log (once per burst) an input that produces no action."""
        kind = "stale" if level == "warn" else "invalid"
        self._counters.bump(f"{kind}.{source}.{code}")
        self._last_problem = f"{source}: {message}"
        (self._warn_log if level == "warn" else self._error_log).report(source, code, message)

    # Kept for in-process tests and tools that feed the node directly.
    def _on_image(self, cam: int, msg) -> None:
        if self._gate is not None:
            self._gate.on_image(cam, msg)

    def _on_instruction(self, msg: String) -> None:
        if self._gate is not None:
            self._gate.on_instruction(msg)

    def _on_joint_state(self, msg: JointState) -> None:
        if self._gate is not None:
            self._gate.on_joint_state(msg)

    # ------------------------------------------------------------------ inference
    def _budget_ms(self, n_points: int) -> float:
        budget = self._live("latency_budget_ms")
        return budget if budget > 0 else n_points * self._cfg["action_dt"] * 1e3

    def _shape_chunk(self, actions: np.ndarray, stamp_s: float):
        """Blend with the committed chunk (chunk_aggregation), then apply the limits; (actions,
        blended steps), or None when the chunk is refused (the committed chunk is kept)."""
        dt = self._cfg["action_dt"]
        agg = self._aggregator
        agg.mode = self._live("chunk_aggregation")
        agg.weight_new = self._live("aggregation_weight_new")
        agg.smoothing_steps = self._live("smoothing_steps")
        # Limits apply to what is published: the blend with the previous chunk (limited when it
        # was published, maybe under looser limits) can leave limits tightened since.
        lo, hi = self._live("action_min"), self._live("action_max")
        before_merge = agg.snapshot()
        # Steps the robot executed from the committed chunk while this one was computed.
        delay_steps = int(math.ceil(max(0.0, self._now_s() - stamp_s) / dt - 1e-9))
        actions, blended = agg.merge(actions, stamp_s, delay_steps)
        if not (lo or hi):
            return actions, blended
        problem = limits_problem(lo, hi, actions.shape[1]) or (
            None
            if len(lo) == len(hi) == actions.shape[1]
            else f"action_min/action_max have {len(lo)}/{len(hi)} entries; give both with {actions.shape[1]} or neither"
        )
        if problem:  # e.g. only one of the two set yet: never act unlimited
            self._counters.bump("chunks_refused_limits")
            self._refuse("model", "action_limits_invalid", f"{problem}; chunk not published")
            agg.restore(before_merge)  # a refused chunk is not blended with later
            return None
        lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
        outside = (actions < lo) | (actions > hi)
        if outside.any():
            if not self._live("clip_actions"):
                self._counters.bump("chunks_refused_limits")
                self._refuse(
                    "model",
                    "action_limits",
                    f"{int(outside.sum())} action values "
                    "leave [action_min, action_max] and clip_actions is false; chunk "
                    "not published",
                )
                agg.restore(before_merge)
                return None
            self._counters.bump("chunks_clipped")
            self._counters.bump("values_clipped", int(outside.sum()))
            actions = np.clip(actions, lo, hi)
        return actions, blended

    def _act(self, matched) -> None:
        t_taken = time.perf_counter()
        now = self._now_s()
        gate = self._gate
        if gate is None or gate.stale_frame(matched, now):
            return
        inputs = gate.current_inputs(now)
        if inputs is None:
            return
        instruction, state = inputs
        token = self._energy.start()
        chunk = self._policy.predict(
            self._observation_cls(images=matched.images, instruction=instruction, state=state), seed=self._cfg["seed"]
        )
        energy = self._energy.stop(token)
        actions = np.asarray(chunk.actions, dtype=np.float32)
        n = self._cfg["actions_per_chunk"] or actions.shape[0]
        actions = actions[:n]
        self._counters.bump("chunks_computed")
        if not np.all(np.isfinite(actions)):
            self._refuse("model", "nonfinite_actions", "the model returned non-finite actions; chunk not published")
            return
        dt = self._cfg["action_dt"]
        before_merge = self._aggregator.snapshot()
        shaped = self._shape_chunk(actions, matched.stamp_s)
        if shaped is None:
            return
        actions, blended = shaped
        stamp_msg, t_recv_node, t_recv, t_converted, convert_ms = matched.meta
        # A frame that went stale while the model ran gives no action either.
        timeout = self._live("image_timeout_s")
        age = self._now_s() - matched.stamp_s
        if timeout > 0 and age > timeout:
            self._counters.bump("chunks_dropped_stale")
            self._refuse(
                "camera0",
                "stale_at_publish",
                f"frame was {age:.3f} s old when its chunk was ready (image_timeout_s {timeout}); chunk not published",
                "warn",
            )
            self._aggregator.restore(before_merge)
            return
        self._last_blended = blended
        msg = build_trajectory(stamp_msg, self._cfg["joint_names"], actions, dt)
        if not self._live("dry_run"):
            if not self._output.publish(lambda: self._traj_pub, msg):
                return  # shutting down
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
        end_to_end = (self._now_s() - matched.stamp_s) * 1e3
        self._latency.add("end_to_end", end_to_end)
        # Deadline: stamp -> arrival on the node clock, then arrival -> publish on the wall
        # clock (under sim time in lockstep the first part is 0 and the second is what counts).
        latency_ms = max(0.0, (t_recv_node - matched.stamp_s) * 1e3) + (done - t_recv) * 1e3
        budget = self._budget_ms(len(actions))
        if self._deadline.record(latency_ms, budget):
            self._warn_log.report(
                "deadline",
                "missed",
                (
                    f"chunk latency {latency_ms:.1f} ms exceeded latency_budget_ms {budget:.1f} "
                    f"({self._deadline.misses} misses so far); published anyway"
                ),
            )
        if energy is not None:
            self._last_energy = energy
        if self._timing_pub is not None:
            timing = DiagnosticArray()
            timing.header.stamp = stamp_msg
            values = dict(
                t,
                node_overhead=node_overhead,
                camera_skew=matched.skew_s * 1e3,
                transport=(t_recv_node - matched.stamp_s) * 1e3,
                convert=convert_ms,
                queue=(t_taken - t_converted) * 1e3,
                latency=latency_ms,
                latency_budget=budget,
                published=0.0 if self._live("dry_run") else 1.0,
            )
            if energy is not None:
                values.update(energy_j=energy[0], power_w=energy[1])
            timing.status = [
                make_status(
                    "chunk", self._cfg["device"], OK, "timings in ms", {k: f"{float(v):.6g}" for k, v in values.items()}
                )
            ]
            self._output.publish(lambda: self._timing_pub, timing)

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        if self._output.closed:
            return
        try:
            arr = DiagnosticArray()
            arr.header.stamp = self.get_clock().now().to_msg()
            arr.status = [ND.policy_status(self), ND.inputs_status(self), ND.resources_status(self)]
            self._output.publish(self._diag_pub, arr)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self._error_log.report("diagnostics", type(exc).__name__, f"diagnostics failed: {exc}")


def main(args=None) -> int:
    # Signals are handled here, not by rclpy: rclpy's handler shuts the context down under
    # running callbacks and threads (see node_runtime).
    from rclpy.signals import SignalHandlerOptions

    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = StopSignal()
    node = PolicyNode()
    log = node.get_logger()
    kind = node.get_parameter("executor").value
    try:
        executor = make_executor(kind)
    except ValueError as exc:
        log.error(str(exc))
        node.destroy_node()
        rclpy.try_shutdown()
        return 2
    # Process-wide, so it is set here and not per node (tests build nodes in their own process).
    gil_ms = apply_gil_switch_interval(node)
    malloc = apply_malloc_thresholds(node.get_parameter("malloc_mmap_threshold_mib").value)
    log.info(f"executor {kind}, GIL switch interval {gil_ms:g} ms, malloc {malloc}")
    # Inference always runs in its own thread; the executor only serves callbacks.
    executor.add_node(node)
    spinning = threading.Event()
    spinner = spin_until(executor, spinning, node.context)
    try:
        while not stop.event.is_set() and not spinning.is_set():
            stop.event.wait(0.2)
    finally:
        why = stop.received[0] if stop.received else "the executor stopped"
        log.info(f"{why}: shutting down (outputs closed, inference stopped)")
        stopped = node.begin_shutdown()
        spinning.set()
        spinner.join(max(5.0, node.get_parameter("shutdown_timeout_s").value))
        executor.shutdown(timeout_sec=5.0)
        node.finish_shutdown()
        log.info("shut down cleanly" if stopped else "shut down; an inference was still running and is abandoned")
        node.destroy_node()
        rclpy.try_shutdown()
        stop.restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
