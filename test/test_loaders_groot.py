"""LeRobot GR00T N1.5 directories: planted values in the real `_groot_model.` layout, GR00T's
min-max convention, the str([task]) prompt, the N1.5 numerics swapped into the model, errors."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from quantvla_core import Observation, Policy
from quantvla_core.checkpoint import CheckpointError
from quantvla_core.config import DecoderConfig, DiTConfig, ModelConfig, VisionConfig
from quantvla_core.loaders.groot import GR00TN15Model, diffusers_timesteps

VOCAB, HORIZON, STEPS = 300, 4, 4
ROBOT_STATE, ROBOT_ACTION, MAX_STATE, MAX_ACTION = 3, 4, 6, 5


def tiny_config():
    return ModelConfig(
        arch="groot",
        name="tiny-n15",
        vision=VisionConfig(image_size=28, patch_size=7, width=144, depth=1, heads=2, mlp=64, pixel_shuffle=2),
        backbone=DecoderConfig(
            width=64, depth=2, mlp=96, heads=4, kv_heads=2, head_dim=16, vocab_size=VOCAB, rope_theta=1e6, act="silu"
        ),
        dit=DiTConfig(
            width=96,
            depth=2,
            heads=2,
            head_dim=48,
            mlp=128,
            vl_self_attention_depth=1,
            num_future_tokens=3,
            num_embodiments=32,
            hidden=40,
        ),
        action_dim=MAX_ACTION,
        state_dim=MAX_STATE,
        horizon=HORIZON,
        num_steps=STEPS,
        max_cameras=1,
        max_text_tokens=64,
    )


def planted():
    g = torch.Generator().manual_seed(11)
    with torch.device("meta"):
        m = GR00TN15Model(tiny_config(), embodiment_id=31)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in m.state_dict().items()}


EAGLE_SPECIAL = ["<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>", "<img>", "</img>"]  # Qwen3 / Eagle added tokens


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=EAGLE_SPECIAL + ["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [
            "['pick up the apple']",
            "['place the cup on the plate']",
            "system\nYou are a helpful assistant.",
            "user\n<image 1>",
            "<image 2>",
            "assistant\n",
        ]
        * 20,
        trainer,
    )
    path = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
    tok.save(str(path))
    return path


STATS = {
    "observation.state.min": np.array([0, -1, 2], np.float32),
    "observation.state.max": np.array([2, 1, 2], np.float32),
    "action.min": np.array([-1, 0, 3, 0], np.float32),
    "action.max": np.array([1, 4, 3, 10], np.float32),
}


def write_groot(directory, state, tokenizer=None, overrides=None, extra=None, tag="new_embodiment"):
    directory.mkdir(parents=True)
    tensors = {"_groot_model." + k: v for k, v in state.items()}
    tensors["_groot_model.backbone.eagle_model.language_model.lm_head.weight"] = torch.randn(VOCAB, 64)
    # SiglipVisionModel's pooling head (vision_use_head) is saved but never used by Eagle
    tensors["_groot_model.backbone.eagle_model.vision_model.vision_model.head.probe"] = torch.randn(1, 1, 144)
    tensors["_groot_model.backbone.eagle_model.vision_model.vision_model.head.mlp.fc1.weight"] = torch.randn(64, 144)
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    cfg = {
        "type": "groot",
        "n_obs_steps": 1,
        "chunk_size": HORIZON,
        "n_action_steps": HORIZON,
        "max_state_dim": MAX_STATE,
        "max_action_dim": MAX_ACTION,
        "embodiment_tag": tag,
        "base_model_path": "nvidia/GR00T-N1.5-3B",
        "image_size": [224, 224],
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "input_features": {
            "observation.images.front": {"type": "VISUAL", "shape": [3, 480, 640]},
            "observation.state": {"type": "STATE", "shape": [ROBOT_STATE]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [ROBOT_ACTION]}},
    }
    cfg.update(overrides or {})
    (directory / "config.json").write_text(json.dumps(cfg))
    save_numpy(STATS, str(directory / "policy_preprocessor_step_2_groot_pack_inputs_v3.safetensors"))
    save_numpy(
        {k: v for k, v in STATS.items() if k.startswith("action")},
        str(directory / "policy_postprocessor_step_0_groot_action_unpack_unnormalize_v1.safetensors"),
    )
    (directory / "policy_preprocessor.json").write_text(
        json.dumps(
            {
                "name": "policy_preprocessor",
                "steps": [
                    {
                        "registry_name": "groot_pack_inputs_v3",
                        "config": {"max_state_dim": MAX_STATE, "embodiment_tag": tag, "normalize_min_max": True},
                        "state_file": "policy_preprocessor_step_2_groot_pack_inputs_v3.safetensors",
                    },
                    {"registry_name": "groot_eagle_encode_v3", "config": {}},
                ],
            }
        )
    )
    (directory / "policy_postprocessor.json").write_text(
        json.dumps(
            {
                "name": "policy_postprocessor",
                "steps": [
                    {
                        "registry_name": "groot_action_unpack_unnormalize_v1",
                        "config": {"env_action_dim": ROBOT_ACTION, "normalize_min_max": True},
                        "state_file": "policy_postprocessor_step_0_groot_action_unpack_unnormalize_v1.safetensors",
                    }
                ],
            }
        )
    )
    if tokenizer is not None:
        (directory / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return directory


def test_groot_planted_values_prompt_normalisation_and_forward(tmp_path, tokenizer_json):
    from tokenizers import Tokenizer

    state = planted()
    pol = Policy.load(write_groot(tmp_path / "g", state, tokenizer_json))
    assert pol.describe()["format"] == "lerobot/groot" and isinstance(pol.model, GR00TN15Model)
    loaded = pol.model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert pol.model.embodiment_id == 31 and pol.config.vision.pixel_shuffle == 2
    assert pol.config.num_image_tokens == 4 and pol.config.backbone.head_dim == 16
    obs = Observation([np.zeros((20, 30, 3), np.uint8)], "pick up the apple", np.array([1.0, 0.5, 7.0]))
    batch = pol.preprocess(obs)
    ids = batch.tokens[0][batch.token_mask[0]].tolist()
    # the whole templated prompt, its <IMG_CONTEXT> run written as the model's placeholder id
    ref = Tokenizer.from_file(str(tokenizer_json))
    img = ref.token_to_id("<IMG_CONTEXT>")
    want = [151669 if i == img else i for i in eagle_reference_ids(ref, "pick up the apple", 1, 4, True)]
    assert pol.config.image_token_id == 151669 and ids == want and ids.count(151669) == 4
    assert pol.config.max_text_tokens == 128 + 1 * 4  # the prompt budget + one camera's placeholders
    # Eagle image processor: a 20x30 frame stretched to the 28 px vision resolution, mean/std 0.5
    np.testing.assert_allclose(batch.images[0, 0].numpy(), -np.ones((3, 28, 28)), atol=1e-6)
    # GR00T min-max: constant dimension (min == max) -> 0
    np.testing.assert_allclose(batch.state[0].numpy(), [0.0, 0.5, 0.0, 0, 0, 0], atol=1e-6)
    chunk = pol.predict(obs, seed=0)
    assert chunk.actions.shape == (HORIZON, ROBOT_ACTION) and np.all(np.isfinite(chunk.actions))
    # constant velocity b from zero noise, t: 0 -> 1 in 4 steps: normalised actions = +b
    b = np.array([0.5, -0.5, 0.3, 1.0, 9.0], np.float32)
    dec = pol.model.action_head.action_decoder.layer2
    with torch.no_grad():
        dec.W.zero_()
        dec.b[31] = torch.as_tensor(b)
    acts = pol.predict(obs, noise=torch.zeros(1, HORIZON, MAX_ACTION)).actions
    lo, hi = STATS["action.min"], STATS["action.max"]
    want = np.where(hi != lo, (b[:4] + 1) / 2 * (hi - lo) + lo, lo)
    np.testing.assert_allclose(acts, np.tile(want, (HORIZON, 1)), rtol=1e-5, atol=1e-5)


def eagle_reference_ids(tok, task, n_images, per_image, with_images):
    """Eagle 2.5's templated prompt for GR00T, written out segment by segment (added tokens by id,
    the plain text between them encoded on its own, which is how a tokenizer splits at added tokens)."""
    sp = {t: tok.token_to_id(t) for t in EAGLE_SPECIAL}
    ids = [sp["<|im_start|>"]] + tok.encode("system\nYou are a helpful assistant.").ids + [sp["<|im_end|>"]]
    ids += tok.encode("\n").ids + [sp["<|im_start|>"]]
    for k in range(n_images):
        ids += tok.encode(("user\n" if k == 0 else "") + f"<image {k + 1}>").ids + [sp["<img>"]]
        ids += [sp["<IMG_CONTEXT>"]] * (per_image if with_images else 0) + [sp["</img>"]]
    ids += tok.encode(str([task])).ids + [sp["<|im_end|>"]] + tok.encode("\n").ids + [sp["<|im_start|>"]]
    return ids + tok.encode("assistant\n").ids


def test_eagle_prompt_layout_matches_the_chat_template(tokenizer_json):
    from tokenizers import Tokenizer
    from quantvla_core.loaders.text import eagle_layout, eagle_prompt, open_tokenizer, prompt_ids

    tok, ref = open_tokenizer(tokenizer_json), Tokenizer.from_file(str(tokenizer_json))
    text = eagle_prompt("place the cup", 2, 3)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image 1><img>"
        + "<IMG_CONTEXT>" * 3
        + "</img><image 2><img>"
        + "<IMG_CONTEXT>" * 3
        + "</img>['place the cup']<|im_end|>\n<|im_start|>assistant\n"
    )
    full, slots = eagle_layout(tok, "place the cup", 2, 64)
    assert full == eagle_reference_ids(ref, "place the cup", 2, 64, True)
    img, start, end = (ref.token_to_id(t) for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
    assert len(slots) == 128 and all(full[i] == img for i in slots)
    runs = [slots[:64], slots[64:]]  # each camera's 64 tokens contiguous, between <img> and </img>
    for r in runs:
        assert r == list(range(r[0], r[0] + 64)) and full[r[0] - 1] == start and full[r[-1] + 1] == end
    ours = prompt_ids("groot-eagle", tok, "place the cup", None, n_images=2, tokens_per_image=64)
    assert ours == eagle_reference_ids(ref, "place the cup", 2, 64, False) and img not in ours


def _bicubic_aa_matrix(n_in, n_out):
    """Antialiased bicubic resampling weights (a = -0.5, support scaled by the shrink factor,
    pixel centres at i + 0.5, normalised per output pixel), written out in numpy."""

    def cubic(x):
        x = np.abs(x)
        a = -0.5
        return np.where(
            x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0)
        )

    scale = n_in / n_out
    s = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * s + 0.5), 0), min(int(centre + 2 * s + 0.5), n_in)
        j = np.arange(lo, hi)
        w = cubic((j - centre + 0.5) / s)
        m[i, lo:hi] = w / w.sum()
    return m


@pytest.mark.parametrize("hw", [(48, 80), (17, 11), (224, 224)])
def test_eagle_image_processor_matches_a_numpy_reference(hw):
    from quantvla_core.loaders.imaging import eagle_image

    rng = np.random.default_rng(hw[0])
    img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    got = eagle_image(img, 32 if hw != (224, 224) else 224)
    size = got.shape[-1]
    x = img.astype(np.float64)
    if hw != (size, size):
        rows, cols = _bicubic_aa_matrix(hw[0], size), _bicubic_aa_matrix(hw[1], size)
        x = np.clip(np.round(np.einsum("ij,jkc,lk->ilc", rows, x, cols)), 0, 255)
    want = ((x / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    assert got.shape == (3, size, size) and got.min() >= -1 and got.max() <= 1
    diff = np.abs(got - want)
    # the same uint8 value almost everywhere; a float tie may round the other way (one level = 2/255)
    assert diff.max() <= 2 / 255 + 1e-6 and (diff > 1e-6).mean() < 0.01
    if hw == (224, 224):
        assert diff.max() < 1e-6  # already at the tile size: no resampling, only rescale / normalise


def test_n15_numerics():
    e = diffusers_timesteps(torch.tensor([0.0, 1.0]), 256)
    assert torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    # downscale_freq_shift = 1: the lowest frequency is exactly 1e-4, the highest 1 (cos first)
    assert math.isclose(e[1, 127].item(), math.cos(1e-4), rel_tol=1e-7)
    assert math.isclose(e[1, 0].item(), math.cos(1.0), rel_tol=1e-6)
    assert math.isclose(e[1, 128].item(), math.sin(1.0), rel_tol=1e-6)
    # the cache path still equals the joint path with the swapped modules
    from test_models import make_batch

    torch.manual_seed(0)
    m = GR00TN15Model(tiny_config(), embodiment_id=3).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = make_batch(m.cfg, b=2)
    x_t, t = torch.randn(2, HORIZON, MAX_ACTION), torch.tensor([0.25, 0.75])
    with torch.no_grad():
        joint = m.velocity_joint(batch, x_t, t)
        cached = m.denoise_step(m.encode_prefix(batch, m.encode_images(batch)), x_t, t, batch.state)
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kind,match",
    [
        ("eagle_linear", "unsupported variant: backbone.eagle_linear"),
        ("tag", "unknown embodiment_tag 'mars_rover'"),
        ("no_qnorm", "missing tensor 'backbone.eagle_model.language_model.model.layers.0.self_attn.q_norm.weight'"),
    ],
)
def test_groot_errors(tmp_path, kind, match):
    state = planted()
    extra, tag = None, "new_embodiment"
    if kind == "eagle_linear":
        extra = {"_groot_model.backbone.eagle_linear.weight": torch.ones(96, 64)}
    elif kind == "tag":
        tag = "mars_rover"
    else:
        state.pop("backbone.eagle_model.language_model.model.layers.0.self_attn.q_norm.weight")
    with pytest.raises(CheckpointError, match=match):
        Policy.load(write_groot(tmp_path / "g", state, extra=extra, tag=tag))


def test_n15_variant_and_embodiment_are_part_of_the_config():
    from quantvla_core.models import GR00TModel, build_model

    cfg = tiny_config()
    ref, n15 = (
        build_model(cfg, device="meta"),
        build_model(ModelConfig.from_dict({**cfg.to_dict(), "variant": "n15"}), device="meta"),
    )
    assert type(ref) is GR00TModel and isinstance(n15, GR00TN15Model)
    assert set(n15.state_dict()) - set(ref.state_dict()) == {
        f"backbone.eagle_model.language_model.model.layers.{i}.self_attn.{n}_norm.weight" for i in (0, 1) for n in "qk"
    } | {
        "action_head.vl_self_attention.transformer_blocks.0.norm3.weight",
        "action_head.vl_self_attention.transformer_blocks.0.norm3.bias",
    }
    assert GR00TN15Model(cfg, embodiment_id=5).cfg.dit.embodiment_id == 5  # the override is recorded
    for bad, match in (
        (dict(variant="n16"), "variant 'n16' does not exist for arch 'groot'; accepted: '', 'n15'"),
        (dict(arch="pi0", variant="n15", expert=cfg.backbone), "accepted: ''$"),
        (dict(dit={**cfg.to_dict()["dit"], "embodiment_id": 32}), r"embodiment_id must be .*\[0, 32\)"),
        (dict(dit={**cfg.to_dict()["dit"], "tag": 1}), "unexpected keyword argument 'tag'"),
    ):
        d = {**cfg.to_dict(), **{k: (v.__dict__ if k == "expert" else v) for k, v in bad.items()}}
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_dict(d)


def test_saved_and_quantized_n15_policies_reload_as_n15(tmp_path, tokenizer_json):
    """A model dir and a w8a8 artifact of a real GR00T checkpoint rebuild the N1.5 model from
    config.json alone (variant + embodiment), so they predict what the in-memory policies do."""
    from quantvla_core.checkpoint import read_config, save_model_dir
    from quantvla_core.loaders import ExternalIO
    from quantvla_core.quant.quantize import QuantConfig, quantize
    from quantvla_core.quant.qlinear import QuantLinear

    pol = Policy.load(write_groot(tmp_path / "g", planted(), tokenizer_json))
    assert pol.config.variant == "n15" and pol.config.dit.embodiment_id == 31 and pol.config.image_token_id == 151669
    obs = Observation([np.full((20, 30, 3), 90, np.uint8)], "pick up the apple", np.array([1.0, 0.5, 2.0]))
    fp = pol.predict(obs, seed=3).actions

    saved = tmp_path / "fp"
    save_model_dir(saved, pol.config, pol.model.state_dict())
    pol.save_io(saved)
    back = Policy.load(saved)
    assert isinstance(back.io, ExternalIO) and isinstance(back.model, GR00TN15Model)
    assert back.model.embodiment_id == 31 and back.config == pol.config
    # Same weights, same inputs; BLAS may pick another summation order for the reloaded
    # (contiguous) tensors, hence fp32 rounding and not bit equality.
    np.testing.assert_allclose(back.predict(obs, seed=3).actions, fp, rtol=1e-5, atol=1e-5)

    res = quantize(pol, QuantConfig(scheme="w8a8"), calib="synthetic:6", progress=False)
    want = res.policy.predict(obs, seed=3).actions
    res.save(tmp_path / "q")
    assert read_config(tmp_path / "q").variant == "n15"
    assert read_config(saved).image_token_id == read_config(tmp_path / "q").image_token_id == 151669
    q = Policy.load(tmp_path / "q")
    assert isinstance(q.io, ExternalIO) and isinstance(q.model, GR00TN15Model) and q.scheme == "w8a8"
    assert q.model.embodiment_id == 31
    assert sum(isinstance(m, QuantLinear) for m in q.model.modules()) == len(res.meta["modules"]) > 0
    got = q.predict(obs, seed=3).actions
    assert got.shape == (HORIZON, ROBOT_ACTION) and not np.array_equal(got, fp)  # really quantized
    # A 1-ulp difference in a layer input can flip one activation code, so allow that much.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_groot_n15_preset_has_the_real_structure_and_size():
    """preset('groot-n15') builds GR00T N1.5-3B on the meta device: every used tensor of the real
    checkpoint, counted here from the published shapes (not from our modules), and 64 tokens per
    224 px image after Eagle's pixel shuffle."""
    from quantvla_core.config import preset
    from quantvla_core.models import build_model, component_of

    cfg = preset("groot-n15")
    assert cfg.variant == "n15" and cfg.num_image_tokens == 64 and cfg.vision.pixel_shuffle == 2
    assert (cfg.state_dim, cfg.action_dim, cfg.horizon, cfg.num_steps) == (64, 32, 16, 4)
    # images first (synthetic prompts have no placeholders); the LLM reads 256 tokens, as for a
    # 3-camera Eagle prompt with a short task
    assert cfg.image_token_id is None and cfg.max_cameras * cfg.num_image_tokens + cfg.max_text_tokens == 256
    model = build_model(cfg, device="meta")
    assert isinstance(model, GR00TN15Model) and all(p.is_meta for p in model.parameters())
    got = {c: 0 for c in ("vision", "backbone", "expert")}
    for n, p in model.named_parameters():
        got[component_of(n)] += p.numel()

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    v, vm = 1152, 4304  # SigLIP2 So400m/14 at 224 px, 27 layers; Eagle mlp1 on 2x2-shuffled patches
    vision = (
        lin(3 * 14 * 14, v)
        + 256 * v
        + 27 * (4 * v + 4 * lin(v, v) + lin(v, vm) + lin(vm, v))
        + 2 * v
        + 2 * 4 * v
        + lin(4 * v, 2048)
        + lin(2048, 2048)
    )
    w, kv, m = 2048, 8 * 128, 6144  # Qwen3-1.7B: 12 of 28 layers kept, tied lm_head not used
    backbone = 151936 * w + 12 * (2 * w + 2 * 128 + lin(w, w, 0) * 2 + lin(w, kv, 0) * 2 + 3 * lin(w, m, 0)) + w
    d, e = 1536, 32  # DiT 32 x 48, 16 blocks (even ones cross-attend to the 2048-wide VL tokens)
    dit = lin(256, d) + lin(d, d) + lin(d, 2 * d) + lin(d, 1024)
    for i in range(16):
        ctx = w if i % 2 == 0 else d
        dit += lin(d, 2 * d) + lin(d, d) + 2 * lin(ctx, d) + lin(d, d) + lin(d, 4 * d) + lin(4 * d, d)
    vlsa = 4 * (4 * w + 4 * lin(w, w) + lin(w, 4 * w) + lin(4 * w, w))  # vl_self_attention: 32 x 64 heads
    heads = (
        e * (lin(64, 1024) + lin(1024, d))  # state encoder (max_state_dim 64)
        + e * (lin(32, d) + lin(2 * d, d) + lin(d, d))  # action encoder W1..W3
        + e * (lin(1024, 1024) + lin(1024, 32))  # action decoder
        + 1024 * d
        + 32 * d
        + 2 * w
    )  # position embedding, future tokens, vlln
    assert got == {"vision": vision, "backbone": backbone, "expert": dit + vlsa + heads}
    total = sum(got.values())
    assert 2.40e9 < total < 2.42e9  # + the unused tied lm_head (311M) = the ~2.7B tensors of the file


