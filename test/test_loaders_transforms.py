"""openpi per-robot transforms (LIBERO, DROID, ALOHA): planted values through the transforms and
back, against formulas written out here, and through a loaded openpi checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError
from quantvla_core.config import DecoderConfig, ModelConfig, VisionConfig
from quantvla_core.loaders import read_io
from quantvla_core.loaders.imaging import images_to_model
from quantvla_core.loaders.robots import ROBOTS, robot_transform
from quantvla_core.models import build_model
from test_loaders import sp_model  # noqa: F401 - the PaliGemma-like SentencePiece fixture

HORIZON, DIM, IMG = 3, 16, 28


def aloha_state_gripper(v):
    """Normalised linear opening -> normalised angle: the horn (r = 22 mm) and arm (36 mm) with the
    opening d between them, angle from the law of cosines, one value at a time with math."""
    d = 0.01844 + v * (0.05800 - 0.01844)
    ang = math.asin(max(-1.0, min(1.0, (0.022**2 + d**2 - 0.036**2) / (2 * 0.022 * d))))
    return (ang - 0.5476) / (1.6296 - 0.5476)


def test_aloha_state_and_actions_planted():
    t = robot_transform("aloha", "pi0")
    state = np.arange(1, 15, dtype=np.float32) / 10  # 0.1 .. 1.4
    state[6], state[13] = 0.25, 0.8  # gripper openings
    s = t.state_in(state)
    flips = [1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1]
    for i in range(14):
        want = aloha_state_gripper(flips[i] * state[i]) if i in (6, 13) else flips[i] * state[i]
        assert s[i] == pytest.approx(want, abs=1e-6), i
    model_actions = np.linspace(-0.7, 0.9, 2 * 16, dtype=np.float32).reshape(2, 16)  # 2 steps, 16 > 14 dims
    out = t.actions_out(model_actions, s)
    assert out.shape == (2, 14)
    for k in range(2):
        for i in range(14):
            a = model_actions[k, i] + (s[i] if i not in (6, 13) else 0.0)  # joints delta, grippers absolute
            a = flips[i] * a
            if i in (6, 13):
                a = (a + 0.5476 + 0.6213) / (1.4910 + 0.6213)
            assert out[k, i] == pytest.approx(a, abs=1e-5), (k, i)
    np.testing.assert_allclose(t.actions_in(out, s), model_actions[:, :14], atol=1e-5)
    sim = robot_transform("aloha_sim", "pi0")  # no delta actions, same conversions
    out_sim = sim.actions_out(model_actions, s)
    assert out_sim[0, 0] == pytest.approx(model_actions[0, 0]) and out_sim[0, 1] == pytest.approx(-model_actions[0, 1])


def test_libero_and_droid_delta_dims_and_output_sizes():
    state = np.array([0.5, -1, 2, 0.1, 0.2, 0.3, 0.04, -0.04], np.float32)
    a = np.tile(np.arange(10, dtype=np.float32), (2, 1))
    pi0 = robot_transform("libero", "pi0").actions_out(a, state)
    np.testing.assert_allclose(pi0, a[:, :7] + np.r_[state[:6], 0.0])  # gripper (dim 6) stays absolute
    np.testing.assert_allclose(robot_transform("libero", "pi0").actions_in(pi0, state), a[:, :7])
    np.testing.assert_allclose(robot_transform("libero", "pi05").actions_out(a, state), a[:, :7])  # pi05: absolute
    np.testing.assert_allclose(robot_transform("droid", "pi0").actions_out(a, state), a[:, :8])
    assert robot_transform("none", "pi0") is None
    with pytest.raises(ValueError, match="expects 8"):
        robot_transform("droid", "pi05").state_in(np.zeros(7))


def test_camera_mapping():
    f = [np.full((10, 12, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    aloha = robot_transform("aloha", "pi05")
    slots = aloha.images_in({"cam_high": f[0], "cam_low": f[1], "cam_right_wrist": f[2]})
    assert slots[0] is f[0] and slots[1] is None and slots[2] is f[2]  # cam_low unused, left wrist absent
    images, mask = images_to_model(slots, IMG, 3, "center")
    assert mask.tolist() == [True, False, True] and np.all(images[1] == -1.0)
    assert aloha.images_in(f[:3])[1] is f[1]  # a list is in cam_high, cam_left_wrist, cam_right_wrist order
    libero = robot_transform("libero", "pi0")
    assert libero.images_in({"wrist_image": f[1], "image": f[0]}) == [f[0], f[1]]
    with pytest.raises(ValueError, match="exterior_image_1_left, wrist_image_left"):
        robot_transform("droid", "pi0").images_in({"top": f[0]})
    with pytest.raises(ValueError, match="base camera 'image'"):
        libero.images_in({"wrist_image": f[1]})


def test_unknown_robot_lists_the_accepted_names():
    with pytest.raises(CheckpointError) as e:
        robot_transform("ur5", "pi0")
    for name in ROBOTS:
        assert name in str(e.value)


def tiny_pi0():
    return ModelConfig(
        arch="pi0",
        name="t",
        vision=VisionConfig(image_size=IMG, patch_size=14, width=144, depth=1, heads=2, mlp=64),
        backbone=DecoderConfig(width=64, depth=1, mlp=96, heads=2, kv_heads=1, head_dim=16, vocab_size=300),
        expert=DecoderConfig(width=48, depth=1, mlp=64, heads=2, kv_heads=1, head_dim=16, vocab_size=300),
        action_dim=DIM,
        state_dim=DIM,
        horizon=HORIZON,
        num_steps=10,
        max_cameras=3,
        max_text_tokens=48,
    )


def write_openpi(directory, asset_id, state_dim, action_dim, tokenizer):
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    model = build_model(tiny_pi0(), device="meta")
    tensors = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {
                "action_dim": DIM,
                "action_horizon": HORIZON,
                "paligemma_variant": "gemma_2b",
                "action_expert_variant": "gemma_300m",
            }
        )
    )
    rng = np.random.default_rng(1)
    stats = {
        "state": {"mean": rng.normal(size=state_dim).tolist(), "std": (1 + rng.random(state_dim)).tolist()},
        "actions": {"mean": rng.normal(size=action_dim).tolist(), "std": (1 + rng.random(action_dim)).tolist()},
    }
    (directory / "assets" / asset_id).mkdir(parents=True)
    (directory / "assets" / asset_id / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory, stats


def constant_velocity(pol, bias, obs):
    """Zero action_out_proj weight: from zero noise the normalised chunk is exactly -bias."""
    with torch.no_grad():
        pol.model.action_out_proj.weight.zero_()
        pol.model.action_out_proj.bias.copy_(torch.as_tensor(bias))
    return pol.predict(obs, noise=torch.zeros(1, HORIZON, DIM)).actions


def test_libero_checkpoint_recognised_from_its_asset_id(tmp_path, sp_model, monkeypatch):  # noqa: F811
    monkeypatch.delenv("QUANTVLA_ROBOT", raising=False)
    d, stats = write_openpi(tmp_path / "lib", "physical-intelligence/libero", 8, 7, sp_model)
    pol = Policy.load(d)
    assert pol.io.robot == "libero" and pol.state_dim == 8 and pol.action_dim == 7
    assert any("delta action dims [0, 1, 2, 3, 4, 5]" in n for n in pol.describe()["differences"])
    state = np.array([0.5, -1, 2, 0.1, 0.2, 0.3, 0.04, -0.04], np.float32)
    frame = np.zeros((20, 20, 3), np.uint8)
    obs = Observation({"image": frame, "wrist_image": frame}, "open the drawer", state)
    batch = pol.preprocess(obs)
    assert batch.image_mask[0].tolist() == [True, True, False]
    s = stats["state"]
    np.testing.assert_allclose(
        batch.state[0, :8].numpy(), (state - s["mean"]) / (np.array(s["std"]) + 1e-6), rtol=1e-5, atol=1e-6
    )
    bias = np.linspace(-0.5, 0.5, DIM).astype(np.float32)
    a = stats["actions"]
    want = -bias[:7] * (np.array(a["std"]) + 1e-6) + a["mean"] + np.r_[state[:6], 0.0]
    np.testing.assert_allclose(constant_velocity(pol, bias, obs), np.tile(want, (HORIZON, 1)), rtol=1e-5, atol=1e-5)
    pol.save_io(tmp_path / "derived")
    assert read_io(tmp_path / "derived").robot == "libero"
    # robot 'none': the plain unnormalised first 7 dims
    plain = Policy.load(d, robot="none")
    np.testing.assert_allclose(
        constant_velocity(plain, bias, Observation([frame], "open the drawer", state)),
        np.tile(want - np.r_[state[:6], 0.0], (HORIZON, 1)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_aloha_checkpoint_by_name_and_refusals(tmp_path, sp_model):  # noqa: F811
    d, stats = write_openpi(tmp_path / "al", "my_aloha", 14, 14, sp_model)
    assert Policy.load(d).io.robot == "none"  # unknown asset id: no transform unless asked
    pol = Policy.load(d, robot="aloha")
    state = np.linspace(0.1, 0.9, 14).astype(np.float32)
    t = robot_transform("aloha", "pi0")
    bias = np.linspace(0.3, -0.3, DIM).astype(np.float32)
    a = stats["actions"]
    model_out = -bias[:14] * (np.array(a["std"]) + 1e-6) + a["mean"]
    obs = Observation([np.zeros((20, 20, 3), np.uint8)], "fold the towel", state)
    got = constant_velocity(pol, bias, obs)
    np.testing.assert_allclose(
        got, np.tile(t.actions_out(model_out[None], t.state_in(state)), (HORIZON, 1)), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(CheckpointError, match="accepted: libero, droid, aloha, aloha_sim, none"):
        Policy.load(d, robot="franka")
    with pytest.raises(CheckpointError, match="robot 'libero' has state 8"):
        Policy.load(d, robot="libero")
