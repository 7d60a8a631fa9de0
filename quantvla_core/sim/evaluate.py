"""Closed-loop MT10 evaluation of one or more policy variants on the same held-out starts.

A policy is anything with `predict(Observation, seed=...) -> ActionChunk` (chunk.actions is
(horizon, 4)); the runner executes the first `replan_steps` actions open loop, then infers
again. Every variant runs the same starts from EVAL_SEEDS with the same per-call seeds, so
outcomes are paired episode by episode and compared with an exact McNemar test.
Policies given as strings are loaded inside the worker processes:
  'expert'  Meta-World's scripted expert (privileged simulator state; an upper bound)
  'noop'    holds still (a lower bound)
  anything else -> quantvla_core.policy.Policy.load(spec, device=...)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from quantvla_core.sim.demos import EnvSettings, cached_env
from quantvla_core.sim.env import ACTION_DIM, EVAL_SEEDS, TASKS, StartState, check_task, starts_for
from quantvla_core.sim.stats import mcnemar_exact, wilson_interval


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[str, ...] = TASKS
    episodes_per_task: int = 20
    replan_steps: int = 16
    workers: int = 2
    settings: EnvSettings = field(default_factory=EnvSettings)
    device: str = "cpu"
    seed: int = 0
    eval_seeds: tuple[int, ...] = EVAL_SEEDS
    jobs_per_task: int = 2  # split a task's episodes so workers stay busy


@dataclass
class SimChunk:
    """ActionChunk-shaped result of the built-in adapters."""

    actions: np.ndarray
    timings_ms: dict = field(default_factory=dict)


class ScriptedExpertPolicy:
    """Meta-World's expert as a policy; reads the simulator state it is handed."""

    needs_sim_state = True

    def __init__(self):
        self._experts = {}

    def predict(self, obs, seed=None, *, sim_obs, task):
        from quantvla_core.sim.expert import ScriptedExpert

        expert = self._experts.setdefault(task, ScriptedExpert(task))
        return SimChunk(expert.action(sim_obs)[None])

    def describe(self) -> dict:
        return {"name": "scripted-expert", "arch": "metaworld.policies", "scheme": "-"}


class NoopPolicy:
    """Keeps the hand still with the gripper open: what doing nothing scores."""

    def predict(self, obs, seed=None):
        return SimChunk(np.tile(np.array([0, 0, 0, -1], np.float32), (8, 1)))

    def describe(self) -> dict:
        return {"name": "noop", "arch": "-", "scheme": "-"}


def load_policy(spec: str, device: str = "cpu"):
    if spec == "expert":
        return ScriptedExpertPolicy()
    if spec == "noop":
        return NoopPolicy()
    from quantvla_core.policy import Policy

    return Policy.load(spec, device=device)


def _check_spec(spec: str) -> None:
    """Fail before any worker starts on a spec that cannot load."""
    from pathlib import Path

    from quantvla_core.config import PRESETS

    if spec in ("expert", "noop", "default", "default-w4a8") or spec in PRESETS or Path(spec).is_dir():
        return
    raise ValueError(
        f"policy {spec!r} is neither 'expert', 'noop', 'default', 'default-w4a8', a preset "
        f"({', '.join(PRESETS)}) nor a model directory"
    )


def parse_policy_specs(specs) -> list[tuple[str, object]]:
    """'NAME=SPEC' or 'SPEC' (named after itself) or (name, policy object) -> (name, item)."""
    out = []
    for item in specs:
        if isinstance(item, tuple):
            name, value = item
        elif isinstance(item, str):
            name, _, value = item.partition("=") if "=" in item else (item, "", item)
            if not name or not value:
                raise ValueError(f"policy {item!r}: expected SPEC or NAME=SPEC")
        else:
            name, value = getattr(item, "name", type(item).__name__), item
        if isinstance(value, str):
            _check_spec(value)
        if name in dict(out):
            raise ValueError(f"policy name {name!r} given twice; name variants with NAME=SPEC")
        out.append((name, value))
    if not out:
        raise ValueError("no policy to evaluate; pass at least one --policy")
    return out


def _observation(obs: dict):
    try:
        from quantvla_core.policy import Observation
    except ImportError:  # the runtime is optional for the built-in adapters
        from types import SimpleNamespace as Observation
    return Observation(images=obs["images"], instruction=obs["instruction"], state=obs["state"])


