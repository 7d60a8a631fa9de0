"""Newest-frame buffers for N cameras and stamp matching across them.

Camera 0 is the reference: inference always uses its newest frame (older ones are dropped and
counted, never queued). Every other camera keeps its last few frames and contributes the one
whose stamp is closest to the reference stamp, if within the tolerance; otherwise the set is
not matched and inference waits for the next reference frame. This is the newest-frame form of
message_filters' approximate-time policy, which is not installable from PyPI.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np


@dataclasses.dataclass
class Frame:
    stamp_s: float
    rgb: np.ndarray
    meta: object = None  # caller's data, e.g. the header stamp message
    used: bool = False


@dataclasses.dataclass
class MatchedFrames:
    stamp_s: float  # reference camera stamp: the observation stamp of the chunk
    images: list[np.ndarray]
    skew_s: float  # largest |stamp - reference stamp| among the cameras
    meta: object = None  # the reference frame's meta


class FrameStore:
    def __init__(self, num_cameras: int, queue_size: int = 4):
        if num_cameras < 1:
            raise ValueError("at least one camera topic is required")
        sizes = [1] + [max(1, queue_size)] * (num_cameras - 1)
        self._queues = [collections.deque(maxlen=n) for n in sizes]
        self._cond = threading.Condition()
        self._last_ref_stamp: float | None = None
        self._closed = False
        self.generation = 0  # bumped on every put, so a waiter can wait for "anything new"
        self.dropped = [0] * num_cameras

    @property
    def num_cameras(self) -> int:
        return len(self._queues)

    def put(self, camera: int, stamp_s: float, rgb: np.ndarray, meta: object = None) -> None:
        with self._cond:
            queue = self._queues[camera]
            if len(queue) == queue.maxlen and not queue[0].used:
                self.dropped[camera] += 1
            queue.append(Frame(stamp_s, rgb, meta))
            self.generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake and release any waiter (deactivate / shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """True after close() until clear(): a waiter on a closed store must stop waiting."""
        with self._cond:
            return self._closed

    def clear(self) -> None:
        with self._cond:
            for q in self._queues:
                q.clear()
            self._last_ref_stamp = None
            self._closed = False

    def newest_stamp(self, camera: int) -> float | None:
        with self._cond:
            q = self._queues[camera]
            return q[-1].stamp_s if q else None

    def wait_for_new(self, timeout_s: float, after_generation: int = -1) -> bool:
        """True when the reference camera has a frame newer than the last one taken and some
        frame arrived after `after_generation` (so an unmatched set is retried only on news)."""

        def ready():
            return self._closed or (self._has_new() and self.generation != after_generation)

        with self._cond:
            return self._cond.wait_for(ready, timeout_s) and not self._closed

    def _has_new(self) -> bool:
        q = self._queues[0]
        return bool(q) and (self._last_ref_stamp is None or q[-1].stamp_s > self._last_ref_stamp)

    def take_matched(self, tolerance_s: float) -> tuple[MatchedFrames | None, str]:
        """(frames, "") or (None, reason) where reason is "no_new_frame" or "unmatched:<cam>"."""
        with self._cond:
            if not self._has_new():
                return None, "no_new_frame"
            ref = self._queues[0][-1]
            images, skew = [ref.rgb], 0.0
            chosen = []
            for cam in range(1, len(self._queues)):
                q = self._queues[cam]
                best = min(q, key=lambda f: abs(f.stamp_s - ref.stamp_s), default=None)
                if best is None or abs(best.stamp_s - ref.stamp_s) > tolerance_s:
                    # Keep the reference frame: a matching frame may still arrive.
                    return None, f"unmatched:{cam}"
                chosen.append(best)
                images.append(best.rgb)
                skew = max(skew, abs(best.stamp_s - ref.stamp_s))
            ref.used = True
            for f in chosen:
                f.used = True
            self._last_ref_stamp = ref.stamp_s
            return MatchedFrames(ref.stamp_s, images, skew, ref.meta), ""