def _bf16_pair(offset: float = 0.0, seed: int = 0):
    """A tiny N1.5 model with bf16-representable weights (so fp32 and bf16 runs share them) and
    the fp32 / bf16 inputs of one batch. `offset` plants a large component in the residual
    streams (token, future-token and position embeddings), as real transformers carry."""
    import copy

    from test_models import make_batch

    torch.manual_seed(seed)
    m = GR00TN15Model(tiny_config(), embodiment_id=3).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for emb in (
            m.action_head.future_tokens,
            m.action_head.position_embedding,
            m.backbone.eagle_model.language_model.model.embed_tokens,
        ):
            emb.weight += offset
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
    batch = make_batch(m.cfg, b=4, seed=seed)
    batch.images, batch.state = batch.images.bfloat16().float(), batch.state.bfloat16().float()
    low = copy.deepcopy(batch)
    low.images, low.state = batch.images.bfloat16(), batch.state.bfloat16()
    return m, copy.deepcopy(m).to(torch.bfloat16), batch, low, torch.randn(4, HORIZON, MAX_ACTION, generator=g)


def test_n15_fp32_islands_are_the_plain_maths_in_fp32():
    """The island code path, forced on in fp32, computes exactly what the plain path does (so the
    islands change rounding only); in fp32 the switch is inert."""
    m, _, batch, _, noise = _bf16_pair()
    assert not m.islands_active()
    x_t, t = torch.randn(4, HORIZON, MAX_ACTION), torch.tensor([0.0, 0.25, 0.5, 0.75])
    with torch.no_grad():
        plain = m.sample_actions(batch, noise)
        plain_v = m.velocity_joint(batch, x_t, t)
        m.islands_active = lambda: True
        forced = m.sample_actions(batch, noise)
        forced_v = m.velocity_joint(batch, x_t, t)
        cached_v = m.denoise_step(m.encode_prefix(batch, m.encode_images(batch)), x_t, t, batch.state)
    torch.testing.assert_close(forced, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(forced_v, plain_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached_v, forced_v, rtol=1e-5, atol=1e-6)


# offset 0: the actions' errors are alike with and without islands (the plain path's
# embodiment linears add their bias inside the bf16 GEMM, one rounding): within 5%
@pytest.mark.parametrize("offset,action_ratio", [(0.0, 1.05), (4.0, 0.25)])
def test_n15_bf16_with_fp32_islands_is_closer_to_fp32(offset, action_ratio):
    """bf16 weights, same weights in fp32 as the reference: with the islands (fp32 norms,
    modulation and residual streams, as the originals' autocast runs) the VL features and the
    integrated actions are closer to the fp32 run than with everything rounded to bf16."""
    m, mb, batch, low, noise = _bf16_pair(offset)
    assert mb.islands_active()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    err = {}
    with torch.no_grad():
        vl = m._vl_features(batch, m.encode_images(batch))[0]
        ref = m.sample_actions(batch, noise) - noise
        for islands in (True, False):
            mb.fp32_islands = islands
            vlb, valid = mb._vl_features(low, mb.encode_images(low))
            assert vlb.dtype == (torch.float32 if islands else torch.bfloat16)
            err[islands] = (rel(vlb[valid], vl[valid]), rel(mb.sample_actions(low, noise) - noise, ref))
    assert err[True][0] < 0.7 * err[False][0], err
    assert err[True][1] < action_ratio * err[False][1], err
    assert err[True][1] < 5e-3, err


def test_n15_islands_prepare_the_time_conditions_once_per_chunk():
    """The bf16 fp32-island path uses the chunk's batched time conditioning (timestep encoder,
    adaLN and proj_out_1 modulations for every step in one pass, in the compute dtype) like the
    plain path: one call per chunk instead of one per step, the same actions as per step."""
    _, mb, _, low, noise = _bf16_pair()
    assert mb.islands_active()
    steps = mb.cfg.num_steps
    real = mb._time_condition
    calls = []
    mb._time_condition = lambda t, dtype: calls.append((t.shape[0], dtype)) or real(t, dtype)
    with torch.no_grad():
        prepared = mb.sample_actions(low, noise)
        assert calls == [(4 * steps, torch.bfloat16)]
        calls.clear()
        cache = mb.encode_prefix(low, mb.encode_images(low))  # no prepare_steps: per step
        x, dt = noise.float(), mb.step_size(steps)
        for t in mb.time_grid(steps):
            x = mb.euler_step(cache, x, torch.full((4,), t), dt, low.state)
        assert calls == [(4, torch.bfloat16)] * steps
    torch.testing.assert_close(prepared, x, rtol=0, atol=1e-3 * float(x.abs().max()))


# ---- image tokens placed inside the prompt (config image_token_id), against a hand-built sequence ----
IMG_ID = 250  # a real vocabulary id: the model must not read its embedding row


def placed_config(**kw):
    import dataclasses

    return dataclasses.replace(
        tiny_config(), variant="n15", image_token_id=IMG_ID, max_cameras=2, max_text_tokens=40, **kw
    )


def placed_batch(cfg, seed=0):
    """Row 0: both cameras; row 1: camera 0 absent (so its one run takes camera 1) and padding."""
    from quantvla_core.models import Batch

    g = torch.Generator().manual_seed(seed)
    per = cfg.num_image_tokens

    def run(k):
        return [20 + k, 21] + [IMG_ID] * per + [22]

    rows = [[1, 2, 3, 4] + run(0) + run(1) + [30, 31, 32], [1, 2, 3, 4] + run(0) + [33, 34]]
    tokens = torch.zeros(2, cfg.max_text_tokens, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    s = cfg.vision.image_size
    return Batch(
        torch.rand(2, 2, 3, s, s, generator=g) * 2 - 1,
        torch.tensor([[True, True], [False, True]]),
        tokens,
        mask,
        torch.randn(2, MAX_STATE, generator=g),
    )


def _random_n15(cfg, seed=0):
    torch.manual_seed(seed)
    m = GR00TN15Model(cfg, embodiment_id=3).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def reference_velocity(m, batch, x_t, t):
    """Row by row, padding dropped: the embedded prompt with each placeholder replaced by hand, in
    order, by the next image token of the present cameras; then the same layers as the original
    (causal Qwen3 over positions 0..n-1, final norm, vlln, vl_self_attention, DiT)."""
    from quantvla_core.models.groot import DiTCache

    lm = m.backbone.eagle_model.language_model.model
    feats = m.encode_images(batch)
    per = m.cfg.num_image_tokens
    out = []
    for b in range(batch.tokens.shape[0]):
        present = [c for c in range(batch.image_mask.shape[1]) if batch.image_mask[b, c]]
        images = [feats[b, c * per + j] for c in present for j in range(per)]
        seq = []
        for tok in batch.tokens[b][batch.token_mask[b]].tolist():
            seq.append(images.pop(0) if tok == IMG_ID else lm.embed_tokens.weight[tok])
        assert not images
        x = torch.stack(seq)[None]
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        vl = m.action_head.vlln(lm.final_norm(lm(x, torch.arange(n)[None], causal), None))
        for blk in m.action_head.vl_self_attention.transformer_blocks:
            vl = blk(vl)
        state = m.action_head.state_encoder(batch.state[b : b + 1, None], m._cat(1, vl.device))
        cache = DiTCache(vl=vl, valid=torch.ones(1, n, dtype=torch.bool), cross_kv={}, state_tokens=state)
        out.append(m._dit(cache, x_t[b : b + 1], t[b : b + 1], lambda i, blk: blk.attn1.kv(vl) if blk.cross else None))
    return torch.cat(out)


def test_n15_placed_image_tokens_match_a_hand_built_sequence():
    cfg = placed_config()
    m = _random_n15(cfg)
    batch = placed_batch(cfg)
    x_t, t = torch.randn(2, HORIZON, MAX_ACTION), torch.tensor([0.25, 0.5])
    with torch.no_grad():
        want = reference_velocity(m, batch, x_t, t)
        joint = m.velocity_joint(batch, x_t, t)
        cached = m.denoise_step(m.encode_prefix(batch, m.encode_images(batch)), x_t, t, batch.state)
        # the placeholder's own embedding row is never read
        m.backbone.eagle_model.language_model.model.embed_tokens.weight[IMG_ID] = 1e3
        again = m.velocity_joint(batch, x_t, t)
        # the same weights reading [all images; text without the runs] (the unset mode) differ
        legacy = GR00TN15Model(dataclasses_replace(cfg, image_token_id=None), embodiment_id=3).eval()
        legacy.load_state_dict(m.state_dict())
        keep = batch.tokens != IMG_ID
        from quantvla_core.models import Batch

        text = torch.stack(
            [torch.cat([r[k], torch.zeros(int((~k).sum()), dtype=torch.long)]) for r, k in zip(batch.tokens, keep)]
        )
        tmask = torch.stack(
            [
                torch.cat([mk[k], torch.zeros(int((~k).sum()), dtype=torch.bool)])
                for mk, k in zip(batch.token_mask, keep)
            ]
        )
        old = legacy.velocity_joint(Batch(batch.images, batch.image_mask, text, tmask, batch.state), x_t, t)
    torch.testing.assert_close(joint, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)
    gap = (old - want).abs().max()  # small random weights: small but far above the rounding above
    assert gap > 1e-4 and gap > 50 * (joint - want).abs().max()


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_n15_placed_image_tokens_wrong_placeholder_count_is_refused():
    cfg = placed_config()
    m = _random_n15(cfg)
    batch = placed_batch(cfg)
    batch.image_mask[1, 0] = True  # row 1 now claims two cameras but its prompt has one run
    with (
        torch.no_grad(),
        pytest.raises(
            ValueError,
            match=r"batch row 1: the prompt has 4 image placeholder tokens "
            r"\(id 250\) but 2 present camera\(s\) x 4 image tokens = 8",
        ),
    ):
        m.velocity_joint(batch, torch.randn(2, HORIZON, MAX_ACTION), torch.tensor([0.25, 0.5]))
    batch = placed_batch(cfg)
    batch.tokens[0, 1] = IMG_ID  # an extra placeholder in row 0
    with torch.no_grad(), pytest.raises(ValueError, match="row 0: the prompt has 9 .* = 8"):
        m.encode_prefix(batch, m.encode_images(batch))


def test_n15_placed_image_tokens_with_fp32_islands():
    """The island path (bf16 runs) places the image tokens the same way: forced on in fp32 it
    equals the plain path and the hand-built reference."""
    cfg = placed_config()
    m = _random_n15(cfg)
    batch = placed_batch(cfg, seed=1)
    x_t, t = torch.randn(2, HORIZON, MAX_ACTION), torch.tensor([0.0, 0.75])
    with torch.no_grad():
        want = reference_velocity(m, batch, x_t, t)
        m.islands_active = lambda: True
        forced = m.velocity_joint(batch, x_t, t)
        cached = m.denoise_step(m.encode_prefix(batch, m.encode_images(batch)), x_t, t, batch.state)
    torch.testing.assert_close(forced, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-5)


def test_groot_policy_places_only_present_cameras(tmp_path, tokenizer_json):
    """A two-camera checkpoint given one frame: one <image 1> run in the prompt, the absent slot
    masked, and the prediction equals the model's on the full batch (absent camera kept)."""
    from tokenizers import Tokenizer

    feats = {
        "observation.images.front": {"type": "VISUAL", "shape": [3, 480, 640]},
        "observation.images.wrist": {"type": "VISUAL", "shape": [3, 480, 640]},
        "observation.state": {"type": "STATE", "shape": [ROBOT_STATE]},
    }
    pol = Policy.load(write_groot(tmp_path / "g", planted(), tokenizer_json, overrides={"input_features": feats}))
    assert pol.config.max_cameras == 2 and pol.config.max_text_tokens == 128 + 2 * 4
    obs = Observation([np.full((20, 30, 3), 60, np.uint8)], "place the cup on the plate", np.array([1.0, 0.5, 2.0]))
    batch = pol.preprocess(obs)
    assert batch.image_mask.tolist() == [[True, False]]
    ref = Tokenizer.from_file(str(tokenizer_json))
    img = ref.token_to_id("<IMG_CONTEXT>")
    want = [151669 if i == img else i for i in eagle_reference_ids(ref, "place the cup on the plate", 1, 4, True)]
    assert batch.tokens[0][batch.token_mask[0]].tolist() == want
    noise = torch.randn(1, HORIZON, MAX_ACTION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = pol.model.sample_actions(batch, noise)  # absent camera and padding still in the batch
    got = pol.predict(obs, noise=noise).actions  # Policy drops them for one observation
    norm = pol.action_norm.unnormalize(full[0].numpy())
    np.testing.assert_allclose(
        got, norm[:, :ROBOT_ACTION] if norm.shape[1] != ROBOT_ACTION else norm, rtol=1e-4, atol=1e-5
    )
    obs3 = Observation([np.zeros((20, 30, 3), np.uint8)] * 2, "x " * 70, np.array([1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match=r"tokens \(2 x 4 image placeholders included\) but the model reads 136"):
        pol.preprocess(obs3)
