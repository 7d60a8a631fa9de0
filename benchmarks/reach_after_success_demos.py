"""Experiment (2026-11-28): reach-v3 expert demos that go on for K steps after the first success.

`quantvla sim demos` ends an episode at its first successful step, i.e. on Meta-World's 5-cm
success radius; this records the 50 starts of one train seed with K + 1 more expert actions
(`record_episode(after_success=K)`), into a
shard folder `quantvla train` reads. Result in docs/default-policy.md: no difference from the
same fine-tune on the usual demos (validation reach 58% vs 58%).
Usage: python benchmarks/reach_after_success_demos.py SEED K OUT_DIR   (SEED in 0..3)
"""
import sys
from pathlib import Path

from quantvla_core.sim.demos import EnvSettings, record_episode
from quantvla_core.sim.env import starts_for
from quantvla_core.sim.expert import ScriptedExpert
from quantvla_core.sim.shards import write_shard

TASK = "reach-v3"


def main(seed: int, extra_steps: int, out: Path) -> None:
    settings = EnvSettings()
    env, expert = settings.make(TASK), ScriptedExpert(TASK)
    recorded = [record_episode(env, expert, s, after_success=extra_steps)
                for s in starts_for(TASK, (seed,))]
    episodes = [ep for ep, success in recorded if success]
    meta = {"image_size": settings.image_size, "max_steps": settings.max_steps,
            "goal_marker_scale": settings.goal_marker_scale,
            "source": f"metaworld expert, +{extra_steps} steps after success"}
    write_shard(out / f"{TASK}__s{seed}_i00-49.npz", episodes, settings.cameras, meta)
    print(seed, len(episodes), sum(len(e.actions) for e in episodes))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
