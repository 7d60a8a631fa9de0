"""Scripted-expert demonstrations on MT10 train starts, successes only, in parallel workers.

Work is split into jobs of up to `chunk` consecutive starts of one task; each job writes one
shard named after its starts. Episodes already in the folder count and their starts are never
recorded again, so an interrupted run resumes and a larger `per_task` tops a folder up.
Starts are taken in a fixed order from TRAIN_SEEDS; a task whose expert failed on some starts
gets more starts in the next round until it has `per_task` successes (or starts run out).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantvla_core.fileio import atomic_write_json

import numpy as np

from quantvla_core.sim.env import (
    DEFAULT_CAMERAS,
    DEFAULT_GOAL_MARKER_SCALE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    TASKS,
    TRAIN_SEEDS,
    MT10Env,
    StartState,
    check_task,
    starts_for,
)
from quantvla_core.sim.shards import Episode, read_shard, write_shard


@dataclass(frozen=True)
class EnvSettings:
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    image_size: int = DEFAULT_IMAGE_SIZE
    max_steps: int = DEFAULT_MAX_STEPS
    goal_marker_scale: float = DEFAULT_GOAL_MARKER_SCALE

    def make(self, task: str) -> MT10Env:
        return MT10Env(task, self.cameras, self.image_size, self.max_steps, self.goal_marker_scale)


@dataclass
class JobResult:
    task: str
    attempted: int
    succeeded: int
    steps: int
    seconds: float
    shard: str | None
    failures: list = field(default_factory=list)


_ENVS: dict = {}  # per-process cache: building an env costs ~0.5 s


def cached_env(task: str, settings: EnvSettings) -> MT10Env:
    """One live environment per process, rebuilt when the task or settings change."""
    key = (task, settings)
    if key not in _ENVS:
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS[key] = settings.make(task)
    return _ENVS[key]


def record_episode(env: MT10Env, expert, start: StartState, after_success: int = 0) -> tuple[Episode, bool]:
    """Run the expert from `start`; the episode holds each observation and its action.

    Episodes end at the first success (on Meta-World's success radius); after_success = K > 0
    goes on until K + 1 more expert actions have been recorded past it (or max_steps)."""
    env.stop_at_success = after_success == 0
    obs = env.reset(start.seed, start.index)
    images, states, actions, past = [], [], [], 0
    while not env.done and past <= after_success:
        action = expert.action(env.sim_obs)
        images.append(np.stack(obs["images"]))
        states.append(obs["state"])
        actions.append(action)
        past += env.success
        obs, info = env.step(action)
    env.stop_at_success = True
    ep = Episode(
        start.task, start.seed, start.index, env.instruction, np.stack(images), np.stack(states), np.stack(actions)
    )
    return ep, env.success


def shard_name(starts: list[StartState]) -> str:
    s = starts[0]
    return f"{s.task}__s{s.seed}_i{s.index:02d}-{starts[-1].index:02d}.npz"


def run_job(args) -> JobResult:
    """Record the starts of one job and write its successful episodes as one shard."""
    starts, out_dir, settings = args
    from quantvla_core.sim.expert import ScriptedExpert

    task = starts[0].task
    t0 = time.perf_counter()
    env, expert = cached_env(task, settings), ScriptedExpert(task)
    episodes, failures, steps = [], [], 0
    for start in starts:
        ep, ok = record_episode(env, expert, start)
        steps += len(ep.actions)
        (episodes if ok else failures).append(ep if ok else [start.seed, start.index])
    shard = None
    if episodes:
        meta = {
            "image_size": settings.image_size,
            "max_steps": settings.max_steps,
            "goal_marker_scale": settings.goal_marker_scale,
            "source": "metaworld expert",
        }
        shard = str(write_shard(Path(out_dir) / shard_name(starts), episodes, settings.cameras, meta))
    return JobResult(task, len(starts), len(episodes), steps, time.perf_counter() - t0, shard, failures)


def _prior_shards(out: Path, tasks) -> list[tuple[JobResult, set]]:
    """Shards already in `out` for these tasks, with the starts each holds. Unreadable ones (an
    interrupted run) are removed so their starts are recorded again."""
    found = []
    for path in sorted(out.glob("*.npz")):
        task = path.name.split("__", 1)[0]
        if task not in tasks:
            continue
        try:
            shard = read_shard(path)
        except ValueError:
            path.unlink()
            continue
        keys = set(zip(shard.episode_seed.tolist(), shard.episode_index.tolist()))
        found.append((JobResult(task, len(keys), len(keys), len(shard.actions), 0.0, str(path)), keys))
    return found


def _prior_failures(out: Path, tasks) -> dict[str, set]:
    """Starts an earlier run's index recorded as expert failures (deterministic: not retried)."""
    try:
        index = json.loads((out / "index.json").read_text())
        return {t: {tuple(f) for f in index["tasks"][t]["failed_starts"]} for t in tasks if t in index.get("tasks", {})}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def generate_demos(
    out_dir,
    tasks=TASKS,
    per_task: int = 50,
    workers: int = 2,
    settings: EnvSettings = EnvSettings(),
    chunk: int = 10,
    seeds=TRAIN_SEEDS,
    progress: bool = True,
) -> dict:
    """Make `per_task` successful expert episodes per task in `out_dir`; returns the index."""
    from tqdm import tqdm

    tasks = [check_task(t) for t in tasks]
    if per_task < 1 or workers < 1 or chunk < 1:
        raise ValueError(f"per_task, workers and chunk must be >= 1, got {per_task}, {workers}, {chunk}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Whatever the folder already holds counts, whichever per_task/chunk made it: a larger
    # per_task tops the folder up with new starts only, so shards never overlap.
    done = {t: 0 for t in tasks}
    results: list[JobResult] = []
    covered: dict[str, set] = {t: set() for t in tasks}
    for res, keys in _prior_shards(out, tasks):
        results.append(res)
        done[res.task] += res.succeeded
        covered[res.task] |= keys
    for t, failed in _prior_failures(out, tasks).items():
        failed -= covered[t]
        if failed:
            results.append(JobResult(t, len(failed), 0, 0, 0.0, None, sorted(map(list, failed))))
            covered[t] |= failed
    pending = {t: [s for s in starts_for(t, seeds) if (s.seed, s.index) not in covered[t]] for t in tasks}
    t0 = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = tqdm(
        total=per_task * len(tasks),
        desc="expert demos",
        unit="ep",
        disable=not progress,
        initial=sum(min(per_task, n) for n in done.values()),
    )
    try:
        while True:
            jobs = []
            for t in tasks:
                need = max(0, min(per_task - done[t], len(pending[t])))
                take, pending[t] = pending[t][:need], pending[t][need:]
                jobs += [take[i : i + chunk] for i in range(0, len(take), chunk)]
            if not jobs:
                break
            args = [(job, str(out), settings) for job in jobs]
            for res in pool.imap_unordered(run_job, args) if pool else map(run_job, args):
                _collect(res, results, done, bar)
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    index = _index(results, tasks, settings, time.perf_counter() - t0, workers)
    _write_json(out / "index.json", index)
    return index


def _collect(res: JobResult, results: list, done: dict, bar) -> None:
    results.append(res)
    done[res.task] += res.succeeded
    bar.update(res.succeeded)
    bar.set_postfix(task=res.task.removesuffix("-v3"), fails=sum(r.attempted - r.succeeded for r in results))


def _index(results, tasks, settings: EnvSettings, seconds: float, workers: int) -> dict:
    per_task = {}
    for t in tasks:
        rs = [r for r in results if r.task == t]
        ok, tried = sum(r.succeeded for r in rs), sum(r.attempted for r in rs)
        per_task[t] = {
            "episodes": ok,
            "attempted": tried,
            "expert_success": ok / tried if tried else None,
            "failed_starts": [f for r in rs for f in r.failures],
        }
    return {
        "format": "quantvla-mt10-demos-index",
        "version": 1,
        "cameras": list(settings.cameras),
        "image_size": settings.image_size,
        "max_steps": settings.max_steps,
        "goal_marker_scale": settings.goal_marker_scale,
        "episodes": sum(v["episodes"] for v in per_task.values()),
        "steps": sum(r.steps for r in results),
        "seconds": round(seconds, 1),
        "workers": workers,
        "tasks": per_task,
        "shards": sorted(os.path.basename(r.shard) for r in results if r.shard),
    }


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)
