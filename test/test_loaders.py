"""Real checkpoint loaders for the PaliGemma family (LeRobot pi0 / pi0.5, openpi pi0 / pi0.5).

Each test writes a tiny checkpoint in the real key layout and config format, loads it through
Policy.load, and checks: every tensor landed in the module of the same real name (planted random
values), a SentencePiece model trained here tokenizes the original prompt formats, the
normalisation round trip matches the original formulas written out here, and bad checkpoints
fail with errors naming what differs.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError
from quantvla_core.config import DecoderConfig, ModelConfig, VisionConfig
from quantvla_core.models import build_model

ROBOT_STATE, ROBOT_ACTION = 3, 4
MAX_STATE, MAX_ACTION = 5, 6
HORIZON, STEPS, IMG = 4, 3, 28
VOCAB = 300
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # PaliGemma's special ids

CORPUS = (
    """pick up the red block and put it in the bowl
open the top drawer of the cabinet
Task: push the green button, State: 0 12 128 255 64 200 7;
Action: close the door slowly
move the arm to the left then grasp the cup
"""
    * 4
)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece model with PaliGemma's special ids and a literal newline piece."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text(CORPUS + "".join(f"{i} " for i in range(300)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "tok"),
        vocab_size=VOCAB,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        hard_vocab_limit=False,
        split_digits=True,
        minloglevel=2,
    )
    return d / "tok.model"


def tiny_config(arch):
    return ModelConfig(
        arch=arch,
        name="t",
        vision=VisionConfig(image_size=IMG, patch_size=14, width=144, depth=1, heads=2, mlp=64),
        backbone=DecoderConfig(width=64, depth=2, mlp=96, heads=2, kv_heads=1, head_dim=16, vocab_size=VOCAB),
        expert=DecoderConfig(width=48, depth=2, mlp=64, heads=2, kv_heads=1, head_dim=16, vocab_size=VOCAB),
        action_dim=MAX_ACTION,
        state_dim=MAX_STATE,
        horizon=HORIZON,
        num_steps=STEPS,
        max_cameras=2,
        max_text_tokens=48 if arch == "pi0" else 64,
    )


def planted_state(arch, seed=0):
    """Our module names -> distinct random tensors (so any swap of two tensors is detected)."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(tiny_config(arch), device="meta")
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


# The real names, written out independently of the loader's rules.
def lerobot_key(k, old_naming=False):
    if old_naming:  # transformers < 4.52 (LeRobot <= 0.3 checkpoints)
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        k = k.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
    return "model." + k


