"""Reference models: shapes, cache == joint path, eager == SDPA, determinism, accounting."""

import math

import pytest
import torch

from quantvla_core.config import ModelConfig, preset
from quantvla_core.models import Batch, build_model, component_of
from quantvla_core.models.attention import attention, attention_impl, logit_observer

TINY = ["tiny", "tiny-pi05", "tiny-groot"]


def make_batch(cfg, b=2, seed=0, partial=True):
    g = torch.Generator().manual_seed(seed)
    s, c = cfg.vision.image_size, cfg.max_cameras
    image_mask = torch.ones(b, c, dtype=torch.bool)
    token_mask = torch.ones(b, 12, dtype=torch.bool)
    if partial and b > 1:
        image_mask[1, -1] = False  # second sample: one camera absent
        token_mask[1, 8:] = False  # and a shorter instruction
    return Batch(
        torch.rand(b, c, 3, s, s, generator=g) * 2 - 1,
        image_mask,
        torch.randint(3, 200, (b, 12), generator=g),
        token_mask,
        torch.randn(b, cfg.state_dim, generator=g),
    )


@pytest.mark.parametrize("name", TINY)
def test_sample_shapes_and_finite(name):
    cfg = preset(name)
    model = build_model(cfg)
    batch = make_batch(cfg)
    out = model.sample_actions(batch, model.sample_noise(2, torch.Generator().manual_seed(1)))
    assert out.shape == (2, cfg.horizon, cfg.action_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_path_equals_joint_training_path(name):
    cfg = preset(name)
    model = build_model(cfg)
    batch = make_batch(cfg)
    x_t = torch.randn(2, cfg.horizon, cfg.action_dim)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        joint = model.velocity_joint(batch, x_t, t)
        cache = model.encode_prefix(batch, model.encode_images(batch))
        cached = model.denoise_step(cache, x_t, t, batch.state)
        # The prefix must matter, or the equality above would prove nothing.
        other = make_batch(cfg, seed=5)
        cache2 = model.encode_prefix(other, model.encode_images(other))
        moved = model.denoise_step(cache2, x_t, t, other.state)
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-5)
    assert (moved - cached).abs().max() > 1e-3


@pytest.mark.parametrize("name", TINY)
def test_eager_equals_sdpa(name):
    cfg = preset(name)
    model = build_model(cfg)
    batch = make_batch(cfg)
    noise = model.sample_noise(2, torch.Generator().manual_seed(3))
    with attention_impl("sdpa"):
        a = model.sample_actions(batch, noise)
    with attention_impl("eager"):
        b = model.sample_actions(batch, noise)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_against_explicit_softmax_with_gqa_and_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    mask[..., 0] = True
    ref = torch.empty_like(q)
    for b in range(2):
        for h in range(4):
            kh, vh = k[b, h // 2], v[b, h // 2]
            logits = q[b, h] @ kh.T / math.sqrt(8)
            logits[~mask[b, 0]] = -math.inf
            ref[b, h] = torch.softmax(logits, -1) @ vh
    for impl in ("eager", "sdpa"):
        with attention_impl(impl):
            torch.testing.assert_close(attention(q, k, v, mask), ref)


def test_logit_observer_sees_named_modules_with_logits():
    cfg = preset("tiny")
    model = build_model(cfg)
    seen = {}
    with logit_observer(lambda name, logits, mask: seen.setdefault(name, logits.shape)):
        model.sample_actions(make_batch(cfg), model.sample_noise(2))
    expert0 = "paligemma_with_expert.gemma_expert.model.layers.0.self_attn"
    backbone0 = "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn"
    assert expert0 in seen and backbone0 in seen
    assert seen[expert0][1] == cfg.expert.heads
    assert seen[expert0][2] == cfg.horizon + 1  # state token + actions (pi0)


@pytest.mark.parametrize("name", TINY)
def test_seeded_sampling_is_deterministic(name):
    cfg = preset(name)
    m1, m2 = build_model(cfg, seed=7), build_model(cfg, seed=7)
    batch = make_batch(cfg)
    n1 = m1.sample_noise(2, torch.Generator().manual_seed(11))
    n2 = m2.sample_noise(2, torch.Generator().manual_seed(11))
    assert torch.equal(m1.sample_actions(batch, n1), m2.sample_actions(batch, n2))


@pytest.mark.parametrize("name", TINY)
def test_flow_loss_backpropagates(name):
    cfg = preset(name)
    model = build_model(cfg).train()
    loss = model.flow_loss(make_batch(cfg), torch.randn(2, cfg.horizon, cfg.action_dim))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "action_out_proj" in n or "proj_out_2" in n]
    assert loss.item() > 0 and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_module_names_mirror_real_checkpoints():
    names = {n for n, _ in build_model(preset("tiny-pi05"), device="meta").named_modules()}
    for expected in [
        "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj",
        "paligemma_with_expert.gemma_expert.model.layers.1.mlp.down_proj",
        "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense",
        "paligemma_with_expert.gemma_expert.model.norm.dense",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear",
        "time_mlp_in",
        "action_in_proj",
        "action_out_proj",
    ]:
        assert expected in names, expected
    groot = {n for n, _ in build_model(preset("tiny-groot"), device="meta").named_modules()}
    for expected in [
        "action_head.model.transformer_blocks.0.attn1.to_q",
        "action_head.model.transformer_blocks.1.ff.net.0.proj",
        "action_head.model.transformer_blocks.1.ff.net.2",
        "action_head.model.transformer_blocks.0.norm1.linear",
        "backbone.eagle_model.language_model.model.layers.0.mlp.gate_proj",
    ]:
        assert expected in groot, expected


