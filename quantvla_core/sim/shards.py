"""Demonstration shard format (`.npz`, no pickle): one file holds whole episodes.

Keys (T = steps in the shard, E = episodes, C = cameras, S = image size):
  images              uint8   (T, C, S, S, 3)  RGB, observation before the action
  states              float32 (T, 4)           hand xyz + gripper opening
  actions             float32 (T, 4)           expert action in [-1, 1]
  episode_starts      int64   (E + 1,)         episode e is rows starts[e]:starts[e+1]
  episode_task        int16   (E,)             index into `tasks`
  episode_seed        int32   (E,)             metaworld.MT1 seed of the start
  episode_index       int32   (E,)             start index within that seed
  episode_instruction <U      (E,)             the instruction shown in the episode
  tasks               <U      (10,)            task names (MT10 order)
  cameras             <U      (C,)             camera names, same order as images' C axis
  meta                <U      ()               JSON: format, version, image_size, max_steps, ...
Full spec: docs/sim-data.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantvla_core.sim.env import ACTION_DIM, STATE_DIM, TASKS

FORMAT = "quantvla-mt10-demos"
VERSION = 1
_KEYS = (
    "images",
    "states",
    "actions",
    "episode_starts",
    "episode_task",
    "episode_seed",
    "episode_index",
    "episode_instruction",
    "tasks",
    "cameras",
    "meta",
)


@dataclass
class Episode:
    """One recorded episode: T observations and the T actions taken from them."""

    task: str
    seed: int
    index: int
    instruction: str
    images: np.ndarray  # (T, C, S, S, 3) uint8
    states: np.ndarray  # (T, 4) float32
    actions: np.ndarray  # (T, 4) float32


@dataclass
class DemoSet:
    """Arrays of one shard or of several concatenated; see the module docstring."""

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    episode_starts: np.ndarray
    episode_task: np.ndarray
    episode_seed: np.ndarray
    episode_index: np.ndarray
    episode_instruction: np.ndarray
    tasks: tuple[str, ...]
    cameras: tuple[str, ...]
    meta: dict

    @property
    def num_episodes(self) -> int:
        return len(self.episode_task)

    def episode(self, e: int) -> Episode:
        a, b = int(self.episode_starts[e]), int(self.episode_starts[e + 1])
        return Episode(
            self.tasks[self.episode_task[e]],
            int(self.episode_seed[e]),
            int(self.episode_index[e]),
            str(self.episode_instruction[e]),
            self.images[a:b],
            self.states[a:b],
            self.actions[a:b],
        )


def write_shard(path, episodes: list[Episode], cameras, meta: dict) -> Path:
    """Write `episodes` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    if not episodes:
        raise ValueError(f"no episodes to write to {path}")
    for i, ep in enumerate(episodes):
        sizes = (len(ep.images), len(ep.states), len(ep.actions))
        if len(set(sizes)) != 1 or sizes[0] == 0:
            raise ValueError(
                f"episode {i} ({ep.task} seed {ep.seed} index {ep.index}): "
                f"images/states/actions lengths differ or are 0: {sizes}"
            )
    lengths = [len(ep.actions) for ep in episodes]
    arrays = {
        "images": np.concatenate([ep.images for ep in episodes]).astype(np.uint8),
        "states": np.concatenate([ep.states for ep in episodes]).astype(np.float32),
        "actions": np.concatenate([ep.actions for ep in episodes]).astype(np.float32),
        "episode_starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "episode_task": np.array([TASKS.index(ep.task) for ep in episodes], np.int16),
        "episode_seed": np.array([ep.seed for ep in episodes], np.int32),
        "episode_index": np.array([ep.index for ep in episodes], np.int32),
        "episode_instruction": np.array([ep.instruction for ep in episodes], dtype=np.str_),
        "tasks": np.array(TASKS, dtype=np.str_),
        "cameras": np.array(list(cameras), dtype=np.str_),
        "meta": np.array(json.dumps({"format": FORMAT, "version": VERSION, **meta}), dtype=np.str_),
    }
    _validate(arrays, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_shard(path) -> DemoSet:
    """Load and check one shard; a truncated or foreign file raises ValueError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing:
                raise ValueError(
                    f"demo shard {path} lacks keys {missing}; a shard written by `quantvla sim demos` has {list(_KEYS)}"
                )
            arrays = {k: npz[k] for k in _KEYS}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(
            f"demo shard {path} is unreadable (truncated or not an .npz written by `quantvla sim demos`): {exc}"
        ) from exc
    _validate(arrays, path)
    meta = json.loads(str(arrays["meta"]))
    return DemoSet(
        **{k: arrays[k] for k in _KEYS[:8]},
        tasks=tuple(str(t) for t in arrays["tasks"]),
        cameras=tuple(str(c) for c in arrays["cameras"]),
        meta=meta,
    )


def load_demos(folder) -> DemoSet:
    """All shards (`*.npz`) of a folder concatenated, in file-name order."""
    paths = sorted(Path(folder).glob("*.npz"))
    if not paths:
        raise ValueError(f"no demo shards (*.npz) in {folder}; make them with `quantvla sim demos --out {folder}`")
    return concat_demos(
        [read_shard(p) for p in paths], paths, what="demo shard", hint="a folder must hold one demo run"
    )


def concat_demos(
    parts: list[DemoSet], names: list, what: str = "part", hint: str = "parts must not overlap"
) -> DemoSet:
    """Demo sets joined in order (episode boundaries offset); they must share cameras, tasks
    and image shape and hold disjoint starts. `names` name the parts in errors."""
    first = parts[0]
    for name, d in zip(names, parts):
        if d.cameras != first.cameras or d.tasks != first.tasks or d.images.shape[1:] != first.images.shape[1:]:
            raise ValueError(
                f"{what} {name} has cameras {d.cameras}, {len(d.tasks)} tasks and "
                f"images {d.images.shape[1:]}, but {names[0]} has {first.cameras}, "
                f"{len(first.tasks)} and {first.images.shape[1:]}: all must come "
                "from one demo format"
            )
    seen = {}
    for name, d in zip(names, parts):
        for key in zip(d.episode_task.tolist(), d.episode_seed.tolist(), d.episode_index.tolist()):
            if key in seen:
                raise ValueError(
                    f"start {first.tasks[key[0]]} seed {key[1]} index {key[2]} is in "
                    f"both {seen[key]} and {name}: {hint}"
                )
            seen[key] = name
    if len(parts) == 1:
        return first
    offsets = np.cumsum([0] + [len(d.actions) for d in parts[:-1]])
    starts = np.concatenate(
        [d.episode_starts[:-1] + o for d, o in zip(parts, offsets)] + [[sum(len(d.actions) for d in parts)]]
    )
    cat = {
        k: np.concatenate([getattr(d, k) for d in parts])
        for k in ("images", "states", "actions", "episode_task", "episode_seed", "episode_index", "episode_instruction")
    }
    return DemoSet(
        **cat, episode_starts=starts.astype(np.int64), tasks=first.tasks, cameras=first.cameras, meta=first.meta
    )


def _validate(a: dict, path) -> None:
    def bad(what):
        raise ValueError(f"demo shard {path}: {what}")

    meta = json.loads(str(a["meta"]))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        bad(f"format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT} v{VERSION}")
    t = len(a["actions"])
    img = a["images"]
    if (
        img.dtype != np.uint8
        or img.ndim != 5
        or img.shape[0] != t
        or img.shape[-1] != 3
        or img.shape[1] != len(a["cameras"])
    ):
        bad(f"images must be uint8 (T={t}, C={len(a['cameras'])}, S, S, 3), got {img.dtype} {img.shape}")
    if a["states"].shape != (t, STATE_DIM) or a["actions"].shape != (t, ACTION_DIM):
        bad(
            f"states/actions must be ({t}, {STATE_DIM})/({t}, {ACTION_DIM}), got "
            f"{a['states'].shape}/{a['actions'].shape}"
        )
    starts, e = a["episode_starts"], len(a["episode_task"])
    if starts.shape != (e + 1,) or starts[0] != 0 or starts[-1] != t or np.any(np.diff(starts) <= 0):
        bad(f"episode_starts must rise strictly from 0 to {t} with {e + 1} entries")
    for k in ("episode_seed", "episode_index", "episode_instruction"):
        if a[k].shape != (e,):
            bad(f"{k} must have {e} entries, got shape {a[k].shape}")
    if tuple(str(x) for x in a["tasks"]) != TASKS:
        bad(f"tasks must be the MT10 list {TASKS}")
    if e and (a["episode_task"].min() < 0 or a["episode_task"].max() >= len(TASKS)):
        bad(f"episode_task must index the {len(TASKS)} tasks")
