"""Experiment (2026-11-28): reach-v3 expert demos that go on for K steps after the first success.

`quantvla sim demos` ends an episode at its first successful step, i.e. on Meta-World's 5-cm
success radius; this records the 50 starts of one train seed with K more expert steps, into a
shard folder `quantvla train` reads. Result in docs/default-policy.md: no difference from the
same fine-tune on the usual demos (validation reach 58% vs 58%).
Usage: python benchmarks/reach_after_success_demos.py SEED K OUT_DIR   (SEED in 0..3)
"""
import sys
from pathlib import Path

import numpy as np

from quantvla_core.sim.demos import EnvSettings
from quantvla_core.sim.env import starts_for
from quantvla_core.sim.expert import ScriptedExpert
from quantvla_core.sim.shards import Episode, write_shard

TASK = "reach-v3"


def record(env, expert, start, extra_steps: int) -> Episode | None:
    """One expert episode that stops `extra_steps` steps after its first success (None: failed)."""
    obs = env.reset(start.seed, start.index)
    images, states, actions, after = [], [], [], 0
    while not env.done and after <= extra_steps:
        action = expert.action(env.sim_obs)
        images.append(np.stack(obs["images"]))
        states.append(obs["state"])
        actions.append(action)
        after += env.success
        obs, _ = env.step(action)
    if not env.success:
        return None
    return Episode(TASK, start.seed, start.index, env.instruction, np.stack(images),
                   np.stack(states), np.stack(actions))


def main(seed: int, extra_steps: int, out: Path) -> None:
    settings = EnvSettings()
    env, expert = settings.make(TASK), ScriptedExpert(TASK)
    env.stop_at_success = False
    episodes = [ep for s in starts_for(TASK, (seed,))
                if (ep := record(env, expert, s, extra_steps)) is not None]
    meta = {"image_size": settings.image_size, "max_steps": settings.max_steps,
            "goal_marker_scale": settings.goal_marker_scale,
            "source": f"metaworld expert, +{extra_steps} steps after success"}
    write_shard(out / f"{TASK}__s{seed}_i00-49.npz", episodes, settings.cameras, meta)
    print(seed, len(episodes), sum(len(e.actions) for e in episodes))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