def test_pi05_3b_component_counts_match_real_model():
    """architectures.md: vision ~412M, backbone ~2,508M (526.6M embedding), expert ~428M."""
    model = build_model(preset("pi05-3b"), device="meta")
    comp = {}
    for n, p in model.named_parameters():
        comp[component_of(n)] = comp.get(component_of(n), 0) + p.numel()
    for key, real in (("vision", 412e6), ("backbone", 2508e6), ("expert", 428e6)):
        assert abs(comp[key] - real) / real < 0.02, (key, comp[key])
    emb = model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight.numel()
    assert abs(emb - 526.6e6) / 526.6e6 < 0.001


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig(arch="rt2", expert=preset("tiny").expert)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("pi9")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "pi0", "bogus": 1})
    with pytest.raises(ValueError, match="horizon"):
        ModelConfig(arch="pi0", expert=preset("tiny").expert, horizon=0)


# ---- GR00T N1.5 with image tokens placed inside the prompt (config image_token_id) ----
PLACEHOLDER = 7


def placed_groot_config():
    import dataclasses

    return dataclasses.replace(preset("tiny-groot"), variant="n15", image_token_id=PLACEHOLDER, max_text_tokens=48)


def make_placed_batch(cfg, seed=0):
    """Row 0: both cameras, each a run of placeholders inside the text; row 1: the first camera
    absent (one run only) and a padded, shorter prompt."""
    g = torch.Generator().manual_seed(seed)
    per, s, length = cfg.num_image_tokens, cfg.vision.image_size, cfg.max_text_tokens

    def text(n):
        return torch.randint(10, 200, (n,), generator=g).tolist()

    def run():
        return [201] + [PLACEHOLDER] * per + [202]

    rows = [text(3) + run() + run() + text(4), text(3) + run() + text(2)]
    tokens = torch.zeros(2, length, dtype=torch.long)
    token_mask = torch.zeros(2, length, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], token_mask[i, : len(r)] = torch.tensor(r), True
    image_mask = torch.tensor([[True, True], [False, True]])
    return Batch(
        torch.rand(2, 2, 3, s, s, generator=g) * 2 - 1,
        image_mask,
        tokens,
        token_mask,
        torch.randn(2, cfg.state_dim, generator=g),
    )


def test_groot_n15_placed_images_kv_cache_equals_joint_path():
    cfg = placed_groot_config()
    model = build_model(cfg)
    batch = make_placed_batch(cfg)
    x_t, t = torch.randn(2, cfg.horizon, cfg.action_dim), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        joint = model.velocity_joint(batch, x_t, t)
        cache = model.encode_prefix(batch, model.encode_images(batch))
        cached = model.denoise_step(cache, x_t, t, batch.state)
        assert cache.vl.shape[1] == cfg.max_text_tokens and torch.equal(cache.valid, batch.token_mask)
        # the image features reach the actions through the placeholders
        other = Batch(batch.images.flip(0), batch.image_mask, batch.tokens, batch.token_mask, batch.state)
        moved = model.denoise_step(model.encode_prefix(other, model.encode_images(other)), x_t, t, batch.state)
        with attention_impl("eager"):
            eager = model.velocity_joint(batch, x_t, t)
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager, joint, rtol=1e-4, atol=1e-5)
    assert (moved - cached).abs().max() > 1e-3
    loss = model.train().flow_loss(batch, torch.randn(2, cfg.horizon, cfg.action_dim))
    loss.backward()
    assert model.backbone.eagle_model.mlp1[1].weight.grad.abs().sum() > 0  # vision gets gradient through them


def test_groot_n15_placement_needs_the_n15_variant():
    import dataclasses

    with pytest.raises(ValueError, match="image_token_id .* needs variant 'n15'"):
        dataclasses.replace(preset("tiny-groot"), image_token_id=3)
    cfg = placed_groot_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["image_token_id"] == PLACEHOLDER
    assert "image_token_id" not in preset("tiny-groot").to_dict()  # configs without it are written as before


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_bf16_model_predicts_finite_actions_close_to_fp32(name):
    """A whole model cast to bfloat16 runs end to end (GR00T's fp32 sinusoid used to meet its
    bf16 timestep layer and fail) and stays near the fp32 model's actions."""
    import numpy as np

    from quantvla_core.policy import Observation, Policy

    cfg = preset(name)
    rng = np.random.default_rng(0)
    obs = Observation(
        images=[rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)],
        instruction="open the drawer",
        state=rng.normal(size=cfg.state_dim).astype(np.float32),
    )
    fp = Policy(build_model(cfg, seed=0).eval(), cfg, name=name, device="cpu", dtype="fp32")
    bf = Policy(build_model(cfg, seed=0).eval().to(torch.bfloat16), cfg, name=name, device="cpu", dtype="bf16")
    a32, a16 = fp.predict(obs, seed=1).actions, bf.predict(obs, seed=1).actions
    assert np.isfinite(a16).all()
    assert np.abs(a16 - a32).max() <= 0.1 * np.abs(a32).max() + 1e-3
