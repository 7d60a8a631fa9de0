"""Log a repeating problem once per burst instead of once per message.

A camera that sends 30 broken frames a second must not flood the log: the first occurrence of
a (source, code) pair is logged, repeats are counted silently, and when the problem has been
quiet for `quiet_s` the next occurrence is logged again together with how many were suppressed.
"""

from __future__ import annotations

import threading
import time


class BurstLogger:
    def __init__(self, log_fn, quiet_s: float = 5.0, clock=time.monotonic):
        self._log = log_fn
        self._quiet_s = quiet_s
        self._clock = clock
        self._last_seen: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def report(self, source: str, code: str, message: str) -> bool:
        """Record one occurrence; returns True when it was logged."""
        key = (source, code)
        now = self._clock()
        with self._lock:
            last = self._last_seen.get(key)
            self._last_seen[key] = now
            if last is not None and now - last < self._quiet_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            suppressed = self._suppressed.pop(key, 0)
        tail = f" ({suppressed} more suppressed in the previous burst)" if suppressed else ""
        self._log(f"{source}: {message}{tail}")
        return True
