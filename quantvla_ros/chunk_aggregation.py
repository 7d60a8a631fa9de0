"""Merging a new action chunk with the still-unexecuted tail of the previous one.

Chunks are aligned by their observation stamps, not by a latency guess: the step of the old
chunk that falls at the new chunk's start time is `round((t_new - t_old) / dt)`. `latest_only`
replaces the old chunk; `weighted_average` blends the overlapping steps as
`w_new * new + (1 - w_new) * old` (LeRobot async inference's 0.7 / 0.3 by default) and keeps
the new chunk beyond the overlap.
"""
from __future__ import annotations

import numpy as np

MODES = ("latest_only", "weighted_average")


class ChunkAggregator:
    def __init__(self, mode: str = "latest_only", weight_new: float = 0.7, dt: float = 0.1):
        if mode not in MODES:
            raise ValueError(f"chunk_aggregation {mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 <= weight_new <= 1.0:
            raise ValueError(f"aggregation weight {weight_new} must be in [0, 1]")
        if dt <= 0:
            raise ValueError(f"action dt {dt} must be > 0")
        self.mode, self.weight_new, self.dt = mode, weight_new, dt
        self._prev: np.ndarray | None = None
        self._prev_t: float | None = None

    def reset(self) -> None:
        self._prev, self._prev_t = None, None

    def merge(self, actions: np.ndarray, t_start: float) -> tuple[np.ndarray, int]:
        """(merged (N, D) float32, number of blended steps) for a chunk starting at t_start."""
        actions = np.asarray(actions, dtype=np.float32)
        merged, blended = actions.copy(), 0
        if self.mode == "weighted_average" and self._prev is not None:
            offset = int(round((t_start - self._prev_t) / self.dt))
            if offset >= 0:
                tail = self._prev[offset:]
                blended = min(len(tail), len(actions))
                if blended and tail.shape[1] == actions.shape[1]:
                    w = self.weight_new
                    merged[:blended] = w * actions[:blended] + (1.0 - w) * tail[:blended]
                else:
                    blended = 0
        self._prev, self._prev_t = merged, t_start
        return merged, blended
