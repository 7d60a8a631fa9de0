"""The GEMM epilogue's activation, gate/up pairs and residual add (issue "Faster than float",
item 2): every backend against the torch math contract, the fused CPU linear and the Triton
kernels (interpreter) within float rounding, and whole policies with the fusion on vs off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantvla_core.quant.qlinear as qlinear_module
from quantvla_core.models.layers import FeedForward, GatedMLP, RMSNorm
from quantvla_core.quant.qlinear import QuantLinear, concat_quant_linears, quant_backend, set_epilogue_fusion
from quantvla_core.quant.transforms import InputTransform, hadamard
from quantvla_kernels import cpu_fused, ops
from quantvla_kernels.packing import pack_int4
from quantvla_kernels.torch_math import finish_output


def _act(name, y):
    return F.gelu(y, approximate="tanh") if name == "gelu_tanh" else F.silu(y)


def _operands(m, n, k, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[0, 3] = 40.0  # an outlier channel
    xq, xs = ops.quantize_per_token(x, 8, backend="cpu")
    if bits == 8:
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        ws = torch.rand(n, generator=g) * 0.01
    else:
        wq = pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
        ws = torch.rand(n, k // group, generator=g) * 0.01 if group else torch.rand(n, generator=g) * 0.01
    bias = torch.randn(n, generator=g)
    return x, xq, xs, wq, ws, bias


def _gemm(bits, group, xq, xs, wq, ws, bias, **kw):
    if bits == 8:
        return ops.gemm_w8a8(xq, xs, wq, ws, bias, torch.float32, **kw)
    return ops.gemm_w4a8(xq, xs, wq, ws, group, bias, torch.float32, **kw)


EPILOGUES = [(None, False, True), ("silu", True, False), ("gelu_tanh", True, True), ("gelu_tanh", False, False)]


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 128)])
@pytest.mark.parametrize("act,gated,res", EPILOGUES)
def test_gemm_epilogue_matches_the_separate_ops(bits, group, act, gated, res):
    """cpu backend: exactly the plain GEMM followed by torch's activation / pair product / add
    (independently written here); triton (interpreter): within float rounding of it."""
    m, n, k = 17, 96, 256
    _, xq, xs, wq, ws, bias = _operands(m, n, k, bits, group)
    r = torch.randn(m, n // 2 if gated else n) if res else None
    plain = _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu")
    want = plain
    if act is not None:
        want = _act(act, plain[:, 0::2].contiguous()) * plain[:, 1::2].contiguous() if gated else _act(act, plain)
    if r is not None:
        want = want + r
    got = _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu", act=act, gated=gated, residual=r)
    assert torch.equal(got, want)
    tri = _gemm(bits, group, xq, xs, wq, ws, bias, backend="triton", act=act, gated=gated, residual=r)
    assert tri.shape == want.shape
    torch.testing.assert_close(tri, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("split", [1, 4])
def test_triton_epilogue_after_split_k_and_fused_quantization(split):
    """The split-K reduction kernel and the float-input linear (quantization inside the GEMM)
    apply the same epilogue."""
    m, n, k = 5, 64, 512
    x, xq, xs, wq, ws, bias = _operands(m, n, k, 8, None, seed=1)
    r = torch.randn(m, n // 2)
    want = finish_output(_gemm(8, None, xq, xs, wq, ws, bias, backend="cpu"), "silu", True, r)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, GROUP_M=1, num_warps=4, num_stages=1)
    got = ops.gemm_w8a8(
        xq, xs, wq, ws, bias, torch.float32, backend="triton", config=cfg, act="silu", gated=True, residual=r
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    fused = ops.linear_w8a8(
        x, wq, ws, bias, torch.float32, backend="triton", fuse=True, act="silu", gated=True, residual=r
    )
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_bad_epilogue_arguments_are_refused_with_what_is_accepted():
    _, xq, xs, wq, ws, bias = _operands(3, 96, 128, 8, None)
    with pytest.raises(ValueError, match="act must be None or one of"):
        ops.gemm_w8a8(xq, xs, wq, ws, act="relu")
    with pytest.raises(ValueError, match="gated=True needs an activation"):
        ops.gemm_w8a8(xq, xs, wq, ws, gated=True)
    with pytest.raises(ValueError, match="N must be even"):
        ops.gemm_w8a8(xq, xs, wq[:95], ws[:95], act="silu", gated=True)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(3, 48\)"):
        ops.gemm_w8a8(xq, xs, wq, ws, act="silu", gated=True, residual=torch.zeros(3, 96))


def _pair(w_bits=8, a_bits=8, k=256, n=96, rotate=True):
    t = (
        InputTransform(inv_smooth=torch.rand(k) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard")
        if rotate
        else None
    )
    layers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        layers.append(
            QuantLinear.from_linear(
                nn.Linear(k, n, bias=seed == 1),
                w_bits=w_bits,
                a_bits=a_bits,
                group_size=128 if w_bits == 4 else None,
                transform=t,
                clip_grid=(1.0,),
            )
        )
    return layers


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_pairs_layer_equals_gate_and_up_layers(w_bits, a_bits, dtype):
    """A gate/up pair fused with interleaved columns returns act(gate(x)) * up(x): on the CPU
    (compiled linear where built) within float rounding of the separate layers, the torch-op
    path exactly, and bf16 within one bf16 step."""
    gate, up = _pair(w_bits, a_bits)
    pair = concat_quant_linears([gate, up], pairs=True)
    assert pair is not None and pair.gated_pairs and pair.out_features == 2 * gate.out_features
    x = torch.randn(2, 9, 256).to(dtype)
    x[0, 0, 5] = 30.0
    for act in ("gelu_tanh", "silu"):
        with torch.inference_mode():
            want = _act(act, gate(x).float()) * up(x).float()
            got = pair(x, act=act)
            cpu_fused.set_enabled(False)  # the torch-op path: the same ops as separate layers
            try:
                exact = pair(x.float(), act=act)
                w32 = _act(act, gate(x.float())) * up(x.float())
            finally:
                cpu_fused.set_enabled(True)
        assert got.shape == (2, 9, gate.out_features) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
            assert torch.equal(exact, w32)
        else:
            torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))
    with pytest.raises(ValueError, match="call it with act="):
        pair(x)


def test_residual_in_the_epilogue_and_reference_backend():
    """forward(x, residual=r) is r + forward(x): exact in fp32 on the CPU, one bf16 rounding of
    the fp32 sum in bf16 (the unfused add rounds twice), and on the float64 reference backend
    (which adds it after its own GEMM) within fp32 rounding."""
    gate, _ = _pair()
    x, r = torch.randn(4, 256), torch.randn(4, 96)
    with torch.inference_mode():
        assert torch.equal(gate(x, residual=r), r + gate(x))
        xb, rb = x.bfloat16(), r.bfloat16()
        fused = gate(xb, residual=rb)
        assert fused.dtype == torch.bfloat16
        want = (rb.float() + gate(xb.float())).bfloat16()  # the fp32 sum, rounded once
        torch.testing.assert_close(fused.float(), want.float(), rtol=2**-7, atol=2**-7)
        with quant_backend("reference"):
            ref, plain = gate(x, residual=r), gate(x)
        assert ref.dtype == torch.float32
        torch.testing.assert_close(ref, r + plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        gate(x, residual=torch.zeros(4, 95))


def test_mlp_and_feedforward_fuse_and_step_aside_for_hooks():
    """GatedMLP / FeedForward with quantized layers: the same numbers as the layer-by-layer ops
    (within rounding), the pair layer is used, and a hook on down_proj sees down_proj's own
    output (the residual then is added outside)."""
    torch.manual_seed(0)
    mlp = GatedMLP(256, 96, "gelu_tanh")
    gate, up = _pair(rotate=False)
    mlp.gate_proj, mlp.up_proj = gate, up
    torch.manual_seed(3)
    mlp.down_proj = QuantLinear.from_linear(nn.Linear(96, 256), w_bits=8, a_bits=8, clip_grid=(1.0,))
    norm = RMSNorm(256)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        set_epilogue_fusion(False)
        try:
            plain = mlp.forward_normed(x, norm, residual=x)
        finally:
            set_epilogue_fusion(True)
        fused = mlp.forward_normed(x, norm, residual=x)
        assert "_fused_pairs" in mlp.__dict__ and mlp.__dict__["_fused_pairs"][3].gated_pairs
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
        seen = []
        h = mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        try:
            hooked = mlp(x, residual=x)
        finally:
            h.remove()
        assert len(seen) == 1
        torch.testing.assert_close(hooked - x, seen[0], rtol=0, atol=1e-5)
        ff = FeedForward(256, 96)
        for i, lin in ((0, ff.net[0].proj), (2, ff.net[2])):
            q = QuantLinear.from_linear(lin, w_bits=8, a_bits=8, clip_grid=(1.0,))
            if i == 0:
                ff.net[0].proj = q
            else:
                ff.net[2] = q
        set_epilogue_fusion(False)
        try:
            ff_plain = ff(x, residual=x)
        finally:
            set_epilogue_fusion(True)
        torch.testing.assert_close(ff(x, residual=x), ff_plain, rtol=1e-5, atol=1e-5 * float(ff_plain.abs().max()))


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
def test_policy_actions_with_and_without_epilogue_fusion(name, scheme):
    """Whole quantized policies: the fused epilogues change only float rounding (actions within
    1e-3 of the chunk's range), and pi0 / pi0.5 really build gate/up pair layers."""
    from test_quant_sibling_fusion import _policy_and_obs

    policy, obs = _policy_and_obs(name, scheme)
    pairs = []
    real = qlinear_module.concat_quant_linears

    def spy(layers, pairs_flag=False):
        pairs.append(pairs_flag)
        return real(layers, pairs_flag)

    qlinear_module.concat_quant_linears = spy
    try:
        fused = policy.predict(obs, seed=3).actions
    finally:
        qlinear_module.concat_quant_linears = real
    set_epilogue_fusion(False)
    try:
        plain = policy.predict(obs, seed=3).actions
    finally:
        set_epilogue_fusion(True)
    if policy.config.arch != "groot":
        assert any(pairs), "no gate/up pair layer was built"
    span = float(np.abs(plain).max())
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-3 * span)


