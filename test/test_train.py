"""Behaviour cloning: loss goes down, training resumes, the result is a loadable policy."""

import json

import numpy as np
import pytest

from quantvla_core import Observation, Policy
from quantvla_core.config import preset
from quantvla_core.sim.shards import Episode, write_shard
from quantvla_core.sim.train import TrainConfig, train


def write_toy_demos(folder, episodes=6, steps=12, size=32, task="reach-v3", name="toy", offset=0.0, first_index=0):
    """Reach-like toy data: the action points toward a coloured square's position."""
    rng = np.random.default_rng(first_index)
    eps = []
    for e in range(episodes):
        imgs = np.zeros((steps, 2, size, size, 3), np.uint8)
        gx, gy = rng.integers(4, size - 8, size=2)
        imgs[:, :, gy : gy + 6, gx : gx + 6] = (255, 40, 40)
        target = np.array([gx / size - 0.5, gy / size - 0.5, 0.0, 1.0], np.float32)
        states = rng.normal(size=(steps, 4)).astype(np.float32) * 0.1
        actions = np.repeat(target[None], steps, 0) + rng.normal(size=(steps, 4)).astype(np.float32) * 0.01
        eps.append(
            Episode(task, 0, first_index + e, "reach the red goal marker", imgs, states + offset, actions + offset)
        )
    write_shard(folder / f"{name}.npz", eps, cameras=("corner", "topview"), meta={"image_size": size})


@pytest.mark.slow
def test_training_reduces_loss_resumes_and_writes_a_policy(tmp_path):
    write_toy_demos(tmp_path / "demos")
    cfg = preset("tiny")
    out = tmp_path / "run"
    tc = TrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=5, save_every=20, shift_pixels=2)
    train(tmp_path / "demos", out, cfg, TrainConfig(**{**vars(tc), "steps": 20}), progress=False)
    first = json.loads((out / "train_state" / "state.json").read_text())
    assert first["step"] == 20
    result = train(tmp_path / "demos", out, preset("tiny"), tc, progress=False)  # resumes at 20
    assert result["steps"] == 40
    assert json.loads((out / "policy" / "training.json").read_text())["train_config"]["steps"] == 40
    pol = Policy.load(out / "policy")
    assert pol.config.action_mean is not None  # normalisation stats travel with the policy
    img = np.zeros((32, 32, 3), np.uint8)
    chunk = pol.predict(Observation([img, img], "reach the red goal marker", np.zeros(4, np.float32)))
    assert chunk.actions.shape == (cfg.horizon, 4) and np.isfinite(chunk.actions).all()


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    """Adam on one fixed batch (same noise and times each step) must fit it: gradients are right."""
    import torch

    from quantvla_core.models import build_model
    from quantvla_core.sim.train import DemoDataset

    write_toy_demos(tmp_path / "demos")
    cfg = preset("tiny")
    data = DemoDataset(tmp_path / "demos", cfg)
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = data.batch(np.arange(0, len(data), 5), torch.Generator().manual_seed(0), 0)

    def loss_on_batch():
        torch.manual_seed(0)
        return model.flow_loss(*batch, generator=torch.Generator().manual_seed(1))

    losses = []
    for _ in range(40):
        loss = loss_on_batch()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_batches_hold_the_right_actions_prompts_and_shifted_crops(tmp_path):
    """Gathered batches against the raw demo arrays: chunks clipped at the episode end, the
    episode's own instruction, and each shifted image an exact crop of the padded original."""
    import torch

    from quantvla_core.sim.instructions import INSTRUCTIONS
    from quantvla_core.sim.shards import load_demos
    from quantvla_core.sim.train import DemoDataset

    write_toy_demos(tmp_path / "demos", episodes=3, steps=12)
    cfg = preset("tiny")
    raw = load_demos(tmp_path / "demos")
    data = DemoDataset(tmp_path / "demos", cfg)
    idx = np.array([0, 11, 12, 30])
    batch, actions = data.batch(idx, torch.Generator().manual_seed(0), 0)
    norm = (raw.actions - data.action_mean) / data.action_std
    for row, i in enumerate(idx):
        end = raw.episode_starts[np.searchsorted(raw.episode_starts, i, side="right")]
        want = norm[np.minimum(i + np.arange(cfg.horizon), end - 1)]
        np.testing.assert_allclose(actions[row].numpy(), want, rtol=1e-6, atol=1e-6)
        text = bytes((batch.tokens[row][batch.token_mask[row]][1:] - 3).tolist()).decode()
        assert any((p.lower() + "\n").startswith(text) for p in INSTRUCTIONS["reach-v3"]), text
    assert batch.image_mask.all()
    shift = 2
    x = torch.from_numpy(raw.images[idx]).permute(0, 1, 4, 2, 3).float().flatten(0, 1) / 127.5 - 1
    shifted = data._shift(x, shift, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="replicate")
    s = x.shape[-1]
    offsets = set()
    for n in range(x.shape[0]):
        hits = [
            (oy, ox)
            for oy in range(2 * shift + 1)
            for ox in range(2 * shift + 1)
            if torch.equal(shifted[n], padded[n, :, oy : oy + s, ox : ox + s])
        ]
        assert hits, f"image {n} is not a crop of its padded original"
        offsets.add(hits[0])
    assert len(offsets) > 1  # offsets are drawn per image, not one per batch


