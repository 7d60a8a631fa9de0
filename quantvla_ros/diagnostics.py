"""Rolling latency percentiles, rates and counters, and their diagnostic_msgs form.

diagnostic_updater is not installable from PyPI, so the node assembles DiagnosticArray itself:
one DiagnosticStatus per concern (inference timing, inputs, resources), each value a KeyValue
with a stable key (e.g. `total_ms_p99`) that dashboards and the tests read.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

OK, WARN, ERROR, STALE = 0, 1, 2, 3  # diagnostic_msgs/DiagnosticStatus levels (bytes on the wire)
PERCENTILES = (50, 90, 99)


class LatencyStats:
    """The last `window` samples per named stage; p50/p90/p99 in milliseconds."""

    def __init__(self, window: int = 500):
        self._window = window
        self._samples: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._samples.setdefault(stage, collections.deque(maxlen=self._window)).append(float(ms))

    def percentiles(self, stage: str) -> dict[int, float] | None:
        with self._lock:
            samples = list(self._samples.get(stage, ()))
        if not samples:
            return None
        values = np.percentile(np.asarray(samples), PERCENTILES)
        return {p: float(v) for p, v in zip(PERCENTILES, values)}

    def count(self, stage: str) -> int:
        with self._lock:
            return len(self._samples.get(stage, ()))


class RateMeter:
    """Events per second over a sliding time window."""

    def __init__(self, window_s: float = 5.0, clock=time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._times: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._times.append(self._clock())

    def rate_hz(self) -> float:
        now = self._clock()
        with self._lock:
            while self._times and now - self._times[0] > self._window_s:
                self._times.popleft()
            if len(self._times) < 2:
                return 0.0
            span = max(self._times[-1] - self._times[0], 1e-9)
            return (len(self._times) - 1) / span


class Counters:
    """Thread-safe named counters plus the time each key was last bumped."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._counts: collections.Counter = collections.Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n
            self._last[key] = self._clock()

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def items(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._counts.items())

    def recent(self, prefix: str, within_s: float) -> list[str]:
        """Keys starting with `prefix` that were bumped in the last `within_s` seconds."""
        now = self._clock()
        with self._lock:
            return sorted(k for k, t in self._last.items() if k.startswith(prefix) and now - t <= within_s)


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def make_status(name: str, hardware_id: str, level: int, message: str, values: dict):
    """One diagnostic_msgs/DiagnosticStatus from an ordered dict of values."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    status = DiagnosticStatus()
    status.level = bytes([level])
    status.name = name
    status.hardware_id = hardware_id
    status.message = message
    status.values = [KeyValue(key=str(k), value=format_value(v)) for k, v in values.items()]
    return status


def status_values(status) -> dict[str, str]:
    """KeyValue list -> dict, for readers of the array (tests, demo printer)."""
    return {kv.key: kv.value for kv in status.values}


def level_of(status) -> int:
    level = status.level
    return level[0] if isinstance(level, (bytes, bytearray)) else int(level)
