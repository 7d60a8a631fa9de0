"""Print received action chunks and the policy node's diagnostics for a while, then exit.

The demo command's eyes: `python -m quantvla_ros.chunk_monitor --duration 6`. Exits 0 when at
least `--min-chunks` trajectories arrived, 1 otherwise, so a script can tell a working node
from a silent one.
"""

from __future__ import annotations

import argparse
import sys
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from trajectory_msgs.msg import JointTrajectory

from quantvla_ros.diagnostics import level_of, status_values

LEVELS = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}


class ChunkMonitor(Node):
    def __init__(self, trajectory_topic: str, diagnostics_topic: str, print_every: int = 1):
        super().__init__("chunk_monitor")
        self.chunks = 0
        self.active = False
        self.print_every = max(1, print_every)
        self.create_subscription(JointTrajectory, trajectory_topic, self._on_chunk, 10)
        self.create_subscription(DiagnosticArray, diagnostics_topic, self._on_diag, 10)

    def _on_chunk(self, msg: JointTrajectory) -> None:
        self.chunks += 1
        if self.chunks != 1 and self.chunks % self.print_every:
            return
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        age_ms = (self.get_clock().now().nanoseconds * 1e-9 - stamp) * 1e3
        last = msg.points[-1] if msg.points else None
        first = msg.points[0].positions if msg.points else []
        horizon_s = (last.time_from_start.sec + last.time_from_start.nanosec * 1e-9) if last else 0
        print(
            f"chunk {self.chunks:3d}: {len(msg.points)} points x {len(msg.joint_names)} joints "
            f"{list(msg.joint_names)}, spans {horizon_s:.2f} s, received {age_ms:6.1f} ms after "
            f"the image stamp; first action "
            f"[{', '.join(f'{v:+.3f}' for v in first)}]",
            flush=True,
        )

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            v = status_values(status)
            if v.get("lifecycle_state") == "active":
                self.active = True
            if not self.active:
                continue
            head = f"diag [{LEVELS.get(level_of(status), '?'):5s}] {status.name}: {status.message}"
            if status.name.endswith(": policy"):
                head += (
                    f" | rate {v.get('inference_rate_hz')} Hz, total p50/p99 "
                    f"{v.get('total_ms_p50')}/{v.get('total_ms_p99')} ms, node overhead p99 "
                    f"{v.get('node_overhead_ms_p99')} ms, scheme {v.get('scheme')}, weights "
                    f"{v.get('weight_mib')} MiB"
                )
            elif status.name.endswith(": inputs"):
                head += (
                    f" | camera0 received {v.get('camera0_received')} dropped "
                    f"{v.get('camera0_dropped')} invalid {v.get('camera0_invalid')}"
                )
            elif status.name.endswith(": resources"):
                head += (
                    f" | rss {v.get('process_rss_mib')} MiB, gpu {v.get('gpu_memory_allocated_mib')}"
                    f", power {v.get('power_source')}, energy/chunk {v.get('energy_per_chunk_j')}"
                )
            print(head, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds to listen")
    ap.add_argument("--min-chunks", type=int, default=1, help="chunks needed for exit code 0")
    ap.add_argument("--trajectory-topic", default="joint_trajectory")
    ap.add_argument("--diagnostics-topic", default="/diagnostics")
    ap.add_argument(
        "--wait-active",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for the policy node to report "
        "lifecycle_state active (model loaded and warmed up)",
    )
    ap.add_argument("--print-every", type=int, default=1, help="print the 1st and every Nth chunk")
    args = ap.parse_args(argv)
    rclpy.init()
    node = ChunkMonitor(args.trajectory_topic, args.diagnostics_topic, args.print_every)
    try:
        if args.wait_active > 0:
            deadline = time.monotonic() + args.wait_active
            while not node.active and time.monotonic() < deadline and rclpy.ok():
                rclpy.spin_once(node, timeout_sec=0.1)
            if not node.active:
                print(f"the policy node did not become active within {args.wait_active:.0f} s", flush=True)
            node.chunks = 0
        end = time.monotonic() + args.duration
        while time.monotonic() < end and rclpy.ok():
            rclpy.spin_once(node, timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    chunks = node.chunks
    node.destroy_node()
    rclpy.try_shutdown()
    print(f"received {chunks} action chunk(s) in {args.duration:.1f} s", flush=True)
    return 0 if chunks >= args.min_chunks else 1


if __name__ == "__main__":
    sys.exit(main())
