"""The inference worker: one thread that turns the newest matched frame set into a chunk.

It waits on the frame store (never polls the executor), honours replan_rate_hz, counts
unmatched camera sets, and survives any exception of one inference (counted and logged once
per burst). Every thread has its own stop flag and its own store, so a thread that outlives
`stop()` (an inference still running past the timeout) exits on its own later and a new
thread is never started beside it.
"""

from __future__ import annotations

import threading
import time

THREAD_NAME = "quantvla-inference"


class InferenceWorker:
    def __init__(self, frames, live, counters, warn_log, error_log, act):
        self._frames, self._live, self._counters = frames, live, counters
        self._warn_log, self._error_log, self._act = warn_log, error_log, act
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            raise RuntimeError("the inference thread is still running")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Stop and join; False when the thread is still running after `timeout_s`."""
        self._stop.set()
        self._frames.close()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def _loop(self, stop: threading.Event) -> None:
        frames = self._frames
        retry_generation = -1
        last_start = 0.0
        while not stop.is_set() and not frames.closed:
            try:
                rate = self._live("replan_rate_hz")
                if rate > 0:
                    wait = last_start + 1.0 / rate - time.monotonic()
                    if wait > 0:
                        stop.wait(min(wait, 0.1))
                        continue
                if not frames.wait_for_new(0.1, retry_generation):
                    continue
                matched, reason = frames.take_matched(self._live("stamp_tolerance_s"))
                if matched is None:
                    if reason.startswith("unmatched"):
                        retry_generation = frames.generation
                        self._counters.bump("unmatched")
                        self._warn_log.report(
                            "cameras",
                            "unmatched",
                            (
                                f"camera {reason.split(':')[1]} has no frame within "
                                f"stamp_tolerance_s {self._live('stamp_tolerance_s')} s of the "
                                "reference camera"
                            ),
                        )
                    continue
                retry_generation = -1
                last_start = time.monotonic()
                if stop.is_set():
                    return
                self._act(matched)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                self._counters.bump("inference_error")
                self._error_log.report(
                    "inference", type(exc).__name__, f"inference failed, no action: {type(exc).__name__}: {exc}"
                )
