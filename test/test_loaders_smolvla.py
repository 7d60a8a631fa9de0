"""SmolVLA: the reference model (cache path == joint path, masks, pixel shuffle) and the LeRobot
SmolVLA loader (planted values, tokenizer.json prompt, top-left padding, errors)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError
from quantvla_core.config import DecoderConfig, ModelConfig, VisionConfig
from quantvla_core.models import Batch, build_model, component_of
from quantvla_core.models.attention import attention_impl, logit_observer
from quantvla_core.models.smolvla import pixel_shuffle

VOCAB, HORIZON, STEPS = 300, 5, 3
ROBOT_STATE, ROBOT_ACTION, MAX_STATE, MAX_ACTION = 3, 4, 5, 6


def tiny_config():
    return ModelConfig(
        arch="smolvla",
        name="tiny-smolvla",
        vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=1, heads=1, mlp=64, pixel_shuffle=2),
        backbone=DecoderConfig(
            width=64, depth=4, mlp=96, heads=2, kv_heads=1, head_dim=64, vocab_size=VOCAB, act="silu"
        ),
        expert=DecoderConfig(width=48, depth=4, mlp=64, heads=2, kv_heads=1, head_dim=64, vocab_size=VOCAB, act="silu"),
        action_dim=MAX_ACTION,
        state_dim=MAX_STATE,
        horizon=HORIZON,
        num_steps=STEPS,
        max_cameras=2,
        max_text_tokens=16,
    )


def make_batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, c = cfg.vision.image_size, cfg.max_cameras
    image_mask = torch.ones(b, c, dtype=torch.bool)
    token_mask = torch.ones(b, 10, dtype=torch.bool)
    if b > 1:  # second sample: one camera absent and a shorter instruction
        image_mask[1, -1] = False
        token_mask[1, 6:] = False
    return Batch(
        torch.rand(b, c, 3, s, s, generator=g) * 2 - 1,
        image_mask,
        torch.randint(3, VOCAB, (b, 10), generator=g),
        token_mask,
        torch.randn(b, cfg.state_dim, generator=g),
    )


@pytest.fixture(scope="module")
def model():
    m = build_model(tiny_config(), seed=0)
    with torch.no_grad():  # non-trivial norms so that a wrong offset convention would show
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def test_pixel_shuffle_matches_idefics3_order():
    f, side, d = 2, 4, 3
    x = torch.randn(1, side * side, d)
    out = pixel_shuffle(x, f)
    assert out.shape == (1, 4, d * f * f)
    for i in range(side // f):
        for j in range(side // f):
            for dh in range(f):
                for dw in range(f):
                    src = x[0, (i * f + dh) * side + (j * f + dw)]
                    dst = out[0, i * (side // f) + j, dh * d * f + dw * d : dh * d * f + dw * d + d]
                    assert torch.equal(src, dst)


def test_cache_path_equals_joint_path(model):
    cfg = model.cfg
    batch = make_batch(cfg)
    x_t = torch.randn(2, HORIZON, MAX_ACTION)
    t = torch.tensor([0.8, 0.2])
    with torch.no_grad():
        joint = model.velocity_joint(batch, x_t, t)
        cached = model.denoise_step(model.encode_prefix(batch, model.encode_images(batch)), x_t, t, batch.state)
        other = make_batch(cfg, seed=4)
        moved = model.denoise_step(model.encode_prefix(other, model.encode_images(other)), x_t, t, other.state)
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-5)
    assert (moved - cached).abs().max() > 1e-3


def test_masks_state_token_and_causal_actions(model):
    cfg = model.cfg
    batch = make_batch(cfg, b=1)
    x_t = torch.randn(1, HORIZON, MAX_ACTION)
    t = torch.tensor([0.5])
    with torch.no_grad():
        cache = model.encode_prefix(batch, model.encode_images(batch))
        base = model.denoise_step(cache, x_t, t, batch.state)
        moved_state = Batch(batch.images, batch.image_mask, batch.tokens, batch.token_mask, batch.state + 1.0)
        cache2 = model.encode_prefix(moved_state, model.encode_images(moved_state))
        x2 = x_t.clone()
        x2[:, -1] += 1.0
        late = model.denoise_step(cache, x2, t, batch.state)
    # images and text never attend to the state token: their K at the last layer is unchanged
    k1, k2 = cache.kv[-1][0], cache2.kv[-1][0]
    assert torch.equal(k1[:, :, :-1], k2[:, :, :-1]) and not torch.equal(k1[:, :, -1], k2[:, :, -1])
    # actions are causal: changing the last action moves only the last velocity
    torch.testing.assert_close(late[:, :-1], base[:, :-1])
    assert (late[:, -1] - base[:, -1]).abs().max() > 1e-4


def test_eager_equals_sdpa_and_cross_layers_see_prefix_only(model):
    cfg = model.cfg
    batch = make_batch(cfg)
    noise = model.sample_noise(2, torch.Generator().manual_seed(3))
    with attention_impl("sdpa"):
        a = model.sample_actions(batch, noise)
    with attention_impl("eager"):
        b = model.sample_actions(batch, noise)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    seen = {}
    with logit_observer(lambda name, logits, mask: seen.setdefault(name, logits.shape)):
        model.sample_actions(batch, noise)
    prefix = cfg.max_cameras * cfg.num_image_tokens + 10 + 1
    assert seen["vlm_with_expert.lm_expert.layers.0.self_attn"][-1] == prefix + HORIZON
    assert seen["vlm_with_expert.lm_expert.layers.1.self_attn"][-1] == prefix


def test_flow_loss_backpropagates_and_components(model):
    m = build_model(tiny_config(), seed=1).train()
    loss = m.flow_loss(make_batch(m.cfg), torch.randn(2, HORIZON, MAX_ACTION))
    loss.backward()
    assert m.action_out_proj.weight.grad.abs().sum() > 0
    assert m.vlm_with_expert.vlm.model.connector.modality_projection.proj.weight.grad.abs().sum() > 0
    assert component_of("vlm_with_expert.lm_expert.layers.0.mlp.up_proj.weight") == "expert"
    assert component_of("vlm_with_expert.vlm.model.text_model.layers.0.mlp.up_proj.weight") == "backbone"


# -- loader ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["pick up the red cube\n", "place it in the box\n", "open the drawer\n"] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def write_smolvla(directory, state, tokenizer=None, overrides=None, extra=None):
    directory.mkdir(parents=True)
    tensors = {"model." + k: v for k, v in state.items()}
    tensors["model.vlm_with_expert.vlm.lm_head.weight"] = torch.randn(VOCAB, 64)
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    cfg = {
        "type": "smolvla",
        "n_obs_steps": 1,
        "chunk_size": HORIZON,
        "n_action_steps": HORIZON,
        "max_state_dim": MAX_STATE,
        "max_action_dim": MAX_ACTION,
        "resize_imgs_with_padding": [32, 32],
        "empty_cameras": 0,
        "tokenizer_max_length": 16,
        "num_steps": STEPS,
        "attention_mode": "cross_attn",
        "self_attn_every_n_layers": 2,
        "num_vlm_layers": 4,
        "num_expert_layers": -1,
        "expert_width_multiplier": 0.75,
        "add_image_special_tokens": False,
        "prefix_length": -1,
        "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MIN_MAX"},
        "input_features": {
            "observation.images.top": {"type": "VISUAL", "shape": [3, 480, 640]},
            "observation.images.wrist": {"type": "VISUAL", "shape": [3, 480, 640]},
            "observation.state": {"type": "STATE", "shape": [ROBOT_STATE]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [ROBOT_ACTION]}},
    }
    cfg.update(overrides or {})
    (directory / "config.json").write_text(json.dumps(cfg))
    stats = {
        "observation.state.mean": np.array([1, 2, 3], np.float32),
        "observation.state.std": np.array([2, 2, 2], np.float32),
        "action.min": np.array([-1, 0, 0, 5], np.float32),
        "action.max": np.array([1, 2, 4, 5], np.float32),
    }
    save_numpy(stats, str(directory / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    step = {"eps": 1e-8, "norm_map": cfg["normalization_mapping"], "features": {}}
    (directory / "policy_preprocessor.json").write_text(
        json.dumps(
            {
                "name": "policy_preprocessor",
                "steps": [
                    {
                        "registry_name": "normalizer_processor",
                        "config": step,
                        "state_file": "policy_preprocessor_step_5_normalizer_processor.safetensors",
                    }
                ],
            }
        )
    )
    if tokenizer is not None:
        (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


def planted():
    g = torch.Generator().manual_seed(7)
    return {
        k: torch.randn(v.shape, generator=g) * 0.05
        for k, v in build_model(tiny_config(), device="meta").state_dict().items()
    }


def test_lerobot_smolvla_planted_values_prompt_and_forward(tmp_path, tokenizer_json):
    from tokenizers import Tokenizer

    state = planted()
    pol = Policy.load(write_smolvla(tmp_path / "s", state, tokenizer_json))
    assert pol.config.arch == "smolvla" and pol.config.vision.pixel_shuffle == 2
    loaded = pol.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    tok = Tokenizer.from_file(str(tokenizer_json))
    obs = Observation([np.full((16, 32, 3), 255, np.uint8)], "pick up the red cube", np.array([3.0, 2.0, 1.0]))
    batch = pol.preprocess(obs)
    ids = batch.tokens[0][batch.token_mask[0]].tolist()
    assert ids == tok.encode("pick up the red cube\n").ids
    # SmolVLA pads on the top and left: a 16 x 32 image fills the bottom half
    img = batch.images[0, 0, 0].numpy()
    assert (img[:16] == -1).all() and np.allclose(img[16:], 1.0)
    np.testing.assert_allclose(batch.state[0].numpy(), [1.0, 0.0, -1.0, 0.0, 0.0], rtol=1e-6)
    chunk = pol.predict(obs, seed=0)
    assert chunk.actions.shape == (HORIZON, ROBOT_ACTION) and np.all(np.isfinite(chunk.actions))
    # min-max unnormalisation, and lo == hi uses eps: zero velocity from zero noise -> the midpoint
    with torch.no_grad():
        pol.model.action_out_proj.weight.zero_()
        pol.model.action_out_proj.bias.zero_()
    mid = pol.predict(obs, noise=torch.zeros(1, HORIZON, MAX_ACTION)).actions
    np.testing.assert_allclose(mid[0], [0.0, 1.0, 2.0, 5.0 + 0.5e-8], rtol=1e-6)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"attention_mode": "self_attn"}, "unsupported variant attention_mode='self_attn'"),
        ({"self_attn_every_n_layers": 3}, "unsupported variant self_attn_every_n_layers=3"),
        ({"add_image_special_tokens": True}, "unsupported variant add_image_special_tokens=True"),
        ({"num_vlm_layers": 16}, "num_vlm_layers=16 but the file has 4 backbone layers"),
    ],
)
def test_smolvla_variants_refused(tmp_path, override, match):
    with pytest.raises(CheckpointError, match=match):
        Policy.load(write_smolvla(tmp_path / "s", planted(), overrides=override))


def test_smolvla_unknown_keys_are_named_with_file_names(tmp_path):
    extra = {
        "model.vlm_with_expert.vlm.model.text_model.layers.0.self_attn.q_norm.weight": torch.ones(64),
        "model.vlm_with_expert.vlm.model.text_model.rotary_emb.inv_freq": torch.ones(32),
    }
    with pytest.raises(
        CheckpointError,
        match=r"unknown keys .*\(1\): model\.vlm_with_expert\.vlm\.model\.text_model"
        r"\.rotary_emb\.inv_freq \| keys with no place .*layers\.0\.self_attn\.q_norm",
    ):
        Policy.load(write_smolvla(tmp_path / "s", planted(), extra=extra))
