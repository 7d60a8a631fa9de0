"""Quantizers, QuantLinear, transforms, layout rules and ATM/OHB math (no full model needed)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from quantvla_core.quant import layout as L
from quantvla_core.quant.atm import AttentionTarget, atm_alpha, calibrate_atm, collect_logit_std, per_head_std
from quantvla_core.quant.ohb import calibrate_ohb, collect_output_rms, ohb_beta
from quantvla_core.quant.qlinear import QuantLinear, scale_output_channels
from quantvla_core.quant.quantizers import qmax, quantize_per_token, quantize_weight
from quantvla_core.quant.transforms import build_transform, fold_smoothing_into_norm, hadamard, zigzag_permutation

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _heavy_tailed(shape, seed=0, outliers=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    cols = torch.randperm(shape[-1], generator=g)[:outliers]
    x[..., cols] *= 20.0
    return x


# ---- quantizers --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32), (8, 32)])
def test_weight_quantization_error_bound(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    # without clipping the error is at most half a step everywhere
    qw = quantize_weight(w, bits, group, clip_grid=(1.0,))
    assert qw.q.dtype == torch.int8
    assert int(qw.q.abs().max()) <= qmax(bits)
    err = (qw.dequantize() - w).abs()
    step = qw.scale[:, None] if group is None else qw.scale.repeat_interleave(group, 1)
    assert bool((err <= step / 2 + 1e-6).all())
    # the row/group absmax is represented exactly at +-qmax (per row, or per group of columns)
    size = group or w.shape[1]
    amax_deq = qw.dequantize().abs().reshape(w.shape[0], -1, size).amax(-1)
    amax_w = w.abs().reshape(w.shape[0], -1, size).amax(-1)
    assert amax_w.shape == (24, 64 // size)
    assert torch.allclose(amax_deq, amax_w, rtol=1e-6)
    assert int((qw.q.abs().reshape(w.shape[0], -1, size).amax(-1) == qmax(bits)).sum()) == amax_w.numel()


def test_mse_clip_search_never_worse_than_absmax():
    w = _heavy_tailed((32, 128), seed=3)
    plain = quantize_weight(w, 4, None, clip_grid=(1.0,))
    searched = quantize_weight(w, 4, None)
    e_plain = (plain.dequantize() - w).pow(2).sum(1)
    e_search = (searched.dequantize() - w).pow(2).sum(1)
    assert bool((e_search <= e_plain + 1e-9).all())
    assert float(e_search.sum()) < float(e_plain.sum())  # heavy tails: clipping helps somewhere


@pytest.mark.parametrize("bits", [8, 4])
def test_per_token_activation_quantization_bound(bits):
    x = _heavy_tailed((16, 96), seed=4)
    x[3] = 0.0
    q, s = quantize_per_token(x, bits)
    assert int(q.abs().max()) <= qmax(bits)
    assert float(s[3]) == 1.0 and int(q[3].abs().max()) == 0
    err = (q.float() * s[:, None] - x).abs()
    assert bool((err <= s[:, None] / 2 + 1e-5).all())


def test_bad_bits_and_group_are_rejected_clearly():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_weight(torch.randn(4, 8), 3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 10), 4, group_size=4)


def test_int4_packing_is_exact_through_quantlinear():
    lin = nn.Linear(256, 40, bias=True)
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=128)
    assert ql.qweight.dtype == torch.uint8 and ql.qweight.shape == (40, 128)
    ref = quantize_weight(lin.weight.detach(), 4, 128)
    assert torch.equal(ql.int_weight(), ref.q)
    assert torch.equal(ql.wscale, ref.scale)


# ---- QuantLinear ---------------------------------------------------------------------------------
def _independent_fp64(x, qw, bias, a_bits):
    """Per-token quantize + dequantized matmul written in numpy float64, from the raw codes."""
    xn = x.double().numpy()
    if a_bits is not None:
        m = 2 ** (a_bits - 1) - 1
        amax = np.abs(xn).max(axis=1)
        s = np.where(amax > 0, amax / m, 1.0)
        xn = np.clip(np.round(xn / s[:, None]), -m, m) * s[:, None]
    q = qw.q.numpy().astype(np.float64)
    sc = qw.scale.double().numpy()
    w = q * (sc[:, None] if qw.group_size is None else np.repeat(sc, qw.group_size, axis=1))
    y = xn @ w.T
    return y + bias.double().numpy() if bias is not None else y


@pytest.mark.parametrize(
    "w_bits,a_bits,group", [(8, 8, None), (4, 8, 64), (4, 8, None), (4, 4, 64), (8, None, None), (4, None, 64)]
)
def test_quantlinear_reference_matches_independent_fp64(w_bits, a_bits, group):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    x = _heavy_tailed((10, 128), seed=5)
    ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, group_size=group, backend="reference")
    qw = quantize_weight(lin.weight.detach(), w_bits, group)
    y = ql.forward_reference(x)
    assert y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), _independent_fp64(x, qw, lin.bias.detach(), a_bits), rtol=1e-10, atol=1e-10)
    # host models keep working: shape, attributes, weight dtype
    out = ql(x.reshape(2, 5, 128))
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    assert ql.in_features == 128 and ql.out_features == 48 and ql.weight.dtype == torch.float32
    y_f = lin(x).detach()
    rel = float((out.reshape(10, 48) - y_f).norm() / y_f.norm())
    assert rel < {8: 0.02, 4: 0.25}[min(w_bits, a_bits or 16)]


def test_quantlinear_keeps_fp32_scales_under_bf16_cast_and_state_dict_roundtrip():
    lin = nn.Linear(64, 32)
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=32, backend="reference")
    ws = ql.wscale.clone()
    ql.to(torch.bfloat16)
    assert ql.weight.dtype == torch.bfloat16
    assert ql.wscale.dtype == torch.float32 and torch.equal(ql.wscale, ws)
    y = ql(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    fresh = QuantLinear(**ql.spec())
    fresh.load_state_dict(ql.state_dict())
    x = torch.randn(4, 64)
    fresh.backend = "reference"
    assert torch.equal(fresh(x), ql.float()(x))
    assert "weight" not in ql.state_dict()


def test_scale_output_channels_on_linear_and_quantlinear():
    lin = nn.Linear(32, 16)
    ql = QuantLinear.from_linear(lin, w_bits=8, a_bits=8, backend="reference")
    x = torch.randn(5, 32)
    f = torch.linspace(0.5, 1.5, 16)
    y0, yq0 = lin(x).detach(), ql(x)
    scale_output_channels(lin, f)
    scale_output_channels(ql, f)
    torch.testing.assert_close(lin(x).detach(), y0 * f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ql(x), yq0 * f, rtol=1e-5, atol=1e-6)


# ---- transforms ----------------------------------------------------------------------------------
class _RMSNorm(nn.Module):
    def __init__(self, d, offset):
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + (0.0 if offset else 1.0))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (self.offset + self.weight)


@pytest.mark.parametrize("names", [("smooth",), ("rotate",), ("smooth", "permute", "rotate")])
@pytest.mark.parametrize("rotation", ["hadamard", "svd"])
def test_folded_transforms_leave_float_output_unchanged(names, rotation):
    torch.manual_seed(0)
    x = _heavy_tailed((12, 128), seed=7)
    lins = [nn.Linear(128, 64, bias=True), nn.Linear(128, 32, bias=False)]
    t = build_transform(names, [l.weight for l in lins], x.abs().amax(0), strength=0.5, rotation=rotation)
    for lin in lins:
        w2 = t.fold_weight(lin.weight.detach()).float()
        y_t = t.apply(x) @ w2.T + (lin.bias.detach() if lin.bias is not None else 0)
        torch.testing.assert_close(y_t, lin(x).detach(), rtol=1e-5, atol=1e-5)
    if t.rotation is not None:  # blocks are orthogonal
        r = t.blocks(128).double()
        torch.testing.assert_close(
            r @ r.transpose(1, 2), torch.eye(r.shape[-1], dtype=torch.float64).expand_as(r), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_smoothing_folded_into_rmsnorm_is_exact(offset):
    torch.manual_seed(1)
    norm = _RMSNorm(64, offset)
    lin = nn.Linear(64, 48)
    x = _heavy_tailed((9, 64), seed=8)
    y0 = lin(norm(x)).detach()
    t = build_transform(("smooth",), [lin.weight], norm(x).detach().abs().amax(0), strength=0.5)
    fold_smoothing_into_norm(norm, t.inv_smooth)
    lin.weight.data = t.fold_weight(lin.weight.data).float()
    torch.testing.assert_close(lin(norm(x)).detach(), y0, rtol=1e-5, atol=1e-5)


def test_smoothing_folded_into_adarmsnorm_dense_is_exact():
    from quantvla_core.models.layers import AdaRMSNorm

    torch.manual_seed(2)
    norm = AdaRMSNorm(32, 16)
    nn.init.normal_(norm.dense.weight, std=0.3)
    nn.init.normal_(norm.dense.bias, std=0.3)
    lin = nn.Linear(32, 24)
    x, c = _heavy_tailed((2, 5, 32), seed=9), torch.randn(2, 16)
    h0, g0 = norm(x, c)
    y0 = lin(h0).detach()
    t = build_transform(("smooth",), [lin.weight], h0.detach().abs().reshape(-1, 32).amax(0), strength=0.5)
    fold_smoothing_into_norm(norm, t.inv_smooth)
    lin.weight.data = t.fold_weight(lin.weight.data).float()
    h1, g1 = norm(x, c)
    torch.testing.assert_close(lin(h1).detach(), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0)


def test_hadamard_and_zigzag_properties():
    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64, dtype=torch.float64))
    energy = torch.arange(16.0)
    perm = zigzag_permutation(energy, 4)
    assert sorted(perm.tolist()) == list(range(16))
    sums = energy[perm].reshape(4, 4).sum(1)
    assert float(sums.max() - sums.min()) <= 4.0  # balanced, vs 48 for the identity order


def test_transforms_reduce_w4a8_error_on_outlier_inputs():
    torch.manual_seed(3)
    lin = nn.Linear(256, 128, bias=False)
    x = _heavy_tailed((64, 256), seed=10, outliers=6)
    y = lin(x).detach()
    errs = {}
    for names in [(), ("smooth",), ("smooth", "permute", "rotate")]:
        t = build_transform(names, [lin.weight], x.abs().amax(0), strength=0.5) if names else None
        ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=4, group_size=128, transform=t, backend="reference")
        errs[names] = float((ql(x) - y).norm() / y.norm())
    assert errs[("smooth", "permute", "rotate")] < errs[()]


# ---- layout --------------------------------------------------------------------------------------
PI0_NAMES = [
    "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
    "paligemma_with_expert.paligemma.model.multi_modal_projector.linear",
    "paligemma_with_expert.paligemma.model.language_model.layers.3.self_attn.k_proj",
    "paligemma_with_expert.paligemma.model.language_model.layers.3.mlp.down_proj",
    "paligemma_with_expert.gemma_expert.model.layers.0.self_attn.o_proj",
    "paligemma_with_expert.gemma_expert.model.layers.0.mlp.gate_proj",
    "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense",
    "paligemma_with_expert.gemma_expert.lm_head",
    "state_proj",
    "action_in_proj",
    "action_out_proj",
    "action_time_mlp_in",
    "time_mlp_out",
    # LeRobot prefix and HF-transformers' older nesting: the same rules must hold
    "model.paligemma_with_expert.paligemma.language_model.model.layers.17.self_attn.q_proj",
    "model.paligemma_with_expert.gemma_expert.model.layers.17.mlp.up_proj",
]
GROOT_NAMES = [
    "backbone.eagle_model.vision_model.vision_model.encoder.layers.0.mlp.fc1",
    "backbone.eagle_model.mlp1.1",
    "backbone.eagle_model.language_model.model.layers.11.self_attn.v_proj",
    "backbone.eagle_model.language_model.model.layers.11.mlp.gate_proj",
    "action_head.model.transformer_blocks.0.attn1.to_q",
    "action_head.model.transformer_blocks.0.attn1.to_out.0",
    "action_head.model.transformer_blocks.0.ff.net.0.proj",
    "action_head.model.transformer_blocks.0.ff.net.2",
    "action_head.model.transformer_blocks.0.norm1.linear",
    "action_head.model.timestep_encoder.timestep_embedder.linear_1",
    "action_head.model.proj_out_1",
    "action_head.vl_self_attention.transformer_blocks.0.ff.net.2",
]


def test_layout_rules_pi0_real_and_reference_names():
    roles = [L.role_of(n, "pi0") for n in PI0_NAMES]
    assert roles == [
        "float",
        "float",
        "llm",
        "llm",
        "dit_attn",
        "dit_mlp",
        "float",
        "float",
        "float",
        "float",
        "float",
        "float",
        "float",
        "llm",
        "dit_mlp",
    ]
    entries = L.plan([(n, 8, 8) for n in PI0_NAMES], "pi05", "quantvla")
    assert [e.integer for e in entries] == [r in ("llm", "dit_mlp") for r in roles]


def test_layout_rules_groot_and_ablation_layouts():
    roles = [L.role_of(n, "groot") for n in GROOT_NAMES]
    assert roles == [
        "float",
        "float",
        "llm",
        "llm",
        "dit_attn",
        "dit_attn",
        "dit_mlp",
        "dit_mlp",
        "float",
        "float",
        "float",
        "float",
    ]
    shapes = [(n, 8, 8) for n in GROOT_NAMES]
    count = {lay: sum(e.integer for e in L.plan(shapes, "groot", lay)) for lay in L.LAYOUTS}
    assert count == {
        "fp": 0,
        "llm": 2,
        "dit-all": 4,
        "dit-mlp": 2,
        "llm+dit-all": 6,
        "llm+dit-mlp": 4,
        "quantvla": 4,
        "all": 12,
    }
    with pytest.raises(ValueError, match="accepted"):
        L.plan(shapes, "groot", "everything")
    with pytest.raises(ValueError, match="accepted"):
        L.role_of("x", "pi9")


# ---- ATM / OHB on planted toy attention --------------------------------------------------------------
class _ToyBlocks(nn.Module):
    """A stack of diffusers-style self-attention blocks with residuals (uses the shared attention)."""

    def __init__(self, depth=3, width=32, heads=4):
        super().__init__()
        from quantvla_core.models.attention import name_attention_modules
        from quantvla_core.models.layers import Attention

        self.blocks = nn.ModuleList(Attention(width, heads, width // heads) for _ in range(depth))
        for b in self.blocks:
            nn.init.normal_(b.to_q.weight, std=0.4)
            nn.init.normal_(b.to_k.weight, std=0.4)
        name_attention_modules(self)

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = x + b(x, mask=mask)
        return x


def _toy_runner(steps=3):
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(4, 10, 32, generator=g) for _ in range(steps)]
    mask = torch.ones(4, 1, 10, 10, dtype=torch.bool)
    mask[:, :, :, 7:] = False  # padded keys must not enter the statistics

    def run(model):
        for x in xs:
            model(x, mask)

    return run


def test_per_head_std_excludes_masked_entries():
    logits = torch.randn(2, 3, 4, 6)
    mask = torch.zeros(2, 1, 4, 6, dtype=torch.bool)
    mask[..., :3] = True
    logits_poisoned = logits.clone()
    logits_poisoned[..., 3:] = 1e6
    expect = logits[..., :3].reshape(2, 3, -1).std(-1, unbiased=False)
    torch.testing.assert_close(per_head_std(logits_poisoned, mask), expect)


def test_atm_alpha_rules():
    t = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    q = torch.tensor([1.0, 1.01, 0.5, 2.0, 0.8])
    a = atm_alpha(t, q)
    assert a[0] == 1 and a[1] == 1  # dead zone
    assert math.isclose(float(a[2]), 1.4) and math.isclose(float(a[3]), 0.7)  # clamps
    assert math.isclose(float(a[4]), 1 / 0.8, rel_tol=1e-5)  # multiply: sigma_T / sigma_Q


def test_atm_recovers_planted_per_head_logit_scale_drift():
    torch.manual_seed(0)
    teacher = _ToyBlocks()
    student = copy.deepcopy(teacher)
    drift = torch.tensor([[0.8, 1.0, 1.2, 0.9], [1.25, 0.85, 1.0, 1.1], [0.9, 1.15, 0.8, 1.3]])
    for b, d in zip(student.blocks, drift):
        scale_output_channels(b.to_q, d.repeat_interleave(8))
    run = _toy_runner()
    targets = [AttentionTarget(f"blocks.{i}", f"blocks.{i}.to_q") for i in range(3)]
    sig_t = collect_logit_std(teacher, run)
    alphas = calibrate_atm(student, run, targets, sig_t)
    for i, d in enumerate(drift):
        a = torch.tensor(alphas[f"blocks.{i}"], dtype=torch.float64)
        want = torch.where((1 / d - 1).abs() < 0.02, torch.ones(4), 1 / d)
        assert torch.allclose(a, want.double(), rtol=0.02), (i, a, want)
    # after ATM the student's logit spread matches the teacher's
    sig_s = collect_logit_std(student, run)
    for n in sig_t:
        assert torch.allclose(sig_s[n], sig_t[n], rtol=0.02)


def test_ohb_recovers_planted_output_energy_drift():
    torch.manual_seed(1)
    teacher = _ToyBlocks()
    student = copy.deepcopy(teacher)
    drift = [0.8, 1.0, 1.2]
    for b, d in zip(student.blocks, drift):
        scale_output_channels(b.to_out[0], d)
    run = _toy_runner()
    targets = [f"blocks.{i}.to_out.0" for i in range(3)]
    rms_t = collect_output_rms(teacher, run, targets)
    betas = calibrate_ohb(student, run, targets, rms_t)
    for i, d in enumerate(drift):
        want = 1.0 if abs(math.log(1 / d)) < 0.03 else 1 / d
        assert math.isclose(betas[targets[i]], want, rel_tol=0.02), (i, betas)
    rms_s = collect_output_rms(student, run, targets)
    for n in targets:
        assert math.isclose(rms_s[n], rms_t[n], rel_tol=0.02)


def test_ohb_beta_clamp_and_dead_zone():
    assert ohb_beta(1.0, 1.02) == 1.0
    assert math.isclose(ohb_beta(2.0, 1.0), math.exp(0.30))
    assert math.isclose(ohb_beta(1.0, 2.0), math.exp(-0.30))
    assert math.isclose(ohb_beta(1.1, 1.0), 1.1)