def test_attention_output_projection_adds_the_residual_in_its_epilogue():
    """DecoderAttention.attend(..., residual=x) is x + attend(...): exact in fp32 (the add is the
    epilogue's last fp32 operation), and the fused add steps aside while o_proj is hooked."""
    from quantvla_core.config import DecoderConfig
    from quantvla_core.models.layers import DecoderAttention

    torch.manual_seed(0)
    cfg = DecoderConfig(width=128, depth=1, heads=4, kv_heads=2, head_dim=32, mlp=256)
    attn = DecoderAttention(cfg)
    attn.o_proj = QuantLinear.from_linear(attn.o_proj, w_bits=8, a_bits=8, clip_grid=(1.0,))
    q, k, v = torch.randn(1, 4, 6, 32), torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)
    x = torch.randn(1, 6, 128)
    with torch.inference_mode():
        plain = attn.attend(q, k, v, None)
        assert torch.equal(attn.attend(q, k, v, None, residual=x), x + plain)
        seen = []
        h = attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        try:
            hooked = attn.attend(q, k, v, None, residual=x)
        finally:
            h.remove()
        assert torch.equal(seen[0], plain) and torch.equal(hooked, x + plain)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
@pytest.mark.parametrize("split", [1, 4])
def test_residual_gate_in_the_epilogue(bits, group, split):
    """``residual + gate * y`` (pi0.5's gated residual): the cpu backend exactly the plain GEMM
    followed by torch's multiply and add; Triton (interpreter, with and without split-K, and
    the float-input linear) within float rounding."""
    m, n, k = 9, 64, 512
    x, xq, xs, wq, ws, bias = _operands(m, n, k, bits, group, seed=5)
    r, gate = torch.randn(m, n), torch.rand(n) * 2 - 1
    plain = _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu")
    want = r + plain * gate
    got = _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu", residual=r, residual_gate=gate)
    assert torch.equal(got, want)
    if bits == 8:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, GROUP_M=1, num_warps=4, num_stages=1)
    else:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, SPLIT_K=split, GROUP_M=1, num_warps=4, num_stages=1)
    tri = _gemm(bits, group, xq, xs, wq, ws, bias, backend="triton", config=cfg, residual=r, residual_gate=gate)
    torch.testing.assert_close(tri, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if bits == 8:
        lin = ops.linear_w8a8(
            x, wq, ws, bias, torch.float32, backend="triton", fuse=True, residual=r, residual_gate=gate
        )
        torch.testing.assert_close(lin, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="residual_gate scales the output before the residual is added"):
        _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu", residual_gate=gate)
    with pytest.raises(ValueError, match=r"residual_gate must have shape \(64,\)"):
        _gemm(bits, group, xq, xs, wq, ws, bias, backend="cpu", residual=r, residual_gate=gate[:3])


@pytest.mark.parametrize("w_bits", [8, 4])
def test_quantlinear_gated_residual_is_exact_in_fp32_on_the_cpu(w_bits):
    """QuantLinear(x, residual=r, residual_gate=g) is r + layer(x) * g bit for bit in fp32, through
    the compiled CPU linear and the torch-op path, with the norm fused or not; bf16 rounds once."""
    layer = _pair(w_bits=w_bits)[0]
    x, r, g = torch.randn(2, 17, 256), torch.randn(2, 17, 96), torch.rand(96) - 0.5
    norm_w = torch.rand(256) + 0.5
    with torch.inference_mode():
        want = r + layer(x) * g
        assert torch.equal(layer(x, residual=r, residual_gate=g), want)
        cpu_fused.set_enabled(False)  # the torch ops (their Hadamard rounds differently: own reference)
        try:
            assert torch.equal(layer(x, residual=r, residual_gate=g), r + layer(x) * g)
        finally:
            cpu_fused.set_enabled(True)
        normed_plain = layer.try_forward_rmsnorm(x, norm_w, 1e-6, 0.0)
        normed = layer.try_forward_rmsnorm(x, norm_w, 1e-6, 0.0, residual=r, residual_gate=g)
        if normed_plain is not None:
            assert torch.equal(normed, r + normed_plain * g)
        with quant_backend("reference"):
            torch.testing.assert_close(layer(x, residual=r, residual_gate=g), want, rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match=r"residual_gate must be \(96,\)"):
            layer(x, residual=r, residual_gate=g[:10])


def test_pi05_mlp_half_puts_the_gate_in_down_projs_epilogue():
    """pi0.5's MLP half, x + gate * mlp(adarms(x)), quantized: the gated residual runs inside
    down_proj (one call that gets residual and residual_gate), with the same fp32 numbers as the
    separate multiply-add (actions within float rounding of the fusion switched off)."""
    from test_quant_sibling_fusion import _policy_and_obs

    policy, obs = _policy_and_obs("tiny-pi05", "w8a8")
    calls = []
    real = QuantLinear.forward

    def spy(self, x, **kw):
        calls.append(kw.get("residual_gate") is not None)
        return real(self, x, **kw)

    QuantLinear.forward = spy
    try:
        fused = policy.predict(obs, seed=3).actions
    finally:
        QuantLinear.forward = real
    assert any(calls), "no quantized layer received the residual gate"
    set_epilogue_fusion(False)
    try:
        plain = policy.predict(obs, seed=3).actions
    finally:
        set_epilogue_fusion(True)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-3 * float(np.abs(plain).max()))
