"""MT10 environment: deterministic resets and steps, real (non-black) frames from both cameras,
goal information only in the images, clear errors on bad input."""

import numpy as np
import pytest

from quantvla_core.sim.env import DEFAULT_CAMERAS, EVAL_SEEDS, TASKS, TRAIN_SEEDS, MT10Env, starts_for
from quantvla_core.sim.instructions import INSTRUCTIONS, instruction_for


@pytest.fixture(scope="module")
def reach():
    env = MT10Env("reach-v3", max_steps=30)
    yield env
    env.close()


def _rollout(env, seed, index, actions):
    obs = [env.reset(seed, index)]
    for a in actions:
        obs.append(env.step(a)[0])
    return obs


def test_reset_and_step_are_deterministic(reach):
    noise = np.random.default_rng(0).uniform(-0.2, 0.2, (5, 4))
    actions = (np.array([0.8, 0.5, 0.6, -1.0]) + noise).astype(np.float32)
    first = _rollout(reach, TRAIN_SEEDS[0], 3, actions)
    _rollout(reach, TRAIN_SEEDS[1], 7, actions[::-1])  # a different episode in between
    again = _rollout(reach, TRAIN_SEEDS[0], 3, actions)
    for a, b in zip(first, again):
        assert a["instruction"] == b["instruction"]
        np.testing.assert_array_equal(a["state"], b["state"])
        for ia, ib in zip(a["images"], b["images"]):
            np.testing.assert_array_equal(ia, ib)
    # the actions did move the hand
    assert np.linalg.norm(first[-1]["state"][:3] - first[0]["state"][:3]) > 0.01


def test_frames_are_rgb_non_black_and_differ_between_cameras(reach):
    obs = reach.reset(EVAL_SEEDS[0], 0)
    assert len(obs["images"]) == len(DEFAULT_CAMERAS) == 2
    for img in obs["images"]:
        assert img.dtype == np.uint8 and img.shape == (96, 96, 3)
        assert img.mean() > 40 and img.std() > 20  # black frames have mean ~0
    assert np.abs(obs["images"][0].astype(int) - obs["images"][1]).mean() > 10


def test_state_is_proprioceptive_and_goal_is_only_in_the_images(reach):
    a, b = reach.reset(0, 0), reach.reset(0, 1)  # same hand start, different goal
    assert a["state"].dtype == np.float32 and a["state"].shape == (4,)
    np.testing.assert_allclose(a["state"], b["state"], atol=1e-4)
    top = DEFAULT_CAMERAS.index("topview")
    changed = np.abs(a["images"][top].astype(int) - b["images"][top]).max(-1) > 30
    assert changed.sum() >= 8  # the enlarged goal marker moved by several pixels


def test_bad_input_is_rejected_with_clear_errors(reach):
    with pytest.raises(ValueError, match="unknown MT10 task"):
        MT10Env("reach-v2")
    with pytest.raises(ValueError, match="unknown camera"):
        MT10Env("reach-v3", cameras=("front",))
    reach.reset(0, 0)
    with pytest.raises(ValueError, match="4 finite floats"):
        reach.step(np.zeros(3))
    with pytest.raises(ValueError, match="4 finite floats"):
        reach.step(np.array([0, 0, np.nan, 0]))
    with pytest.raises(ValueError, match="index must be in"):
        reach.reset(0, 50)


def test_episode_ends_at_max_steps(reach):
    reach.reset(0, 0)
    for _ in range(reach.max_steps):
        _, info = reach.step(np.zeros(4, np.float32))
    assert info["done"] and not info["success"] and info["steps"] == 30
    with pytest.raises(RuntimeError, match="episode is over"):
        reach.step(np.zeros(4))


def test_instructions_and_seed_splits():
    assert set(INSTRUCTIONS) == set(TASKS)
    for task in TASKS:
        assert len(set(INSTRUCTIONS[task])) >= 3
    assert instruction_for("push-v3", 5) == INSTRUCTIONS["push-v3"][1]
    # tasks sharing a scene must never share an instruction
    all_texts = [t for ts in INSTRUCTIONS.values() for t in ts]
    assert len(all_texts) == len(set(all_texts))
    assert not set(TRAIN_SEEDS) & set(EVAL_SEEDS)
    starts = starts_for("reach-v3", EVAL_SEEDS)
    assert len(starts) == 50 * len(EVAL_SEEDS) and len(set(starts)) == len(starts)


def test_an_episode_can_run_on_past_its_first_success():
    """stop_at_success=False: the expert keeps stepping after success (until max_steps) and
    success stays True; by default the episode ends at the first success."""
    from quantvla_core.sim.expert import ScriptedExpert

    env, expert = MT10Env("reach-v3", image_size=32, max_steps=150), ScriptedExpert("reach-v3")
    env.reset(TRAIN_SEEDS[0], 0)
    while not env.done:
        env.step(expert.action(env.sim_obs))
    first = env.steps
    assert env.success and first < 150
    env.stop_at_success = False
    env.reset(TRAIN_SEEDS[0], 0)
    while not env.done:
        env.step(expert.action(env.sim_obs))
    assert env.success and env.steps == 150
    env.close()


@pytest.mark.parametrize("task", ["push-v3", "drawer-open-v3", "window-open-v3", "window-close-v3"])
def test_first_frame_shows_the_start_not_the_previous_episode(task):
    """The reset frame equals a frame rendered after MuJoCo recomputes every position, and a
    start looks the same whether or not another episode ran before it in this environment."""
    env = MT10Env(task, max_steps=60)
    try:
        first = env.reset(EVAL_SEEDS[0], 7)
        sim_obs = env.sim_obs.copy()
        env._mujoco.mj_forward(env._env.model, env._env.data)
        for a, b in zip(first["images"], env.render()):
            np.testing.assert_array_equal(a, b)
        # the simulator observation (experts, traces) holds the same positions, stacked twice
        np.testing.assert_array_equal(sim_obs[:18], env._env._get_curr_obs_combined_no_goal())
        np.testing.assert_array_equal(sim_obs[:18], sim_obs[18:36])
        env.reset(EVAL_SEEDS[0], 2)
        for _ in range(50):
            env.step(np.array([0.5, 0.5, -0.5, 1.0], np.float32))
        again = env.reset(EVAL_SEEDS[0], 7)
        for a, b in zip(first["images"], again["images"]):
            np.testing.assert_array_equal(a, b)
    finally:
        env.close()
