"""Policy API, preprocessing and model directories (round trip and every bad-checkpoint case)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError, save_model_dir
from quantvla_core.config import preset
from quantvla_core.models import build_model
from quantvla_core.preprocess import resize_with_pad
from quantvla_core.tokenizer import ByteTokenizer, clean_instruction, prompt_text


def obs(state_dim=4, n_images=1, shape=(48, 64, 3), instruction="pick up the red block"):
    rng = np.random.default_rng(0)
    return Observation(
        [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(n_images)],
        instruction,
        np.zeros(state_dim, np.float32),
    )


def save_tiny(path, name="tiny"):
    cfg = preset(name)
    cfg.action_mean, cfg.action_std = [1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]
    model = build_model(cfg, seed=3)
    save_model_dir(path, cfg, model.state_dict())
    return cfg, model


def test_predict_shapes_timings_and_determinism():
    pol = Policy.load("tiny")
    c1 = pol.predict(obs(n_images=2), seed=4)
    c2 = pol.predict(obs(n_images=2), seed=4)
    assert c1.actions.shape == (pol.horizon, pol.action_dim) and c1.actions.dtype == np.float32
    np.testing.assert_array_equal(c1.actions, c2.actions)
    for key in ["preprocess", "vision", "prefix", "denoise", "postprocess", "total"] + [
        f"denoise_step_{i}" for i in range(pol.num_steps)
    ]:
        assert key in c1.timings_ms and c1.timings_ms[key] >= 0
    assert not np.array_equal(c1.actions, pol.predict(obs(n_images=2), seed=5).actions)


def test_model_dir_round_trip_is_bit_exact(tmp_path):
    cfg, model = save_tiny(tmp_path / "m")
    pol = Policy.load(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), pol.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # de-normalisation from the saved stats is applied
    ref = model.sample_actions(pol.preprocess(obs()), pol.model.sample_noise(1, torch.Generator().manual_seed(2)))
    out = pol.predict(obs(), seed=2).actions
    np.testing.assert_allclose(out, ref[0].numpy() * 0.5 + np.array([1, 2, 3, 4]), rtol=1e-5, atol=1e-5)


def test_save_is_atomic_and_replaces_whole_directory(tmp_path, monkeypatch):
    import quantvla_core.checkpoint as ckpt

    save_tiny(tmp_path / "m")
    (tmp_path / "m" / "stray.txt").write_text("old")
    save_tiny(tmp_path / "m", "tiny-pi05")
    assert not (tmp_path / "m" / "stray.txt").exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["arch"] == "pi05"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp dirs left behind

    # Fail mid-write: config.json and model.safetensors are already in the temporary directory
    # when the extra file turns out not to be JSON-serialisable.
    written = []
    real_save_file = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda t, f, **kw: (written.append(f), real_save_file(t, f, **kw)))
    cfg = preset("tiny")
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_model_dir(tmp_path / "m", cfg, build_model(cfg).state_dict(), extra_files={"x.json": object()})
    assert len(written) == 1 and written[0].endswith("model.safetensors") and "/m/" not in written[0]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["arch"] == "pi05"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_weights", "listed in the manifest but missing"),
        ("truncated", "sha256 mismatch"),
        ("no_manifest_bad_json", "not valid JSON"),
        ("wrong_shape", "shape mismatches"),
        ("missing_key", "missing keys"),
        ("corrupt_safetensors_rehashed", "cannot read safetensors"),
        ("bad_config", "unknown model config keys"),
    ],
)
def test_bad_checkpoints_give_clear_errors(tmp_path, case, match):
    from quantvla_core.checkpoint import write_manifest

    d = tmp_path / "m"
    cfg, model = save_tiny(d)
    if case == "missing_weights":
        (d / "model.safetensors").unlink()
    elif case == "truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "no_manifest_bad_json":
        (d / "manifest.json").write_text("{not json")
    elif case in ("wrong_shape", "missing_key"):
        sd = model.state_dict()
        if case == "wrong_shape":
            sd["action_out_proj.weight"] = torch.zeros(3, 3)
        else:
            del sd["action_in_proj.bias"]
        save_model_dir(d, cfg, sd)
    elif case == "corrupt_safetensors_rehashed":
        (d / "model.safetensors").write_bytes(b"\x00" * 100)
        write_manifest(d)
    elif case == "bad_config":
        c = json.loads((d / "config.json").read_text())
        c["bogus"] = 1
        (d / "config.json").write_text(json.dumps(c))
        write_manifest(d)
    with pytest.raises(CheckpointError, match=match):
        Policy.load(d)


def test_load_errors_name_what_is_accepted(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory or preset"):
        Policy.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="CUDA is not available|unsupported device"):
        Policy.load("tiny", device="cuda" if not torch.cuda.is_available() else "tpu")
    # tokenizer= / robot= belong to real (LeRobot / openpi) checkpoints; elsewhere they would be ignored
    d = tmp_path / "m"
    save_tiny(d)
    for source in ("tiny", d):
        with pytest.raises(ValueError, match="apply to a LeRobot or openpi checkpoint directory"):
            Policy.load(source, robot="libero")
        with pytest.raises(ValueError, match="apply to a LeRobot or openpi checkpoint directory"):
            Policy.load(source, tokenizer=tmp_path / "tokenizer.model")


@pytest.mark.parametrize(
    "name,attr,missing",
    [
        ("default", "DEFAULT_POLICY_DIR", "config.json"),
        ("default-w4a8", "DEFAULT_W4A8_DIR", "config.json"),
        ("default", "DEFAULT_POLICY_DIR", "model.safetensors"),  # config there, weights gone
        ("default-w4a8", "DEFAULT_W4A8_DIR", "quantization.json"),
    ],
)
def test_missing_default_policy_is_an_error_naming_the_file(tmp_path, monkeypatch, name, attr, missing):
    """No silent fallback to random weights: the error names the missing file and how to get it."""
    import quantvla_core.policy as policy_mod

    empty = tmp_path / "assets" / "gone"
    empty.mkdir(parents=True)
    # Every file the policy needs up to (not including) the missing one is present.
    for f in ("config.json", "model.safetensors", "manifest.json", "quantization.json"):
        if f == missing:
            break
        (empty / f).write_text("{}")
    monkeypatch.setattr(policy_mod, attr, empty)
    with pytest.raises(CheckpointError) as err:
        Policy.load(name)
    msg = str(err.value)
    assert str(empty / missing) in msg
    assert "git checkout -- quantvla_core/assets/gone" in msg and "docs/default-policy.md" in msg
    # The structure lookup (`quantvla layout`) resolves 'default' the same way.
    from quantvla_core.policy import model_structure

    with pytest.raises(CheckpointError, match=missing):
        model_structure(name)
    # Presets still give seeded random weights, unaffected by the missing assets.
    a, b = Policy.load("tiny", seed=0), Policy.load("tiny", seed=0)
    assert a.name == "tiny"
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_committed_default_policies_load():
    for name in ("default", "default-w4a8"):
        pol = Policy.load(name)
        assert pol.name in ("default_policy", "default_policy_w4a8")


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(images=[]), "1 or more camera images"),
        (dict(images=[np.zeros((10, 10, 3), np.float32)]), "uint8"),
        (dict(images=[np.zeros((10, 10), np.uint8)]), "shape"),
        (dict(images=[np.zeros((0, 10, 3), np.uint8)]), "pixels a side"),
        (dict(images=[np.zeros((8, 8, 3), np.uint8)] * 3), "accepts 1..2"),
        (dict(state=np.array([np.nan, 0, 0, 0], np.float32)), "NaN or inf"),
        (dict(state=np.zeros(3, np.float32)), "expects 4"),
        (dict(instruction="   "), "instruction is empty"),
        (dict(instruction=None), "must be a str"),
        (dict(instruction="x" * 5000), "at most"),
    ],
)
def test_invalid_observations_raise_clear_errors(bad, match):
    pol = Policy.load("tiny")
    o = obs()
    for k, v in bad.items():
        setattr(o, k, v)
    with pytest.raises(ValueError, match=match):
        pol.predict(o)


def test_resize_with_pad_keeps_aspect_and_centres():
    img = np.full((20, 40, 3), 200, np.uint8)
    out = resize_with_pad(img, 32)
    assert out.shape == (32, 32, 3)
    assert (out[:8] == 0).all() and (out[24:] == 0).all() and (out[8:24] == 200).all()


def test_prompt_formats_and_tokenizer_round_trip():
    assert prompt_text("pi0", "Pick  the\tCup ") == "pick the cup\n"
    p = prompt_text("pi05", "open drawer", np.array([-1.0, 0.0, 0.999, 5.0]))
    assert p == "Task: open drawer, State: 0 128 255 255;\nAction: "
    assert clean_instruction("  ça\u0301 va\n ") == "çá va"
    tok = ByteTokenizer()
    ids, mask = tok.encode("héllo 🤖", 32)
    assert tok.decode(ids[mask]) == "héllo 🤖" and ids[0] == 1 and mask.sum() == 1 + len("héllo 🤖".encode())


def test_cli_info_run_and_demo(tmp_path):
    import cv2

    img = tmp_path / "cam.png"
    cv2.imwrite(str(img), np.full((30, 40, 3), 128, np.uint8))
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "quantvla_core.cli", *a],  # noqa: E731
        capture_output=True,
        text=True,
        timeout=300,
    )
    r = run("info", "pi05-3b")
    assert r.returncode == 0 and "backbone" in r.stdout and "2,508.5M" in r.stdout, r.stderr
    r = run("run", "tiny", "--image", str(img), "--instruction", "push the button")
    assert r.returncode == 0 and "action chunk 8 x 4" in r.stdout and "denoise" in r.stdout, r.stderr
    r = run("run", "tiny", "--image", str(tmp_path / "missing.png"), "--instruction", "x")
    assert r.returncode == 2 and "cannot read image" in r.stderr
    r = run("demo", "--model", "tiny", "--chunks", "1")
    assert r.returncode == 0 and "chunk 0" in r.stdout, r.stderr
