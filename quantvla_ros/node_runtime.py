"""Process plumbing of a node executable: executor choice, process-wide latency settings and
a shutdown that is clean every time.

rclpy's own signal handler shuts the context down from the signal, while executor threads,
timers and the inference thread may still be using it: "publisher's context is invalid" and
RCLErrors from a wait set follow, sometimes an exit status 1. Here SIGINT/SIGTERM only set an
event; the main thread then stops in order: outputs closed (nothing is published after the
signal), the node's own threads stopped, the spin loop left, the executor shut down, the node
destroyed, and only then the context.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
import threading

from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

EXECUTORS = ("single_threaded", "multi_threaded")
SPIN_PERIOD_S = 0.1  # the spin loop looks at the stop flag this often when idle


def make_executor(kind: str, context=None):
    """The executor named by the `executor` parameter (ValueError for an unknown name)."""
    if kind == "single_threaded":
        return SingleThreadedExecutor(context=context)
    if kind == "multi_threaded":
        return MultiThreadedExecutor(4, context=context)
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


class StopSignal:
    """SIGINT/SIGTERM set an event (and nothing else); a repeated signal is only noted."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        from quantvla_ros import early_signals

        self.event = threading.Event()
        self.received: list[str] = []
        self._old = {}
        for sig in signals:
            self._old[sig] = signal.signal(sig, self._handle)
        if early_signals.received:  # arrived while the executable was still importing
            self.received.extend(early_signals.received)
            self.event.set()

    def _handle(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        self.event.set()

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def spin_until(executor, stop: threading.Event, context) -> threading.Thread:
    """Spin `executor` in a thread until `stop` is set or the context goes down; the thread
    leaves between two spin_once calls, never inside a wait set that is being torn down."""

    def loop():
        try:
            while not stop.is_set() and context.ok():
                executor.spin_once(timeout_sec=SPIN_PERIOD_S)
        finally:
            stop.set()

    thread = threading.Thread(target=loop, name="quantvla-spin", daemon=True)
    thread.start()
    return thread
