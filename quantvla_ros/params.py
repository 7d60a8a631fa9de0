"""The policy node's parameters: one table of name, default, description and range.

Declared with ParameterDescriptors (description, ranges, constraints) so `ros2 param describe`
documents them; `config/default.yaml` lists the same names with comments. Parameters marked
`live` may change while the node runs; the others are read at configure and may only change
while the node is unconfigured (the set-parameters callback refuses otherwise).
"""

from __future__ import annotations

import dataclasses

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import ParameterUninitializedException
from rclpy.parameter import Parameter

from quantvla_ros.chunk_aggregation import MODES
from quantvla_ros.power import SOURCES

KERNEL_BACKENDS = {"auto": None, "triton": "triton", "torch": "cpu"}  # -> quantvla_kernels backend


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    default: object
    description: str
    lo: float | None = None
    hi: float | None = None
    constraints: str = ""
    live: bool = False
    empty_type: str = ""  # "string[]" / "double[]": declared typed but unset (YAML may fill it)
    read_only: bool = False  # read once at start-up (publishers/timers made in the constructor)


SPECS: tuple[Spec, ...] = (
    Spec(
        "model",
        "default",
        "'default' (the committed policy), a preset name (tiny, small, ...), "
        "a model directory or a quantized artifact directory (Policy.load at configure).",
    ),
    Spec("device", "cpu", "Torch device for the model: cpu, cuda, cuda:N."),
    Spec("dtype", "", "Compute dtype (float32, bfloat16, float16); empty = the model's default."),
    Spec(
        "cuda_graphs",
        False,
        "CUDA devices: run each chunk as replays of CUDA graphs captured on the first chunk of each "
        "input shape (vision, prefix, every denoising step: no per-kernel launch cost); false = eager.",
    ),
    Spec(
        "kernel_backend",
        "auto",
        "Integer kernels of a quantized model: auto (Triton on CUDA, the "
        "compiled CPU path on the CPU), triton, or torch (exact torch integer math on any device: "
        "a GPU without Triton, e.g. a Jetson whose JetPack torch ships none).",
        constraints="one of: " + ", ".join(("auto", "triton", "torch")),
    ),
    Spec("num_threads", 0, "torch intra-op threads; 0 leaves torch's default.", 0, 256),
    Spec("seed", 0, "Seed for the policy's noise sampling (deterministic chunks).", 0, 2**31 - 1),
    Spec(
        "camera_topics",
        ["camera/image_raw"],
        "Camera topics, one per model camera; the first is the reference whose stamp becomes the observation stamp.",
    ),
    Spec(
        "camera_types",
        [],
        "Per camera topic: raw (sensor_msgs/Image) or compressed "
        "(sensor_msgs/CompressedImage); empty entries / list infer from a '/compressed' suffix.",
        constraints="each entry: '', raw, compressed",
        empty_type="string[]",
    ),
    Spec(
        "instruction_topic",
        "instruction",
        "std_msgs/String task instruction (RELIABLE + TRANSIENT_LOCAL, so the last instruction reaches a late joiner).",
    ),
    Spec(
        "joint_state_topic",
        "joint_states",
        "sensor_msgs/JointState robot state; empty = no "
        "state subscription (zeros are fed when require_joint_state is false).",
    ),
    Spec(
        "state_joint_names",
        [],
        "Joint names picked from JointState in model order; empty "
        "= the message's positions in order (must be exactly the model's state_dim). A "
        "JointState whose name/position/velocity/effort lengths disagree is refused.",
        empty_type="string[]",
    ),
    Spec(
        "require_joint_state",
        True,
        "Refuse to act until a valid, fresh joint state arrived; "
        "false: zeros are fed until the first one (a stale one still gives no action).",
        live=True,
    ),
    Spec(
        "trajectory_topic",
        "joint_trajectory",
        "Output trajectory_msgs/JointTrajectory (the "
        "whole chunk: one point per step, time_from_start = k * action_dt, k = 0..N-1).",
    ),
    Spec("diagnostics_topic", "/diagnostics", "Output diagnostic_msgs/DiagnosticArray.", read_only=True),
    Spec(
        "timing_topic",
        "~/chunk_timings",
        "Per-chunk timings (DiagnosticArray stamped with the "
        "observation stamp: every model stage, node overhead, energy); empty disables.",
    ),
    Spec(
        "joint_names",
        [],
        "Joint names written into each trajectory; must have action_dim "
        "entries (empty = joint_0..joint_{action_dim-1}).",
        empty_type="string[]",
    ),
    Spec("action_dt", 0.1, "Seconds between consecutive actions of a chunk.", 0.001, 10.0),
    Spec(
        "replan_rate_hz",
        0.0,
        "Most inferences per second; 0 = infer whenever a new matched "
        "frame set is there and the previous inference finished.",
        0.0,
        1000.0,
        live=True,
    ),
    Spec("actions_per_chunk", 0, "Points published per trajectory; 0 = the whole chunk (the model horizon).", 0, 4096),
    Spec(
        "chunk_aggregation",
        "latest_only",
        "How a new chunk meets the previous one's unexecuted tail, aligned by stamps.",
        constraints="one of: " + ", ".join(MODES),
        live=True,
    ),
    Spec(
        "aggregation_weight_new",
        0.7,
        "weighted_average: weight of the new chunk on overlapping steps.",
        0.0,
        1.0,
        live=True,
    ),
    Spec(
        "smoothing_steps",
        4,
        "crossfade / inpaint: steps over which a new chunk takes over "
        "from the actions already committed (the old chunk's, aligned by stamps).",
        1,
        1000,
        live=True,
    ),
    Spec(
        "latency_budget_ms",
        0.0,
        "Deadline of one chunk, observation stamp to publish, in "
        "ms; a slower chunk is still published but counted as a deadline miss (WARN in "
        "/diagnostics). 0 = the chunk's own duration (points x action_dt): past it the robot "
        "has run out of actions.",
        0.0,
        3.6e6,
        live=True,
    ),
    Spec(
        "action_min",
        [],
        "Lower action limits, one per action dimension; unset = no "
        "limits. A set that would leave any action_min >= action_max is refused (change the "
        "pair in the order that keeps it valid, or both in one atomic set).",
        live=True,
        empty_type="double[]",
    ),
    Spec(
        "action_max",
        [],
        "Upper action limits, one per action dimension (see action_min).",
        live=True,
        empty_type="double[]",
    ),
    Spec(
        "clip_actions",
        True,
        "true: clip actions into the limits; false: refuse to publish a "
        "chunk that leaves them (counted in diagnostics).",
        live=True,
    ),
    Spec("dry_run", False, "Compute chunks and diagnostics but publish no trajectory.", live=True),
    Spec(
        "image_timeout_s",
        1.0,
        "An image older than this (vs node clock) is stale: no action from it; 0 disables.",
        0.0,
        3600.0,
        live=True,
    ),
    Spec(
        "instruction_timeout_s",
        0.0,
        "An instruction older than this (receive time) is stale; 0 = an instruction stays valid until replaced.",
        0.0,
        86400.0,
        live=True,
    ),
    Spec(
        "joint_state_timeout_s",
        0.5,
        "A joint state older than this (receive time) is stale; 0 disables.",
        0.0,
        3600.0,
        live=True,
    ),
    Spec("stamp_tolerance_s", 0.05, "Largest stamp difference between matched cameras.", 0.0, 10.0, live=True),
    Spec("max_future_s", 0.5, "Largest accepted stamp lead over the node clock.", 0.0, 60.0, live=True),
    Spec("sync_queue_size", 4, "Frames kept per non-reference camera for stamp matching.", 1, 100),
    Spec("warmup_count", 2, "Inferences run at configure so the first real chunk has no warm-up spike.", 0, 100),
    Spec("diagnostics_period_s", 1.0, "Seconds between DiagnosticArray messages.", 0.05, 60.0, read_only=True),
    Spec(
        "max_image_pixels", 4096 * 4096, "Images with more pixels are refused (checked before decoding).", 1, 2**31 - 1
    ),
    Spec(
        "min_image_side",
        16,
        "Images with a side shorter than this many pixels are refused (checked before decoding).",
        1,
        65535,
    ),
    Spec(
        "max_image_aspect",
        10.0,
        "Images longer than this times their width or height are refused before decoding (e.g. 10000x1); 0 disables.",
        0.0,
        1e6,
    ),
    Spec("max_instruction_chars", 512, "Longer instructions are refused, not truncated.", 1, 100000, live=True),
    Spec("depth_max_m", 10.0, "16UC1/32FC1 depth images map [0, depth_max_m] onto 0..255.", 0.01, 1000.0),
    Spec("power_source", "auto", "Power meter for energy per chunk.", constraints="one of: " + ", ".join(SOURCES)),
    Spec(
        "log_quiet_s",
        5.0,
        "A repeated input problem is logged again only after it has been quiet this long (no log storm).",
        0.0,
        3600.0,
        read_only=True,
    ),
    Spec(
        "executor",
        "single_threaded",
        "single_threaded: sensor callbacks, services and the "
        "diagnostics timer share one executor thread and inference has its own thread (lowest "
        "latency measured: rclpy's MultiThreadedExecutor added p99 ~145 ms to a 640x480 image "
        "callback on 2 loaded cores vs ~8 ms); multi_threaded: rclpy MultiThreadedExecutor with "
        "the same callback groups.",
        constraints="one of: single_threaded, multi_threaded",
        read_only=True,
    ),
    Spec(
        "shutdown_timeout_s",
        10.0,
        "On SIGINT/SIGTERM: seconds to wait for an inference in "
        "flight before the process exits anyway (nothing is published after the signal).",
        0.0,
        600.0,
        read_only=True,
    ),
    Spec("autostart", False, "Configure and activate on start-up (no lifecycle manager needed).", read_only=True),
    # process-wide, applied once by main() before spinning
    Spec(
        "gil_switch_interval_ms",
        1.0,
        "CPython GIL switch interval (sys.setswitchinterval) "
        "of the node process, in ms; 0 leaves CPython's 5 ms. Shorter: a DDS callback waits "
        "less for the GIL while the inference thread runs Python code (lower input latency), "
        "at a little more switching overhead.",
        0.0,
        100.0,
        read_only=True,
    ),
    Spec(
        "malloc_mmap_threshold_mib",
        16,
        "glibc malloc: buffers below this many MiB come from "
        "the heap and freed memory up to 4x this stays mapped (mallopt M_MMAP_THRESHOLD / "
        "M_TRIM_THRESHOLD), so each camera frame reuses pages instead of page-faulting ~3 fresh "
        "copies of the image; 0 leaves glibc's dynamic default. Costs up to 4x this in RSS "
        "kept after a burst; no effect without glibc.",
        0,
        32,
        read_only=True,
    ),
)

