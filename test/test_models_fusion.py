"""Per-step work the float model removes: RoPE tables with the sign built in, masks converted
once, sibling float layers (q/k/v, gate/up, every adaRMS modulation) as one GEMM over weights
that are not copied. Each against an independent reference or the unfused path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantvla_core.checkpoint import MODEL_FILE, load_tensors, save_model_dir
from quantvla_core.config import preset
from quantvla_core.models import build_model
from quantvla_core.models.attention import attention, attention_impl, attention_mask, logit_observer
from quantvla_core.models.float_fusion import fused_float_weights, set_float_fusion
from quantvla_core.models.layers import Conditioning, DecoderAttention, apply_rope, modulation, rope_cos_sin
from quantvla_core.config import DecoderConfig

from test_models import make_batch


def rope_reference(x, positions, head_dim, theta):
    """Rotate-half RoPE written out per pair of dimensions, in float64."""
    half = head_dim // 2
    xd = x.double()
    out = torch.empty_like(xd)
    for i in range(half):
        freq = 1.0 / theta ** (2 * i / head_dim)
        ang = positions.double()[:, None, :] * freq  # (B, 1, T)
        c, s = ang.cos(), ang.sin()
        a, b = xd[..., i], xd[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_rotation_written_out(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 16, generator=g).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 9, 11, 12, 13, 14, 15]])
    cos, sin = rope_cos_sin(pos, 16, 10000.0, dtype)
    got = apply_rope(x, cos, sin).double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, rope_reference(x, pos, 16, 10000.0), rtol=tol, atol=tol)


def test_rope_is_bit_identical_to_rotate_half():
    """The roll + signed-sin form gives exactly the numbers of the classic rotate-half form."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 32, generator=g)
    pos = torch.arange(7)[None].expand(2, -1) + torch.tensor([[0], [4]])
    inv = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    ang = torch.cat([pos.float()[..., None] * inv] * 2, dim=-1)[:, None]
    rotated = torch.cat([-x[..., 16:], x[..., :16]], dim=-1)
    classic = x * ang.cos() + rotated * ang.sin()
    cos, sin = rope_cos_sin(pos, 32, 10000.0, torch.float32)
    assert torch.equal(apply_rope(x, cos, sin), classic)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_mask_object_gives_the_boolean_masks_result(impl):
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(2, 4, 5, 8, generator=g),
        torch.randn(2, 2, 9, 8, generator=g),
        torch.randn(2, 2, 9, 8, generator=g),
    )
    keep = torch.rand(2, 1, 5, 9, generator=g) > 0.4
    keep[..., 0] = True  # no row fully masked
    seen = []
    with attention_impl(impl):
        a = attention(q, k, v, keep)
        b = attention(q, k, v, attention_mask(keep, q.dtype))
        c = attention(q, k, v, attention_mask(keep, torch.bfloat16))  # another dtype: the bool path
    assert torch.equal(a, b) and torch.equal(a, c)
    with logit_observer(lambda name, logits, mask: seen.append(mask)):
        attention(q, k, v, attention_mask(keep, q.dtype))
    assert seen and seen[-1].dtype == torch.bool and torch.equal(seen[-1], keep)  # observers get the bool mask
    with pytest.raises(TypeError, match="bool tensor"):
        attention_mask(keep.float(), torch.float32)


def test_project_heads_equals_per_tensor_heads():
    torch.manual_seed(3)
    attn = DecoderAttention(DecoderConfig(width=32, depth=1, mlp=64, heads=4, kv_heads=2, head_dim=8, vocab_size=10))
    y = torch.randn(2, 6, (4 + 2 * 2) * 8)
    cos, sin = rope_cos_sin(torch.arange(6)[None].expand(2, -1), 8, 10000.0, torch.float32)
    for a, b in zip(attn.project_heads(y, cos, sin), attn.to_heads(*attn._split_qkv(y), cos, sin)):
        assert a.shape == b.shape and torch.equal(a, b)


class Siblings(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 8, bias=bias), nn.Linear(16, 4, bias=bias), nn.Linear(16, 12, bias=bias)

    def layers(self):
        return (self.a, self.b, self.c)