def test_task_weights_set_each_tasks_share_of_the_batches(tmp_path):
    """push-v3 weighted 3x: its share is 3 * rows / (3 * rows + other rows), checked on draws;
    weight 0 leaves a task out; unknown tasks and negative weights are refused by name."""
    import torch

    from quantvla_core.sim.cli import parse_task_weights
    from quantvla_core.sim.train import DemoDataset

    write_toy_demos(tmp_path / "demos", episodes=4, steps=12, task="reach-v3", name="a")
    write_toy_demos(tmp_path / "demos", episodes=2, steps=12, task="push-v3", name="b", first_index=10)
    data = DemoDataset(tmp_path / "demos", preset("tiny"))
    push_rows = set(range(48, 72))
    share = data.use_task_weights({"push-v3": 3})
    assert share["push-v3"] == pytest.approx(3 * 24 / (3 * 24 + 48))
    draws = data.sample(torch.Generator().manual_seed(0), 20000).tolist()
    assert np.mean([r in push_rows for r in draws]) == pytest.approx(0.6, abs=0.015)
    data.use_task_weights({"reach-v3": 0})
    assert set(data.sample(torch.Generator().manual_seed(1), 500).tolist()) <= push_rows
    with pytest.raises(ValueError, match="door-open-v3.*accepted: reach-v3, push-v3"):
        data.use_task_weights({"door-open-v3": 2})
    with pytest.raises(ValueError, match=">= 0"):
        data.use_task_weights({"push-v3": -1})
    with pytest.raises(ValueError, match="nothing left"):
        data.use_task_weights({"push-v3": 0, "reach-v3": 0})
    assert parse_task_weights(["push-v3=3", "reach-v3=0.5"]) == {"push-v3": 3.0, "reach-v3": 0.5}
    for bad in (["push-v3"], ["push-v3=x"], ["=2"], ["push-v3=1", "push-v3=2"]):
        with pytest.raises(SystemExit, match="task-weight"):
            parse_task_weights(bad)


def test_fine_tuning_keeps_the_starting_policys_normalisation(tmp_path):
    """Demos of other tasks have other statistics; fine-tuning must keep the ones the starting
    weights were trained with (new ones would shift every input and output of the policy)."""
    import torch

    from quantvla_core.sim.train import DemoDataset

    write_toy_demos(tmp_path / "base")
    tc = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, save_every=100, shift_pixels=0)
    train(tmp_path / "base", tmp_path / "run1", preset("tiny"), tc, progress=False)
    base = json.loads((tmp_path / "run1" / "policy" / "config.json").read_text())
    write_toy_demos(tmp_path / "other", offset=0.7)
    train(
        tmp_path / "other",
        tmp_path / "run2",
        preset("tiny"),
        TrainConfig(**{**vars(tc), "init": str(tmp_path / "run1" / "policy")}),
        progress=False,
    )
    tuned = json.loads((tmp_path / "run2" / "policy" / "config.json").read_text())
    for key in ("state_mean", "state_std", "action_mean", "action_std"):
        assert tuned[key] == pytest.approx(base[key]), key
    other = DemoDataset(tmp_path / "other", preset("tiny"))
    assert other.action_mean[0] == pytest.approx(base["action_mean"][0] + 0.7, abs=1e-3)
    other.use_normalization(base["state_mean"], base["state_std"], base["action_mean"], base["action_std"])
    _, actions = other.batch(np.array([0]), torch.Generator().manual_seed(0), 0)
    raw = (np.asarray(other._raw_actions[0]) - base["action_mean"]) / base["action_std"]
    np.testing.assert_allclose(actions[0, 0].numpy(), raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="action_std must be positive"):
        other.use_normalization(base["state_mean"], base["state_std"], base["action_mean"], [0, 1, 1, 1])