SPEC_BY_NAME = {s.name: s for s in SPECS}
# String-array parameters whose "" entries carry meaning (positional: one entry per topic).
KEEP_BLANKS = frozenset({"camera_types"})


def descriptor(spec: Spec) -> ParameterDescriptor:
    d = ParameterDescriptor(
        description=spec.description, additional_constraints=spec.constraints, read_only=spec.read_only
    )
    if spec.lo is not None:
        if isinstance(spec.default, float):
            d.floating_point_range = [FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)]
        else:
            d.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)]
    return d


_EMPTY_TYPES = {"string[]": Parameter.Type.STRING_ARRAY, "double[]": Parameter.Type.DOUBLE_ARRAY}


def declare_all(node) -> None:
    """Declare every parameter; an empty-list default is declared typed but unset, because an
    empty list has no element type in ROS (YAML or `ros2 param set` then fill it)."""
    for spec in SPECS:
        if spec.empty_type:
            node.declare_parameter(spec.name, _EMPTY_TYPES[spec.empty_type], descriptor(spec))
        else:
            node.declare_parameter(spec.name, spec.default, descriptor(spec))


def values(node) -> dict:
    """Current values by name; unset list parameters come back as []."""
    out = {}
    for spec in SPECS:
        try:
            value = node.get_parameter(spec.name).value
        except ParameterUninitializedException:
            value = None
        if spec.empty_type:
            # A blank camera_types entry means "infer from the topic"; elsewhere blanks mean nothing.
            value = list(value or [])
            if spec.name not in KEEP_BLANKS:
                value = [v for v in value if v != ""]
        out[spec.name] = value
    return out