def _param_bytes(module):
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def test_fused_float_weights_share_the_layers_storage():
    torch.manual_seed(4)
    m = Siblings()
    x = torch.randn(3, 16)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ref = torch.cat([layer(x) for layer in m.layers()], -1).detach()
    bytes_before = _param_bytes(m)
    with torch.no_grad():
        w, b = fused_float_weights(m, "_f", m.layers())
        torch.testing.assert_close(F.linear(x, w, b), ref, rtol=1e-6, atol=1e-6)
    # the layers now live inside the concatenation: same values, no second copy
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert m.a.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert _param_bytes(m) <= bytes_before
    # an in-place update of a layer (load_state_dict, a fold) reaches the fused GEMM: it bumps
    # the layer's version, and the concatenation (and any prepacked copy of it) is rebuilt
    with torch.no_grad():
        m.b.weight.mul_(2.0)
        w2, _ = fused_float_weights(m, "_f", m.layers())
        assert w2 is not w and torch.equal(w2[8:12], m.b.weight)
        assert fused_float_weights(m, "_f", m.layers())[0] is w2  # then reused
        w = w2
        # a reassigned parameter is seen: the concatenation is rebuilt
        m.c.weight = nn.Parameter(torch.zeros(12, 16))
        w3, _ = fused_float_weights(m, "_f", m.layers())
        assert w3 is not w and torch.equal(w3[12:], torch.zeros(12, 16))


