"""Publishing: the only way the node's messages leave, and the chunk deadline bookkeeping.

`OutputGate` serialises every publish with shutdown: once `close()` returned, no publisher is
used again (no "publisher's context is invalid" from a timer or the inference thread racing a
SIGINT). `DeadlineMonitor` compares each chunk's latency (observation stamp to publish) with a
budget and counts the misses for /diagnostics.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from builtin_interfaces.msg import Duration
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint


def duration_of(seconds: float) -> Duration:
    ns = int(round(seconds * 1e9))
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def build_trajectory(stamp_msg, joint_names, actions: np.ndarray, dt: float) -> JointTrajectory:
    """One point per action row, time_from_start = k * dt, stamped with the observation."""
    msg = JointTrajectory()
    msg.header.stamp = stamp_msg
    msg.joint_names = list(joint_names)
    msg.points = [
        JointTrajectoryPoint(positions=row.astype(float).tolist(), time_from_start=duration_of(k * dt))
        for k, row in enumerate(actions)
    ]
    return msg


class OutputGate:
    def __init__(self):
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, publisher, msg) -> bool:
        """Publish unless closed; True when it went out. `publisher` may be a zero-argument
        callable returning it (or None), resolved under the lock, so a publisher destroyed by
        cleanup (which holds the lock while it destroys) is never used."""
        with self._lock:
            if callable(publisher) and not hasattr(publisher, "publish"):
                publisher = publisher()
            if self._closed or publisher is None:
                return False
            publisher.publish(msg)
            return True

    def holding(self):
        """The lock publishing holds: take it to destroy publishers."""
        return self._lock

    def close(self) -> None:
        """After this returns no publish is in flight and none will start."""
        with self._lock:
            self._closed = True


class DeadlineMonitor:
    """Latency of the last chunk against a budget; a miss is counted, never hidden."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.last_ms: float | None = None
        self.last_budget_ms: float | None = None
        self.chunks = 0
        self.misses = 0
        self.consecutive = 0
        self.worst_ms = 0.0
        self._last_miss_t: float | None = None

    def record(self, latency_ms: float, budget_ms: float) -> bool:
        with self._lock:
            self.chunks += 1
            self.last_ms, self.last_budget_ms = latency_ms, budget_ms
            self.worst_ms = max(self.worst_ms, latency_ms)
            missed = budget_ms > 0 and latency_ms > budget_ms
            if missed:
                self.misses += 1
                self.consecutive += 1
                self._last_miss_t = self._clock()
            else:
                self.consecutive = 0
            return missed

    def missed_within(self, window_s: float) -> bool:
        with self._lock:
            return self._last_miss_t is not None and self._clock() - self._last_miss_t <= window_s

    def values(self) -> dict:
        with self._lock:
            return {
                "last_chunk_latency_ms": self.last_ms if self.last_ms is not None else "n/a",
                "latency_budget_ms": (self.last_budget_ms if self.last_budget_ms is not None else "n/a"),
                "last_chunk_within_budget": (
                    self.last_ms <= self.last_budget_ms if self.last_ms is not None and self.last_budget_ms else "n/a"
                ),
                "deadline_misses": self.misses,
                "deadline_misses_consecutive": self.consecutive,
                "deadline_miss_ratio": self.misses / self.chunks if self.chunks else 0.0,
                "worst_chunk_latency_ms": self.worst_ms,
            }
