"""Node overhead of policy_node: what the ROS wrapper adds on top of the model.

Per chunk: overhead = (trajectory receive time - image stamp) - model time, where the model
time is the chunk's own `total` from the node's per-chunk timing topic (matched by stamp).
It therefore contains DDS transport of the image and of the trajectory, deserialisation,
image conversion, frame matching, trajectory assembly and executor scheduling. Images are
640x480 rgb8 at 30 Hz, best effort, published by this process; the node runs as its own
process exactly as users run it. A soak (--duration 600) also samples the node's RSS and its
diagnostics to show memory and queues stay flat and no publication is missed.

    .venv/bin/python benchmarks/node_overhead.py --duration 20
    .venv/bin/python benchmarks/node_overhead.py --duration 600 --plot   # the 10-minute soak

Prints a table and writes JSON (+ PNG with --plot) under runs/, with the command, the ROS
environment and the node's start-up settings line. A caller's ROS_DOMAIN_ID is kept.
--gil-switch-interval-ms / --malloc-mmap-threshold-mib set the node's parameters of those names;
--publisher thread and --bench-malloc-mmap-threshold-mib change only this (camera) process and
were measured to make no consistent difference (docs/ros_node.md), so the defaults stay.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _percentiles(values) -> dict:
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max()), "n": int(a.size)}


def _node_settings(log_path: str) -> str:
    """The node's start-up line naming its executor, GIL switch interval and malloc setting."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return next((line.split("]: ", 1)[-1].strip() for line in f if "GIL switch interval" in line), "")
    except OSError:
        return ""


