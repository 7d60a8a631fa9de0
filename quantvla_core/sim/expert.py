"""Meta-World's scripted experts, which read the full simulator state (object and goal
positions) that the learned policy never sees. Used to make demonstrations and as an
upper-bound policy in evaluation."""

from __future__ import annotations

import warnings

import numpy as np

from quantvla_core.sim.env import check_task


class ScriptedExpert:
    """`action(sim_obs)` for one task: a float32 (4,) action in [-1, 1]."""

    def __init__(self, task: str):
        from metaworld.policies import ENV_POLICY_MAP

        self.task = check_task(task)
        self._policy = ENV_POLICY_MAP[task]()
        # Meta-World's experts warn on every action that their gains exceed the action range.
        warnings.filterwarnings("ignore", message="Constant.*may be too high")

    def action(self, sim_obs: np.ndarray) -> np.ndarray:
        return np.clip(self._policy.get_action(sim_obs), -1.0, 1.0).astype(np.float32)