# An object counts as moved once it is this far from where it started (pucks, handles,
# buttons and pegs all move centimetres when handled; contact jitter stays below).
OBJECT_MOVED_M = 0.02


class EpisodeTrace:
    """Where a failure happened, from simulator state the policy never sees: how close the
    fingers came to the task's object (the goal, for reach), how far the object moved, and how
    far from its goal it ended."""

    def __init__(self, env):
        self.reach = env.task == "reach-v3"
        self.goal = env.goal_position
        self.object_start = env.object_position
        self.min_hand_target = np.inf
        self.object_moved = 0.0
        self.update(env)

    def update(self, env) -> None:
        hand, obj = env.tcp_position, env.object_position
        target = self.goal if self.reach else obj
        self.min_hand_target = min(self.min_hand_target, float(np.linalg.norm(hand - target)))
        if not self.reach:
            self.object_moved = max(self.object_moved, float(np.linalg.norm(obj - self.object_start)))
        self.final_goal = float(np.linalg.norm((hand if self.reach else obj) - self.goal))

    def result(self) -> dict:
        return {
            "min_hand_target_m": round(self.min_hand_target, 4),
            "object_moved_m": None if self.reach else round(self.object_moved, 4),
            "final_goal_m": round(self.final_goal, 4),
        }


def run_episode(env, policy, start: StartState, replan_steps: int, seed: int) -> dict:
    """One closed-loop episode; returns outcome, length, per-inference latencies and a trace
    of where it failed (EpisodeTrace)."""
    obs = env.reset(start.seed, start.index)
    trace = EpisodeTrace(env)
    latencies = []
    while not env.done:
        call_seed = zlib.crc32(f"{seed}/{start.task}/{start.seed}/{start.index}/{env.steps}".encode())
        t0 = time.perf_counter()
        if getattr(policy, "needs_sim_state", False):
            chunk = policy.predict(_observation(obs), seed=call_seed, sim_obs=env.sim_obs, task=env.task)
        else:
            chunk = policy.predict(_observation(obs), seed=call_seed)
        latencies.append(1000 * (time.perf_counter() - t0))
        actions = np.asarray(chunk.actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or len(actions) == 0:
            raise ValueError(
                f"policy returned actions of shape {actions.shape}; MT10 needs "
                f"(horizon >= 1, {ACTION_DIM}) = (dx, dy, dz, grip) in [-1, 1]"
            )
        for action in actions[:replan_steps]:
            obs, _ = env.step(action)
            trace.update(env)
            if env.done:
                break
    return {
        "task": start.task,
        "seed": start.seed,
        "index": start.index,
        "success": env.success,
        "steps": env.steps,
        "latency_ms": latencies,
        **trace.result(),
    }


_POLICIES: dict = {}  # per-process cache of loaded string specs


def _run_job(args) -> tuple[str, dict, list[dict]]:
    name, spec, starts, cfg, threads = args
    if isinstance(spec, str):
        if spec not in _POLICIES:
            if threads:
                import torch

                torch.set_num_threads(threads)
            _POLICIES[spec] = load_policy(spec, cfg.device)
        policy = _POLICIES[spec]
    else:
        policy = spec
    env = cached_env(starts[0].task, cfg.settings)
    results = [run_episode(env, policy, s, cfg.replan_steps, cfg.seed) for s in starts]
    describe = policy.describe() if hasattr(policy, "describe") else {"name": name}
    return name, describe, results


def evaluate(policies, cfg: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """Run every policy variant on the same starts; returns the report dict (see summarize)."""
    from tqdm import tqdm

    variants = parse_policy_specs(policies)
    for t in cfg.tasks:
        check_task(t)
    if not 1 <= cfg.episodes_per_task <= 50 * len(cfg.eval_seeds):
        raise ValueError(f"episodes_per_task must be in 1..{50 * len(cfg.eval_seeds)}, got {cfg.episodes_per_task}")
    if cfg.replan_steps < 1 or cfg.workers < 1:
        raise ValueError(f"replan_steps and workers must be >= 1, got {cfg.replan_steps}, {cfg.workers}")
    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else 0
    jobs = []
    for name, spec in variants:
        for t in cfg.tasks:
            starts = starts_for(t, cfg.eval_seeds)[: cfg.episodes_per_task]
            size = -(-len(starts) // cfg.jobs_per_task)
            jobs += [(name, spec, starts[i : i + size], cfg, threads) for i in range(0, len(starts), size)]
    in_workers = [cfg.workers > 1 and isinstance(j[1], str) for j in jobs]
    remote = [j for j, w in zip(jobs, in_workers) if w]
    local = [j for j, w in zip(jobs, in_workers) if not w]  # objects stay in this process
    episodes = {name: [] for name, _ in variants}
    describes = {}
    t0 = time.perf_counter()
    bar = tqdm(total=sum(len(j[2]) for j in jobs), desc="mt10 eval", unit="ep", disable=not progress)
    pool = mp.get_context("spawn").Pool(cfg.workers) if remote else None
    try:
        streams = [map(_run_job, local)]
        if pool:
            streams.insert(0, pool.imap_unordered(_run_job, remote))
        for stream in streams:
            for name, describe, results in stream:
                describes[name] = describe
                episodes[name] += results
                bar.update(len(results))
    finally:
        bar.close()
        if pool:
            pool.close()
            pool.join()
    specs = {name: spec if isinstance(spec, str) else type(spec).__name__ for name, spec in variants}
    return summarize(episodes, describes, specs, cfg, time.perf_counter() - t0)


def _failure_stages(failed: list[dict]) -> dict:
    """Failed episodes split by how far they got: object never moved vs moved but not to the
    goal (reach has no object: only the closest the hand came to the goal)."""
    if not failed or "min_hand_target_m" not in failed[0]:
        return {"count": len(failed)}
    out = {
        "count": len(failed),
        "median_min_hand_target_m": float(np.median([e["min_hand_target_m"] for e in failed])),
        "median_final_goal_m": float(np.median([e["final_goal_m"] for e in failed])),
    }
    if failed[0]["object_moved_m"] is not None:
        out["object_not_moved"] = sum(e["object_moved_m"] < OBJECT_MOVED_M for e in failed)
    return out


def summarize(episodes: dict, describes: dict, specs: dict, cfg: EvalConfig, seconds: float) -> dict:
    """Per-task and mean success with Wilson 95% intervals, lengths, latency, McNemar pairs."""
    report = {
        "format": "quantvla-mt10-eval",
        "version": 1,
        "seconds": round(seconds, 1),
        "config": {**asdict(cfg), "settings": asdict(cfg.settings)},
        "variants": {},
        "paired": [],
    }
    outcome = {}
    for name, eps in episodes.items():
        eps = sorted(eps, key=lambda e: (TASKS.index(e["task"]), e["seed"], e["index"]))
        outcome[name] = {(e["task"], e["seed"], e["index"]): e["success"] for e in eps}
        per_task = {}
        for t in cfg.tasks:
            te = [e for e in eps if e["task"] == t]
            k = sum(e["success"] for e in te)
            failed = [e for e in te if not e["success"]]
            per_task[t] = {
                "successes": k,
                "episodes": len(te),
                "rate": k / len(te),
                "ci95": wilson_interval(k, len(te)),
                "mean_steps": float(np.mean([e["steps"] for e in te])),
                "failures": _failure_stages(failed),
            }
        k, n = sum(e["success"] for e in eps), len(eps)
        lat = np.concatenate([e["latency_ms"] for e in eps]) if eps else np.zeros(0)
        report["variants"][name] = {
            "spec": specs[name],
            "describe": describes.get(name, {}),
            "tasks": per_task,
            "successes": k,
            "episodes": n,
            "mean_success": float(np.mean([v["rate"] for v in per_task.values()])),
            "mean_ci95": wilson_interval(k, n),
            "mean_steps": float(np.mean([e["steps"] for e in eps])),
            "mean_steps_success": float(np.mean([e["steps"] for e in eps if e["success"]])) if k else None,
            "latency_ms": {
                "mean": float(lat.mean()),
                "p50": float(np.percentile(lat, 50)),
                "p95": float(np.percentile(lat, 95)),
                "calls": int(lat.size),
            },
            "episode_outcomes": [[e["task"], e["seed"], e["index"], e["success"], e["steps"]] for e in eps],
            "episode_traces": [
                [e.get("min_hand_target_m"), e.get("object_moved_m"), e.get("final_goal_m")] for e in eps
            ],
        }
    names = list(episodes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            keys = sorted(outcome[a])
            test = mcnemar_exact([outcome[a][k] for k in keys], [outcome[b][k] for k in keys])
            report["paired"].append({"a": a, "b": b, **test})
    return report