def write_lerobot(
    directory, arch, state, *, old_naming=False, tokenizer=None, mode=None, extra=None, drop=(), config_overrides=None
):
    directory.mkdir(parents=True)
    tensors = {lerobot_key(k, old_naming): v for k, v in state.items()}
    embed = state["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
    head = "model.paligemma_with_expert.paligemma." + (
        "language_model.lm_head.weight" if old_naming else "lm_head.weight"
    )
    tensors[head] = embed.clone()
    tensors["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.randn(VOCAB, 48)
    for k in drop:
        tensors.pop(k)
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    mode = mode or ("QUANTILES" if arch == "pi05" else "MEAN_STD")
    cfg = {
        "type": arch,
        "n_obs_steps": 1,
        "chunk_size": HORIZON,
        "n_action_steps": HORIZON,
        "max_state_dim": MAX_STATE,
        "max_action_dim": MAX_ACTION,
        "num_inference_steps": STEPS,
        "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m",
        "dtype": "float32",
        "image_resolution": [IMG, IMG],
        "empty_cameras": 0,
        "tokenizer_max_length": 48 if arch == "pi0" else 64,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "input_features": {
            "observation.images.base": {"type": "VISUAL", "shape": [3, 240, 320]},
            "observation.images.wrist": {"type": "VISUAL", "shape": [3, 240, 320]},
            "observation.state": {"type": "STATE", "shape": [ROBOT_STATE]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [ROBOT_ACTION]}},
    }
    cfg.update(config_overrides or {})
    (directory / "config.json").write_text(json.dumps(cfg))
    write_lerobot_stats(directory, {k: v for k, v in cfg["normalization_mapping"].items()})
    if tokenizer is not None:
        (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory


STATS = {
    "observation.state": {
        "mean": np.array([0.5, -1.0, 2.0], np.float32),
        "std": np.array([2.0, 0.5, 1.0], np.float32),
        "min": np.array([-1, -3, 0], np.float32),
        "max": np.array([3, 1, 4], np.float32),
        "q01": np.array([-0.5, -2, 0.5], np.float32),
        "q99": np.array([2.5, 0, 3.5], np.float32),
    },
    "action": {
        "mean": np.array([1, 2, 3, 4], np.float32),
        "std": np.array([0.1, 0.2, 0.3, 0.4], np.float32),
        "min": np.array([0, 0, 0, 0], np.float32),
        "max": np.array([2, 4, 6, 8], np.float32),
        "q01": np.array([-1, 0, 1, 2], np.float32),
        "q99": np.array([1, 4, 5, 10], np.float32),
    },
}


def write_lerobot_stats(directory, norm_map):
    flat = {f"{feat}.{s}": v for feat, d in STATS.items() for s, v in d.items()}
    pre, post = (
        "policy_preprocessor_step_3_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    )
    save_numpy(flat, str(directory / pre))
    save_numpy({k: v for k, v in flat.items() if k.startswith("action.")}, str(directory / post))
    step = {
        "eps": 1e-8,
        "norm_map": norm_map,
        "features": {
            "observation.state": {"type": "STATE", "shape": [ROBOT_STATE]},
            "action": {"type": "ACTION", "shape": [ROBOT_ACTION]},
        },
    }
    (directory / "policy_preprocessor.json").write_text(
        json.dumps(
            {
                "name": "policy_preprocessor",
                "steps": [
                    {"registry_name": "rename_observations_processor", "config": {}},
                    {"registry_name": "to_batch_processor", "config": {}},
                    {"registry_name": "normalizer_processor", "config": step, "state_file": pre},
                ],
            }
        )
    )
    (directory / "policy_postprocessor.json").write_text(
        json.dumps(
            {
                "name": "policy_postprocessor",
                "steps": [
                    {"registry_name": "unnormalizer_processor", "config": step, "state_file": post},
                    {"registry_name": "device_processor", "config": {}},
                ],
            }
        )
    )


def frames(n=2):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(30 + 7 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def assert_planted(policy, state):
    loaded = policy.model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k].float(), v.float()), k


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,old", [("pi0", False), ("pi0", True), ("pi05", False)])
def test_lerobot_planted_values_and_forward(tmp_path, sp_model, arch, old):
    state = planted_state(arch)
    d = write_lerobot(tmp_path / "ckpt", arch, state, old_naming=old, tokenizer=sp_model)
    pol = Policy.load(d)
    assert pol.config.arch == arch and pol.describe()["format"] == f"lerobot/{arch}"
    assert_planted(pol, state)
    assert (pol.state_dim, pol.action_dim, pol.horizon) == (ROBOT_STATE, ROBOT_ACTION, HORIZON)
    assert pol.config.num_image_tokens == 4 and pol.config.max_cameras == 2
    chunk = pol.predict(Observation(frames(), "pick up the red block", np.array([0.1, -0.2, 3.0])), seed=0)
    assert chunk.actions.shape == (HORIZON, ROBOT_ACTION) and np.all(np.isfinite(chunk.actions))


def test_real_key_names_are_the_ones_written(tmp_path, sp_model):
    """The file really uses LeRobot's names (guards the test's own layout helper)."""
    from safetensors import safe_open

    d = write_lerobot(tmp_path / "ckpt", "pi05", planted_state("pi05"), tokenizer=sp_model)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in [
        "model.paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight",
        "model.paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight",
        "model.paligemma_with_expert.gemma_expert.model.layers.1.input_layernorm.dense.weight",
        "model.paligemma_with_expert.gemma_expert.model.norm.dense.bias",
        "model.paligemma_with_expert.paligemma.lm_head.weight",
        "model.time_mlp_in.weight",
    ]:
        assert k in keys, k


def _constant_velocity_actions(pol, bias):
    """Zero action_out_proj weight: every Euler step adds dt * bias, so from zero noise the
    normalised chunk is exactly -bias (10 steps of dt = -1/N, t: 1 -> 0)."""
    with torch.no_grad():
        pol.model.action_out_proj.weight.zero_()
        pol.model.action_out_proj.bias.copy_(torch.as_tensor(bias))
    noise = torch.zeros(1, HORIZON, MAX_ACTION)
    return pol.predict(Observation(frames(1), "open the drawer", np.zeros(ROBOT_STATE)), noise=noise).actions


def test_lerobot_unnormalisation_matches_original_formulas(tmp_path, sp_model):
    bias = np.array([0.5, -0.25, 1.0, 0.0, 7.0, 7.0], np.float32)  # the last 2 are padding, dropped
    a = STATS["action"]
    for mode, expected in [
        ("MEAN_STD", -bias[:4] * a["std"] + a["mean"]),
        ("MIN_MAX", (-bias[:4] + 1) / 2 * (a["max"] - a["min"]) + a["min"]),
        ("QUANTILES", (-bias[:4] + 1) * (a["q99"] - a["q01"]) / 2 + a["q01"]),
    ]:
        d = write_lerobot(tmp_path / mode, "pi0", planted_state("pi0"), tokenizer=sp_model, mode=mode)
        pol = Policy.load(d)
        np.testing.assert_allclose(
            _constant_velocity_actions(pol, bias), np.tile(expected, (HORIZON, 1)), rtol=1e-5, atol=1e-5
        )
        s = STATS["observation.state"]
        x = np.array([1.0, 0.0, 2.0], np.float32)
        want = {
            "MEAN_STD": (x - s["mean"]) / (s["std"] + 1e-8),
            "MIN_MAX": 2 * (x - s["min"]) / (s["max"] - s["min"]) - 1,
            "QUANTILES": 2 * (x - s["q01"]) / (s["q99"] - s["q01"]) - 1,
        }[mode]
        np.testing.assert_allclose(pol.state_norm.normalize(x), want, rtol=1e-6)


def test_pi0_prompt_and_padding_follow_lerobot(tmp_path, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pol = Policy.load(write_lerobot(tmp_path / "c", "pi0", planted_state("pi0"), tokenizer=sp_model))
    batch = pol.preprocess(Observation(frames(1), "pick up the red block", np.zeros(ROBOT_STATE)))
    ids = batch.tokens[0][batch.token_mask[0]].tolist()
    assert ids[0] == BOS_ID and sp.decode(ids[1:]) == "pick up the red block\n"
    assert batch.tokens.shape[1] == 48 and not batch.token_mask[0, len(ids) :].any()
    assert (batch.tokens[0, len(ids) :] == PAD_ID).all()
    # state: normalised with the checkpoint's stats and zero-padded to max_state_dim
    s = STATS["observation.state"]
    want = (np.array([0.0, 0.0, 0.0]) - s["mean"]) / (s["std"] + 1e-8)
    np.testing.assert_allclose(batch.state[0, :3].numpy(), want, rtol=1e-6)
    assert batch.state.shape[1] == MAX_STATE and (batch.state[0, 3:] == 0).all()
    # second camera absent: masked, filled with -1 (black)
    assert batch.image_mask[0].tolist() == [True, False] and (batch.images[0, 1] == -1).all()


def test_pi05_prompt_has_binned_state(tmp_path, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    pol = Policy.load(write_lerobot(tmp_path / "c", "pi05", planted_state("pi05"), tokenizer=sp_model))
    q01, q99 = STATS["observation.state"]["q01"], STATS["observation.state"]["q99"]
    # raw states chosen to normalise to exactly -1, 0 and ~1 - 1/512: bins 0, 128, 255
    norm = np.array([-1.0, 0.0, 1.0 - 1 / 512])
    raw = (norm + 1) / 2 * (q99 - q01) + q01
    batch = pol.preprocess(Observation(frames(1), "push_the button", raw))
    ids = batch.tokens[0][batch.token_mask[0]].tolist()
    assert ids[0] == BOS_ID
    assert sp.decode(ids[1:]) == "Task: push the button, State: 0 128 255;\nAction: "
    from quantvla_core.loaders.text import discretize_state_openpi

    assert discretize_state_openpi(np.array([-1.5, -1.0, 0.99999, 1.0, 2.0])).tolist() == [-1, 0, 255, 255, 255]


def test_image_resize_with_pad_matches_openpi_convention():
    from quantvla_core.loaders.imaging import resize_with_pad

    img = np.full((10, 20, 3), 255, np.uint8)  # wide white image -> 14 x 28 band in the middle
    out = resize_with_pad(img, 28, "center")
    assert out.shape == (3, 28, 28)
    rows = (out[0] > 0).any(axis=1)
    assert rows.sum() == 14 and rows[7:21].all() and out[0, 0, 0] == -1.0 and abs(out[0, 14, 14] - 1.0) < 1e-6
    top_left = resize_with_pad(img, 28, "top_left")
    assert np.allclose(top_left[0, 14:], 1.0) and (top_left[0, :14] == -1.0).all()
    same = np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(resize_with_pad(same, 28), same.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


# -- openpi -----------------------------------------------------------------------------------
def write_openpi(directory, arch, state, tokenizer):
    directory.mkdir(parents=True)
    tensors = dict(state)
    # safetensors save_model keeps one name of the tied embedding: here only the lm_head
    tensors["paligemma_with_expert.paligemma.lm_head.weight"] = tensors.pop(
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {
                "action_dim": MAX_ACTION,
                "action_horizon": HORIZON,
                "paligemma_variant": "gemma_2b",
                "action_expert_variant": "gemma_300m",
                "precision": "float32",
            }
        )
    )
    stats = {
        "state": {"mean": [0.5, -1.0, 2.0], "std": [2.0, 0.5, 1.0], "q01": [-0.5, -2, 0.5], "q99": [2.5, 0, 3.5]},
        "actions": {"mean": [1, 2, 3, 4], "std": [0.1, 0.2, 0.3, 0.4], "q01": [-1, 0, 1, 2], "q99": [1, 4, 5, 10]},
    }
    (directory / "assets" / "my_robot").mkdir(parents=True)
    (directory / "assets" / "my_robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return directory, stats


@pytest.mark.parametrize("arch", ["pi0", "pi05"])
def test_openpi_planted_values_prompt_and_normalisation(tmp_path, sp_model, arch):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    state = planted_state(arch, seed=3)
    d, stats = write_openpi(tmp_path / "op", arch, state, sp_model)
    pol = Policy.load(d)
    assert pol.describe()["format"] == f"openpi/{arch}"
    assert_planted(pol, state)
    assert pol.config.max_text_tokens == (200 if arch == "pi05" else 48)
    batch = pol.preprocess(Observation(frames(1), " open_the drawer\n", np.array([0.5, -1.0, 2.0])))
    ids = batch.tokens[0][batch.token_mask[0]].tolist()
    text = sp.decode(ids[1:])
    if arch == "pi0":  # openpi: cleaned task, then "\n" tokenised on its own
        assert text == "open the drawer\n" and ids[-1] == sp.piece_to_id("\n")
    else:  # quantile-normalised (0.5 - (-0.5)) / 3 * 2 - 1 = -1/3 -> bin 85
        q = stats["state"]
        norm = (np.array([0.5, -1.0, 2.0]) - q["q01"]) / (np.array(q["q99"]) - q["q01"] + 1e-6) * 2 - 1
        bins = np.digitize(norm, np.linspace(-1, 1, 257)[:-1]) - 1
        assert text == f"Task: open the drawer, State: {' '.join(map(str, bins))};\nAction: "
    bias = np.array([0.5, -0.25, 1.0, 0.0, 3.0, 3.0], np.float32)
    a = stats["actions"]
    if arch == "pi0":
        want = -bias[:4] * (np.array(a["std"]) + 1e-6) + a["mean"]
    else:
        want = (-bias[:4] + 1) / 2 * (np.array(a["q99"]) - a["q01"] + 1e-6) + a["q01"]
    np.testing.assert_allclose(_constant_velocity_actions(pol, bias)[0], want, rtol=1e-5, atol=1e-5)


# -- errors ---------------------------------------------------------------------------------------
def test_errors_list_unknown_missing_and_mismatched_keys(tmp_path, sp_model):
    state = planted_state("pi0")
    q = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"
    d = write_lerobot(
        tmp_path / "bad",
        "pi0",
        state,
        tokenizer=sp_model,
        drop=[q, "model.state_proj.bias"],
        extra={
            "model.paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_norm.weight": torch.ones(16),
            "model.some_new_head.weight": torch.ones(2, 2),
        },
    )
    with pytest.raises(CheckpointError) as e:
        Policy.load(d)
    msg = str(e.value)
    assert "unknown keys (no rule of this format matches them) (1): model.some_new_head.weight" in msg
    assert "no place in the model built from config.json (1): model.paligemma_with_expert" in msg and "q_norm" in msg
    assert "missing tensors (model parameters the file does not provide) (2): " in msg
    assert "layers.1.self_attn.q_proj.weight" in msg and "state_proj.bias" in msg
    state2 = dict(state)
    k = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    state2[k] = state2[k][:-1]
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \(1\).*up_proj.weight: file \(63, 48\) vs model \(64, 48\)"
    ):
        Policy.load(write_lerobot(tmp_path / "shape", "pi0", state2, tokenizer=sp_model))


@pytest.mark.parametrize(
    "override,match",
    [
        ({"type": "pi0fast"}, "unsupported LeRobot policy type 'pi0fast'; accepted: pi0, pi05, smolvla, groot"),
        ({"paligemma_variant": "gemma_2b_lora"}, "unsupported paligemma_variant 'gemma_2b_lora'"),
        ({"use_relative_actions": True}, "unsupported variant use_relative_actions=True"),
        ({"type": "pi05"}, "says type 'pi05' but the expert norms are plain RMSNorm"),
        ({"image_resolution": [224, 224]}, r"resizes images to \[224, 224\] but the vision tower takes 28x28"),
        (
            {"type": "groot"},
            "missing tensor 'backbone.eagle_model.language_model.model.embed_tokens.weight', which "
            "every GR00T N1.5 checkpoint has",
        ),
    ],
)
def test_unsupported_variants_are_refused(tmp_path, sp_model, override, match):
    d = write_lerobot(tmp_path / "c", "pi0", planted_state("pi0"), tokenizer=sp_model, config_overrides=override)
    with pytest.raises(CheckpointError, match=match):
        Policy.load(d)


def test_missing_tokenizer_and_stats_are_named(tmp_path, sp_model, monkeypatch):
    monkeypatch.delenv("QUANTVLA_TOKENIZER", raising=False)
    d = write_lerobot(tmp_path / "c", "pi0", planted_state("pi0"))
    pol = Policy.load(d)  # inspecting needs no tokenizer ...
    assert pol.describe()["params"] if "params" in pol.describe() else True
    with pytest.raises(CheckpointError, match="no tokenizer.model found.*never downloaded"):
        pol.predict(Observation(frames(1), "go", np.zeros(ROBOT_STATE)))
    monkeypatch.setenv("QUANTVLA_TOKENIZER", str(sp_model))  # ... and the variable points at one
    assert Policy.load(d).predict(Observation(frames(1), "go", np.zeros(ROBOT_STATE))).actions.shape == (4, 4)
    for f in ("policy_preprocessor.json", "policy_postprocessor.json"):
        (d / f).unlink()
    with pytest.raises(CheckpointError, match="STATE uses mean_std normalisation but no statistics"):
        Policy.load(d)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model.safetensors").write_bytes(b"")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(CheckpointError, match="accepted formats: lerobot/pi0"):
        Policy.load(tmp_path / "x")


def test_cli_info_and_run_accept_lerobot_dirs(tmp_path, sp_model, capsys):
    import cv2

    from quantvla_core.cli import main

    d = write_lerobot(tmp_path / "c", "pi0", planted_state("pi0"), tokenizer=sp_model)
    assert main(["info", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "pi0" and info["total_params"] == sum(v.numel() for v in planted_state("pi0").values())
    cv2.imwrite(str(tmp_path / "cam.png"), frames(1)[0])
    assert (
        main(
            [
                "run",
                str(d),
                "--image",
                str(tmp_path / "cam.png"),
                "--instruction",
                "pick up the block",
                "--state",
                "0.1",
                "0.2",
                "0.3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"action chunk {HORIZON} x {ROBOT_ACTION}" in out


def test_policy_io_round_trips_into_a_derived_model_dir(tmp_path, sp_model):
    """A derived quantvla model dir (as a quantized artifact would be) keeps tokenizer and stats."""
    from quantvla_core.checkpoint import save_model_dir
    from quantvla_core.loaders import ExternalIO

    pol = Policy.load(write_lerobot(tmp_path / "c", "pi05", planted_state("pi05"), tokenizer=sp_model))
    out = tmp_path / "derived"
    save_model_dir(out, pol.config, pol.model.state_dict())
    pol.save_io(out)
    obs = Observation(frames(1), "push the button", np.array([0.2, -1.0, 1.0]))
    a = pol.predict(obs, seed=1).actions
    (tmp_path / "c" / "tokenizer.model").unlink()  # the derived dir carries its own copy
    back = Policy.load(out)
    assert isinstance(back.io, ExternalIO) and back.io.format == "lerobot/pi05"
    b = back.predict(obs, seed=1).actions
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert back.action_dim == ROBOT_ACTION and math.isfinite(float(a.sum()))