def _write_json(path: str, data: dict) -> None:
    """fsynced, and no temp file is left behind on failure."""
    from quantvla_core.fileio import atomic_write_json

    atomic_write_json(path, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="policy_node overhead at 30 Hz 640x480 rgb8")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds (600 = soak)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds discarded after start")
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--encoding", default="rgb8")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads in the node")
    ap.add_argument(
        "--executor",
        default="single_threaded",
        choices=("single_threaded", "multi_threaded"),
        help="the node's executor parameter",
    )
    ap.add_argument(
        "--gil-switch-interval-ms",
        type=float,
        default=None,
        help="the node's gil_switch_interval_ms parameter (default: the node's)",
    )
    ap.add_argument(
        "--malloc-mmap-threshold-mib",
        type=int,
        default=None,
        help="the node's malloc_mmap_threshold_mib parameter (default: the node's)",
    )
    ap.add_argument(
        "--bench-malloc-mmap-threshold-mib",
        type=int,
        default=0,
        help="the same glibc malloc setting for this (camera) process; 0 = glibc's",
    )
    ap.add_argument(
        "--publisher",
        default="timer",
        choices=("timer", "thread"),
        help="timer: images from an rclpy timer on the receiving executor; thread: "
        "from a thread of their own, so a publish never delays a receive",
    )
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "node_overhead.json"))
    ap.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    args = ap.parse_args(argv)
    for bad, why in (
        (args.duration <= 0, "--duration must be > 0"),
        (args.rate <= 0, "--rate must be > 0"),
        (args.width <= 0 or args.height <= 0, "--width/--height must be > 0"),
    ):
        if bad:
            ap.error(why)

    # Discovery on loopback in a domain of this run's own; large frames through shared memory.
    # A caller's ROS_DOMAIN_ID is kept (shared machines give each worker its own).
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_DOMAIN_ID"] = os.environ.get("ROS_DOMAIN_ID") or os.environ.get(
        "BENCH_ROS_DOMAIN_ID", str(20 + os.getpid() % 80)
    )
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", os.path.join(ROOT, "config", "fastdds_large_data.xml"))

    import psutil
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    from tqdm import tqdm
    from trajectory_msgs.msg import JointTrajectory

    from quantvla_ros.diagnostics import status_values
    from quantvla_ros.image_conversion import rgb_to_image
    from quantvla_ros.node_process import start_node, stop_node, write_params
    from quantvla_ros.policy_node import apply_malloc_thresholds
    from quantvla_ros.synthetic_camera import render_scene

    bench_malloc = apply_malloc_thresholds(args.bench_malloc_mmap_threshold_mib)
    work = tempfile.mkdtemp(prefix="node_overhead_")
    params = write_params(
        os.path.join(work, "params.yaml"),
        {
            "policy_node": {
                "model": args.model,
                "device": args.device,
                "autostart": True,
                "camera_topics": ["/bench/image_raw"],
                "instruction_topic": "/bench/instruction",
                "joint_state_topic": "/bench/joint_states",
                "trajectory_topic": "/bench/trajectory",
                "diagnostics_topic": "/bench/diagnostics",
                "timing_topic": "/bench/chunk_timings",
                "num_threads": args.num_threads,
                "executor": args.executor,
                "diagnostics_period_s": 1.0,
                "warmup_count": 3,
                "joint_state_timeout_s": 0.0,
                **{
                    name: value
                    for name, value in (
                        ("gil_switch_interval_ms", args.gil_switch_interval_ms),
                        ("malloc_mmap_threshold_mib", args.malloc_mmap_threshold_mib),
                    )
                    if value is not None
                },
            }
        },
    )
    log_path = os.path.join(work, "policy_node.log")
    proc = start_node("policy_node", params, log_path)

    rclpy.init()
    node = rclpy.create_node("node_overhead_bench")
    lock = threading.Lock()
    sent: dict[tuple, float] = {}
    received: dict[tuple, float] = {}
    model_ms: dict[tuple, float] = {}
    diag: dict[str, dict] = {}
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_publisher(String, "/bench/instruction", latched).publish(String(data="pick up the red block"))
    img_pub = node.create_publisher(Image, "/bench/image_raw", qos_profile_sensor_data)
    js_pub = node.create_publisher(JointState, "/bench/joint_states", 10)
    frames = [rgb_to_image(render_scene(args.width, args.height, t), args.encoding) for t in (0.0, 0.5, 1.0, 1.5)]

    def on_traj(msg):
        t = time.time()
        with lock:
            received[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = t

    def on_timing(msg):
        v = status_values(msg.status[0])
        with lock:
            model_ms[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = {k: float(x) for k, x in v.items()}

    def on_diag(msg):
        with lock:
            for s in msg.status:
                diag[s.name.split(": ")[-1]] = status_values(s)

    node.create_subscription(JointTrajectory, "/bench/trajectory", on_traj, 50)
    node.create_subscription(DiagnosticArray, "/bench/chunk_timings", on_timing, 50)
    node.create_subscription(DiagnosticArray, "/bench/diagnostics", on_diag, 10)
    measuring = threading.Event()
    counter = [0]

    def tick():
        msg = frames[counter[0] % len(frames)]
        counter[0] += 1
        now = time.time()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(now), int((now % 1) * 1e9)
        img_pub.publish(msg)
        if measuring.is_set():
            with lock:
                sent[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = now
        js = JointState()
        js.header.stamp = msg.header.stamp
        js.name = [f"joint_{i}" for i in range(4)]
        js.position = [0.0] * 4
        js_pub.publish(js)

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    stop_pub = threading.Event()
    if args.publisher == "timer":
        node.create_timer(1.0 / args.rate, tick)
    else:

        def publish_loop():
            period, t_next = 1.0 / args.rate, time.monotonic()
            while not stop_pub.is_set():
                t_next += period
                tick()
                delay = t_next - time.monotonic()
                if delay > 0:
                    stop_pub.wait(delay)
                else:
                    t_next = time.monotonic()  # fell behind: no burst to catch up

        threading.Thread(target=publish_loop, daemon=True).start()
    spin.start()
    result = {
        "config": vars(args),
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "env": {
            k: os.environ.get(k)
            for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")
        },
        "bench_malloc": bench_malloc,
    }
    rss_trace, queue_trace = [], []
    rc = 0
    try:
        deadline = time.monotonic() + 120
        while diag.get("policy", {}).get("lifecycle_state") != "active":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"policy_node did not become active; see {log_path}")
            time.sleep(0.1)
        time.sleep(args.warmup)
        measuring.set()
        start = time.monotonic()
        node_proc = psutil.Process(proc.pid)
        with tqdm(total=int(args.duration), unit="s", desc="measuring") as bar:
            while (elapsed := time.monotonic() - start) < args.duration:
                time.sleep(min(1.0, args.duration - elapsed))
                with lock:
                    d = dict(diag.get("inputs", {}))
                rss_trace.append((time.monotonic() - start, node_proc.memory_info().rss / 2**20))
                queue_trace.append((time.monotonic() - start, int(d.get("camera0_dropped", 0))))
                bar.update(int(time.monotonic() - start) - bar.n)
        measuring.clear()
        time.sleep(1.0)  # let the last chunks arrive
        with lock:
            keys = sorted(sent)
            overhead, e2e, models = [], [], []
            parts = {"transport": [], "convert": [], "queue": [], "node_overhead": []}
            for k in keys:
                if k in received and k in model_ms:
                    e = (received[k] - sent[k]) * 1e3
                    e2e.append(e)
                    models.append(model_ms[k]["total"])
                    overhead.append(e - model_ms[k]["total"])
                    for name in parts:
                        parts[name].append(model_ms[k].get(name, float("nan")))
            missing = [k for k in keys if k not in received]
            d_policy, d_inputs = dict(diag.get("policy", {})), dict(diag.get("inputs", {}))
        rss = [r for _, r in rss_trace]
        result.update(
            {
                "frames_sent": len(keys),
                "chunks_received": len(overhead),
                "frames_without_chunk": len(missing),
                "overhead_ms": _percentiles(overhead),
                "end_to_end_ms": _percentiles(e2e),
                "model_total_ms": _percentiles(models),
                "breakdown_ms": {name: _percentiles(v) for name, v in parts.items()},
                "load_average": os.getloadavg(),
                "cpu_count": os.cpu_count(),
                "node_settings": _node_settings(log_path),
                "node_diagnostics": {"policy": d_policy, "inputs": d_inputs},
                "rss_mib": {
                    "first": rss[0] if rss else None,
                    "last": rss[-1] if rss else None,
                    "max": max(rss) if rss else None,
                },
                "rss_trace": rss_trace,
                "dropped_trace": queue_trace,
                "target": {"overhead_p99_ms": 5.0, "met": bool(overhead) and _percentiles(overhead)["p99"] <= 5.0},
            }
        )
    except Exception as exc:  # noqa: BLE001 - report and clean up
        print(f"benchmark failed: {exc}", file=sys.stderr)
        result["error"] = str(exc)
        rc = 1
    finally:
        stop_pub.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        stop_node(proc)
    if rc:
        return rc

    print(
        f"\npolicy_node overhead, model {args.model} on {args.device}, {args.width}x{args.height} "
        f"{args.encoding} at {args.rate:g} Hz, {args.duration:g} s"
    )
    print(f"{'metric':<22}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}{'n':>7}")
    for name in ("overhead_ms", "end_to_end_ms", "model_total_ms"):
        p = result[name]
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
        print(f"{name:<22}{fmt(p['p50'])}{fmt(p['p90'])}{fmt(p['p99'])}{fmt(p['max'])}{p['n']:>7}")
    print("where the overhead goes (node side, per chunk):")
    for name, p in result["breakdown_ms"].items():
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
        print(f"  {name:<20}{fmt(p['p50'])}{fmt(p['p90'])}{fmt(p['p99'])}{fmt(p['max'])}{p['n']:>7}")
    print(f"load average {result['load_average'][0]:.1f} on {result['cpu_count']} cores")
    print(
        f"frames sent {result['frames_sent']}, chunks {result['chunks_received']}, frames "
        f"without a chunk {result['frames_without_chunk']} (dropped in node "
        f"{result['node_diagnostics']['inputs'].get('camera0_dropped')}); node RSS "
        f"{result['rss_mib']['first']:.1f} -> {result['rss_mib']['last']:.1f} MiB; target "
        f"overhead p99 <= 5 ms: {'met' if result['target']['met'] else 'NOT met'}"
    )
    pol = result["node_diagnostics"]["policy"]
    print(
        f"node deadline view: last chunk {pol.get('last_chunk_latency_ms', 'n/a')} ms against "
        f"budget {pol.get('latency_budget_ms', 'n/a')} ms, {pol.get('deadline_misses', 'n/a')} "
        f"misses, worst {pol.get('worst_chunk_latency_ms', 'n/a')} ms"
    )
    _write_json(args.out, result)
    print(f"wrote {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6))
        ax1.plot(overhead, ".", ms=2)
        ax1.set_ylabel("overhead ms")
        ax1.set_xlabel("chunk")
        ax1.set_title(f"policy_node overhead ({args.width}x{args.height} {args.encoding} @ {args.rate:g} Hz)")
        ax2.plot([t for t, _ in rss_trace], [r for _, r in rss_trace])
        ax2.set_ylabel("node RSS MiB")
        ax2.set_xlabel("s")
        fig.tight_layout()
        png = os.path.splitext(args.out)[0] + ".png"
        import io

        from quantvla_core.fileio import atomic_write_bytes

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(png, buf.getvalue())
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
