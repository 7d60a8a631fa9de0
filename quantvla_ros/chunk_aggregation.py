"""Merging a new action chunk with the still-unexecuted tail of the previous one.

Chunks are aligned by their observation stamps, not by a latency guess: the step of the old
chunk that falls at the new chunk's start time is `round((t_new - t_old) / dt)`. Modes:

- `latest_only` replaces the old chunk (the robot may jump at the boundary);
- `weighted_average` blends every overlapping step as `w_new * new + (1 - w_new) * old`
  (LeRobot async inference's 0.7 / 0.3 by default) and keeps the new chunk beyond the overlap;
- `crossfade` smooths the boundary: step i of the new chunk is
  `w_i * old + (1 - w_i) * new` with `w_i = 1 - i / smoothing_steps` falling linearly from 1, so
  the first action continues the old chunk exactly and the new plan takes over within
  `smoothing_steps` steps;
- `inpaint` (real-time-chunking style, applied to the finished chunk): the steps the robot
  executes while the chunk was being computed (`delay_steps`, from the stamps) are committed
  and copied from the old chunk; the next `smoothing_steps` steps follow a soft mask that
  decays exponentially from the committed actions to the new ones. Guided denoising inside the
  model (true RTC) would need a hook in the flow sampler; this is the post-hoc equivalent.
"""

from __future__ import annotations

import math

import numpy as np

MODES = ("latest_only", "weighted_average", "crossfade", "inpaint")
SMOOTHING_MODES = ("crossfade", "inpaint")


def crossfade_weights(n: int, smoothing_steps: int) -> np.ndarray:
    """Weight of the old chunk per new step: 1 at step 0, falling linearly to 0 at
    `smoothing_steps` (0 beyond)."""
    i = np.arange(n, dtype=np.float64)
    return np.clip(1.0 - i / max(smoothing_steps, 1), 0.0, 1.0)


def inpaint_weights(n: int, delay_steps: int, smoothing_steps: int) -> np.ndarray:
    """1 on the committed prefix (`delay_steps`, at least the first step), then an exponential
    soft mask c * (e^c - 1) / (e - 1) with c falling linearly from 1 to 0 over
    `smoothing_steps`, then 0."""
    d = max(int(delay_steps), 1)
    w = np.zeros(n, np.float64)
    w[:d] = 1.0
    span = max(int(smoothing_steps), 1)
    for i in range(d, min(n, d + span)):
        c = 1.0 - (i - d + 1) / (span + 1)
        w[i] = c * (math.exp(c) - 1.0) / (math.e - 1.0)
    return w


class ChunkAggregator:
    def __init__(self, mode: str = "latest_only", weight_new: float = 0.7, dt: float = 0.1, smoothing_steps: int = 4):
        if mode not in MODES:
            raise ValueError(f"chunk_aggregation {mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= weight_new <= 1.0:
            raise ValueError(f"aggregation weight {weight_new} must be in [0, 1]")
        if dt <= 0:
            raise ValueError(f"action dt {dt} must be > 0")
        self.mode, self.weight_new, self.dt = mode, weight_new, dt
        self.smoothing_steps = smoothing_steps
        self._prev: np.ndarray | None = None
        self._prev_t: float | None = None

    def reset(self) -> None:
        self._prev, self._prev_t = None, None

    def snapshot(self):
        """State to hand back to `restore` when a merged chunk is refused (not published)."""
        return self._prev, self._prev_t

    def restore(self, state) -> None:
        self._prev, self._prev_t = state

    def merge(self, actions: np.ndarray, t_start: float, delay_steps: int = 0) -> tuple[np.ndarray, int]:
        """(merged (N, D) float32, number of blended steps) for a chunk starting at t_start.
        `delay_steps`: steps executed from the old chunk before this one could take over
        (inpaint's committed prefix)."""
        actions = np.asarray(actions, dtype=np.float32)
        merged, blended = actions.copy(), 0
        if self.mode != "latest_only" and self._prev is not None:
            offset = int(round((t_start - self._prev_t) / self.dt))
            tail = self._prev[offset:] if offset >= 0 else self._prev[:0]
            n = min(len(tail), len(actions))
            if n and tail.shape[1] == actions.shape[1]:
                if self.mode == "weighted_average":
                    w_old = np.full(n, 1.0 - self.weight_new)
                elif self.mode == "crossfade":
                    w_old = crossfade_weights(n, self.smoothing_steps)
                else:
                    w_old = inpaint_weights(n, delay_steps, self.smoothing_steps)
                w_old = w_old[:, None].astype(np.float32)
                merged[:n] = w_old * tail[:n] + (1.0 - w_old) * actions[:n]
                blended = n if self.mode == "weighted_average" else int(np.count_nonzero(w_old[:, 0] > 0))
        self._prev, self._prev_t = merged, t_start
        return merged, blended