def test_fused_float_weights_step_aside_for_training_hooks_and_mixed_layers():
    m = Siblings()
    assert fused_float_weights(m, "_f", m.layers()) is None  # gradients on: each layer is its own
    with torch.no_grad():
        assert fused_float_weights(m, "_f", m.layers()) is not None
        h = m.b.register_forward_hook(lambda *a: None)
        assert fused_float_weights(m, "_f", m.layers()) is None and "_f" not in m.__dict__  # nothing stale kept
        h.remove()
        m.c.to(torch.float64)
        assert fused_float_weights(m, "_f", m.layers()) is None  # mixed dtypes
        m.c.to(torch.float32)
        no_bias = Siblings(bias=False)
        assert fused_float_weights(no_bias, "_f", (no_bias.a, m.b)) is None  # bias on some only
        set_float_fusion(False)
        try:
            assert fused_float_weights(m, "_f", m.layers()) is None
        finally:
            set_float_fusion(True)
    # after fusing, training still reaches every layer's parameter
    with torch.no_grad():
        fused_float_weights(m, "_f", m.layers())
    loss = sum(layer(torch.randn(2, 16)).sum() for layer in m.layers())
    loss.backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in m.layers())


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_fused_float_model_predicts_what_the_unfused_one_does_and_saves_unchanged(name, tmp_path):
    cfg = preset(name)
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    noise = model.sample_noise(2, torch.Generator().manual_seed(5))
    set_float_fusion(False)
    try:
        ref = model.sample_actions(batch, noise)
    finally:
        set_float_fusion(True)
    fused = model.sample_actions(batch, noise)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    # the fused GEMMs did run (else the comparison above proves nothing)
    decoder = model._expert if cfg.arch != "groot" else model.backbone.eagle_model.language_model.model
    assert "_float_qkv" in decoder.layers[0].self_attn.__dict__
    assert "_float_gate_up" in decoder.layers[0].mlp.__dict__
    with torch.no_grad():  # every adaptive norm's modulation comes out of one GEMM
        if cfg.arch == "pi05":
            stack, cond = model._expert, torch.randn(2, cfg.expert.width)
            layer, expected = stack.layers[1].post_attention_layernorm.dense, 2 * cfg.expert.depth + 1
            want = layer(cond)
        elif cfg.arch == "groot":
            stack, cond = model.action_head.model, torch.randn(2, cfg.dit.width)
            layer, expected = stack.transformer_blocks[1].norm1.linear, cfg.dit.depth + 1  # + proj_out_1
            want = layer(F.silu(cond))
        else:  # pi0: no adaptive norms
            stack = None
    if stack is not None:
        with torch.no_grad():
            got = stack.conditioning(cond)
        assert isinstance(got, Conditioning) and len(got.modulations) == expected
        torch.testing.assert_close(modulation(got, layer), want, rtol=1e-6, atol=1e-6)
        if cfg.arch == "pi05":  # the norm terms formed for the whole stack: each norm's own numbers
            norm = stack.layers[1].post_attention_layernorm
            x = torch.randn(2, 5, cfg.expert.width)
            scale, shift, gate = modulation(got, norm.dense).unsqueeze(1).chunk(3, dim=-1)
            y, g = norm(x, got)
            normed = F.rms_norm(x, (x.shape[-1],), eps=norm.eps)
            assert torch.equal(y, normed * (1 + scale) + shift) and torch.equal(g, gate)
    # checkpoints read the same tensors back (parameters are views into the concatenations now)
    save_model_dir(tmp_path / "m", cfg, model.state_dict())
    sd = load_tensors(tmp_path / "m" / MODEL_FILE)
    state = model.state_dict()
    assert set(sd) == set(state) and all(torch.equal(sd[k], state[k]) for k in state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_written_out_formula(dtype):
    """RMSNorm / AdaRMSNorm normalise with one F.rms_norm call: the numbers of
    x * rsqrt(mean(x^2) + eps) in fp32, bit for bit on the CPU."""
    from quantvla_core.models.layers import AdaRMSNorm, RMSNorm

    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 9, 48, generator=g) * torch.rand(48, generator=g) * 20).to(dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        assert torch.equal(norm(x), (normed * (1 + norm.weight.float())).to(dtype))
        ada = AdaRMSNorm(48, 16).to(dtype)
        cond = torch.randn(2, 16, generator=g).to(dtype)
        scale, shift, gate = ada.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        y, got_gate = ada(x, cond)
    assert torch.equal(y, (normed * (1 + scale.float()) + shift.float()).to(dtype)) and torch.equal(got_gate, gate)


def test_pi05_adaptive_norms_run_as_one_kernel_on_triton(monkeypatch):
    """A float pi0.5 on the Triton backend runs each adaRMS norm as one kernel
    (quantvla_kernels.adaptive_rmsnorm): every norm of the expert, every step, with the actions
    of the torch ops to fp32 rounding."""
    import quantvla_kernels as qk
    from quantvla_kernels import norm as knorm
    from quantvla_kernels.dispatch import triton_interpreting

    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    cfg = preset("tiny-pi05")
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    noise = model.sample_noise(2, torch.Generator().manual_seed(7))
    launches = []
    real = knorm._triton
    monkeypatch.setattr(knorm, "_triton", lambda *a: launches.append(a[0].shape) or real(*a))
    with qk.backend_scope("triton"):
        got = model.sample_actions(batch, noise)
    with qk.backend_scope("cpu"):
        want = model.sample_actions(batch, noise)
    assert len(launches) == (2 * cfg.expert.depth + 1) * cfg.num_steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gated_residual_is_one_op_where_kernels_run_on_triton():
    """pi0.5's x + h * gate: one addcmul (rounded once) on the Triton backend, the two ops of
    the reference numbers on the CPU."""
    import quantvla_kernels as qk
    from test_models_cpu_linear import OpNames as Ops

    from quantvla_core.models.layers import gated_residual

    g = torch.Generator().manual_seed(8)
    x, h, gate = (
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 1, 16, generator=g),
    )
    with qk.backend_scope("cpu"), Ops() as cpu_ops:
        exact = gated_residual(x, h, gate)
    with qk.backend_scope("triton"), Ops() as gpu_ops:
        fused = gated_residual(x, h, gate)
    assert torch.equal(exact, x + h * gate) and len(cpu_ops.names) == 2
    assert gpu_ops.names == ["aten.addcmul.default"]
    torch.testing.assert_close(fused, exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_time_conditions_prepared_once_per_chunk_match_the_per_step_ones(name):
    """sample_actions computes every step's time embedding / time MLP / adaRMS modulations in one
    batched pass (prepare_steps, keyed by each step's own t tensor): the steps use it, and the
    actions are those of computing it in every step; a t that was not prepared computes its own."""
    cfg = preset(name)
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    noise = model.sample_noise(2, torch.Generator().manual_seed(9))
    real = model._time_condition
    calls = []
    model._time_condition = lambda t, dtype: calls.append(t.shape[0]) or real(t, dtype)
    with torch.no_grad():
        prepared = model.sample_actions(batch, noise)
        assert calls == [2 * cfg.num_steps]  # one batched call for the whole chunk
        calls.clear()
        cache = model.encode_prefix(batch, model.encode_images(batch))  # no prepare_steps
        x, dt = noise.float(), model.step_size(cfg.num_steps)
        for t in model.time_grid(cfg.num_steps):
            x = model.euler_step(cache, x, torch.full((2,), t), dt, batch.state)
        assert calls == [2] * cfg.num_steps  # one per step
        calls.clear()
        model.prepare_steps(cache, [torch.full((2,), 0.5)])
        other = torch.full((2,), 0.5)  # equal value, another tensor: not the prepared entry
        model.denoise_step(cache, noise, other, batch.state)
        assert calls == [2, 2]
    torch.testing.assert_close(prepared, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_compiled_denoise_step_does_not_recompile_per_step(name):
    """A torch.compile'd denoise_step (the bench's compile peer) traces the per-step path and
    never looks at the t-keyed prepared conditions: one compiled frame for every step of three
    chunks (guarding on the dict's tensor keys had recompiled it per step, up to the limit)."""
    import copy

    from torch._dynamo.utils import counters

    cfg = preset(name)
    model = build_model(cfg).eval()
    batch = make_batch(cfg)
    compiled = copy.copy(model)
    object.__setattr__(compiled, "denoise_step", torch.compile(model.denoise_step, dynamic=False))
    counters.clear()
    with torch.inference_mode():
        for seed in range(3):
            compiled.sample_actions(batch, model.sample_noise(2, torch.Generator().manual_seed(seed)))
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 1, dict(counters["frames"])


def test_embodiment_linear_reads_one_embodiments_weights_in_place():
    """GR00T's per-embodiment linears with one int embodiment (a deployed model) compute what the
    per-sample gather does, as one addmm with no gather (the gather copied W for every row),
    and both GR00T models pass their embodiment as that int."""
    from quantvla_core.models.groot import CategorySpecificLinear
    from test_models_cpu_linear import OpNames

    torch.manual_seed(0)
    lin = CategorySpecificLinear(3, 24, 40)
    with torch.no_grad():
        lin.b.normal_()
    for x in (torch.randn(2, 7, 24), torch.randn(2, 24)):
        with torch.no_grad(), OpNames() as ops:
            fast = lin(x, 1)
        gathered = lin(x, torch.tensor([1, 1]))
        torch.testing.assert_close(fast, gathered, rtol=1e-6, atol=1e-6)
        assert "aten.index.Tensor" not in ops.names and "aten.addmm.default" in ops.names
    mixed = lin(torch.randn(2, 7, 24), torch.tensor([0, 2]))  # per-sample embodiments still work
    assert mixed.shape == (2, 7, 40)
    for name in ("tiny-groot",):
        model = build_model(preset(name))
        assert model._cat(2, "cpu") == model.cfg.dit.embodiment_id


def test_diffusers_attention_runs_self_attention_qkv_as_one_gemm():
    """GR00T's / SmolVLA's diffusers-style self-attention: to_q, to_k, to_v read the same x and
    run as one GEMM (2 GEMMs a call instead of 4), within GEMM rounding of the separate layers;
    a hook on one of them makes them run one by one again; cross-attention (kv given) keeps to_q."""
    from quantvla_core.models.layers import Attention
    from test_models_cpu_linear import OpNames

    torch.manual_seed(0)
    attn = Attention(64, 4, 16).eval()
    x = torch.randn(2, 9, 64)

    def separate(x, kv=None):
        q = attn.split(F.linear(x, attn.to_q.weight, attn.to_q.bias))
        if kv is None:
            kv = (
                attn.split(F.linear(x, attn.to_k.weight, attn.to_k.bias)),
                attn.split(F.linear(x, attn.to_v.weight, attn.to_v.bias)),
            )
        out = F.scaled_dot_product_attention(q, *kv)
        return attn.to_out[0](out.transpose(1, 2).reshape(2, 9, -1))

    def gemms(names):
        return sum(n in ("aten.addmm.default", "aten.mm.default", "aten.bmm.default") for n in names)

    with torch.no_grad():
        with OpNames() as ops:
            fused = attn(x)
        torch.testing.assert_close(fused, separate(x), rtol=1e-5, atol=1e-6)
        assert gemms(ops.names) == 2
        seen = []
        h = attn.to_k.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with OpNames() as ops:
                hooked = attn(x)
        finally:
            h.remove()
        assert len(seen) == 1 and gemms(ops.names) == 4
        torch.testing.assert_close(hooked, fused, rtol=1e-5, atol=1e-6)
        kv = (torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16))
        torch.testing.assert_close(attn(x, kv=kv), separate(x, kv), rtol=1e-5, atol=1e-6)
