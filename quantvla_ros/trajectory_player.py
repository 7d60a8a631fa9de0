"""Playing JointTrajectory action chunks step by step against a simulator clock.

A chunk's point k is due at `header.stamp + time_from_start[k]` (a zero stamp means "start on
receipt", the joint_trajectory_controller convention) and stays valid until the next point is
due; the last point holds for one more point spacing. At sim time t the player executes the
point due at t from the newest chunk that has started, so points that elapsed while the policy
was still thinking are skipped rather than replayed late, and a newer chunk replaces the old
one as soon as it starts (replanning). When the newest started chunk has run out, there is no
action: the caller holds still. With `sync_start` a chunk may only start at its own stamp (a
lockstep simulator then waits for a chunk computed from the current observation). Malformed chunks are refused whole before anything of them runs.
Times are integer nanoseconds so grid-aligned stamps compare exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Stamps and time_from_start come through float seconds in some publishers; a point due within
# this much after t counts as due at t.
TOLERANCE_NS = 1_000_000


class TrajectoryRejected(ValueError):
    """A chunk refused before execution; `code` is the counter key (joint_names, empty, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Chunk:
    start_ns: int  # when point 0 is due (sim time)
    offsets_ns: np.ndarray  # int64 (N,): time_from_start of every point, strictly increasing
    actions: np.ndarray  # float32 (N, D) in the player's joint order
    spacing_ns: int  # how long the last point holds: the chunk's own spacing
    executed: int = 0  # steps executed from this chunk
    last_index: int = -1  # index of the last executed point
    skipped: int = 0  # points that elapsed unexecuted before a later one ran

    @property
    def end_ns(self) -> int:
        """First time at which no point of this chunk is valid any more."""
        return self.start_ns + int(self.offsets_ns[-1]) + self.spacing_ns


def duration_ns(d) -> int:
    return int(d.sec) * 1_000_000_000 + int(d.nanosec)


def parse_trajectory(msg, joint_names: list[str], now_ns: int, default_spacing_ns: int) -> Chunk:
    """JointTrajectory -> Chunk in `joint_names` order, or TrajectoryRejected naming the problem.

    Joints may come in any order but must be exactly `joint_names` (no missing, extra or
    repeated names); every point needs one finite position per joint; time_from_start must be
    >= 0 and strictly increasing. A single-point chunk holds for `default_spacing_ns`.
    """
    names = list(msg.joint_names)
    if len(set(names)) != len(names):
        raise TrajectoryRejected(
            "joint_names", f"trajectory repeats joint names {names}; expected exactly {joint_names} (any order)"
        )
    if set(names) != set(joint_names):
        missing = [n for n in joint_names if n not in names]
        extra = [n for n in names if n not in joint_names]
        raise TrajectoryRejected(
            "joint_names",
            f"trajectory joints {names} do not match: "
            f"missing {missing}, unexpected {extra}; expected exactly "
            f"{joint_names} (any order)",
        )
    if not msg.points:
        raise TrajectoryRejected("empty", "trajectory has no points; send the whole chunk, one point per step")
    order = [names.index(n) for n in joint_names]
    rows, offsets = [], []
    for k, point in enumerate(msg.points):
        if len(point.positions) != len(names):
            raise TrajectoryRejected(
                "point_length",
                f"point {k} has {len(point.positions)} positions for {len(names)} joints; they must match",
            )
        row = np.asarray(point.positions, dtype=np.float64)
        if not np.all(np.isfinite(row)):
            raise TrajectoryRejected(
                "nonfinite", f"point {k} has non-finite positions {row.tolist()}; every value must be finite"
            )
        offset = duration_ns(point.time_from_start)
        if offset < 0 or (offsets and offset <= offsets[-1]):
            raise TrajectoryRejected(
                "time_order",
                f"point {k} time_from_start {offset * 1e-9:.6f}"
                " s is negative or not after the previous point's; use "
                "k * dt",
            )
        rows.append(row[order])
        offsets.append(offset)
    stamp = duration_ns(msg.header.stamp)
    spacing = offsets[-1] - offsets[-2] if len(offsets) > 1 else default_spacing_ns
    return Chunk(
        start_ns=stamp if stamp > 0 else now_ns,
        offsets_ns=np.asarray(offsets, dtype=np.int64),
        actions=np.asarray(rows, dtype=np.float32),
        spacing_ns=int(spacing),
    )


@dataclass
class ChunkPlayer:
    """Holds the offered chunks of one episode and answers "which action at sim time t"."""

    max_points_per_chunk: int = 0  # 0 = every point of a chunk may run
    # True: a chunk may only start at its own stamp, i.e. it was computed from the current
    # observation (lockstep simulation waits for it; the policy's latency costs no sim time).
    sync_start: bool = False
    chunks: list = field(default_factory=list)  # in arrival order
    points_executed: int = 0
    points_skipped: int = 0
    chunks_used: int = 0
    chunks_too_old: int = 0  # sync_start: dropped because their stamp had passed unstarted

    def reset(self) -> None:
        self.chunks.clear()
        self.points_executed = self.points_skipped = self.chunks_used = self.chunks_too_old = 0

    def offer(self, chunk: Chunk, episode_start_ns: int, now_ns: int) -> str:
        """'accepted', 'stale' (stamped before this episode began) or 'late' (every point has
        already elapsed at `now_ns`); only accepted chunks can ever run."""
        if chunk.start_ns < episode_start_ns:
            return "stale"
        if chunk.end_ns <= now_ns:
            return "late"
        self.chunks.append(chunk)
        return "accepted"

    def action_at(self, t_ns: int) -> np.ndarray | None:
        """The action due at `t_ns` (counted as executed), or None: nothing valid, hold still.

        The newest-arrived chunk that has started wins; chunks that arrived before it are
        dropped (latest command wins), chunks that arrived after it but start later wait.
        """
        if self.sync_start:
            old = [
                c for c in self.chunks if c.executed == 0 and c.start_ns + int(c.offsets_ns[0]) < t_ns - TOLERANCE_NS
            ]
            self.chunks_too_old += len(old)
            self.chunks = [c for c in self.chunks if not any(c is o for o in old)]
        started = [i for i, c in enumerate(self.chunks) if c.start_ns <= t_ns + TOLERANCE_NS]
        if not started:
            return None
        del self.chunks[: started[-1]]
        current = self.chunks[0]
        if t_ns >= current.end_ns - TOLERANCE_NS:
            return None
        if self.max_points_per_chunk and current.executed >= self.max_points_per_chunk:
            return None
        local = t_ns - current.start_ns + TOLERANCE_NS
        k = int(np.searchsorted(current.offsets_ns, local, side="right")) - 1
        if k < 0:
            return None  # its first point is not due yet
        if current.executed == 0:
            self.chunks_used += 1
        skipped = max(0, k - current.last_index - 1)
        current.skipped += skipped
        self.points_skipped += skipped
        current.last_index = k
        current.executed += 1
        self.points_executed += 1
        return current.actions[k].copy()
