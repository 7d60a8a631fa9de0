"""Integer kernels vs an independent numpy reference, on every backend that runs here.

The Triton kernels run under the interpreter (TRITON_INTERPRET=1) on the CPU, where int8 dots
are exact; outputs are fp32/fp16 because bf16 is unreliable in the interpreter.  Accumulators
are checked bit-exactly by running with unit scales (|acc| < 2^24, so fp32 holds it exactly).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import quantvla_kernels as qk  # noqa: E402
from quantvla_kernels.ops import triton_interpreting  # noqa: E402

TRITON_OK = triton_interpreting() or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
BACKENDS = ["reference", "cpu"] + (["triton"] if TRITON_OK else [])

# Small explicit tiles so the interpreter runs several programs, ragged edges and split-K.
W8_CFGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=3),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=2, SWAP=True),
]
W4_CFGS = [
    dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=1),
    dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=2),
    dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=1, SWAP=True),
    dict(BLOCK_M=32, BLOCK_N=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_K=2, SWAP=True),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _np_acc(x8: np.ndarray, w8: np.ndarray) -> np.ndarray:
    """Exact integer accumulation in int64."""
    return x8.astype(np.int64) @ w8.astype(np.int64).T


def _np_unpack(p: np.ndarray) -> np.ndarray:
    """Independent reading of the documented layout: 128-wide groups, split halves."""
    n, kb = p.shape
    k = 2 * kb
    out = np.zeros((n, k), dtype=np.int64)
    for k0 in range(0, k, 128):
        t = min(128, k - k0)
        b = p[:, k0 // 2 : k0 // 2 + t // 2].astype(np.int64)
        lo, hi = b & 15, b >> 4
        out[:, k0 : k0 + t // 2] = np.where(lo >= 8, lo - 16, lo)
        out[:, k0 + t // 2 : k0 + t] = np.where(hi >= 8, hi - 16, hi)
    return out


def _np_epilogue(acc, xs, ws, bias):
    y = acc.astype(np.float64) * xs.astype(np.float64)[:, None] * ws.astype(np.float64)[None, :]
    return y if bias is None else y + bias.astype(np.float64)[None, :]


def _np_grouped(x8, w8, xs, ws, gs, bias):
    y = np.zeros((x8.shape[0], w8.shape[0]))
    for g, k0 in enumerate(range(0, x8.shape[1], gs)):
        y += _np_acc(x8[:, k0 : k0 + gs], w8[:, k0 : k0 + gs]) * ws[None, :, g].astype(np.float64)
    y = y * xs.astype(np.float64)[:, None]
    return y if bias is None else y + bias.astype(np.float64)[None, :]


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _to(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


def _cfgs(backend, cfgs):
    return cfgs + [None] if backend == "triton" else [None]


# ----------------------------------------------------------------------------- W8A8
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (17, 33, 96), (5, 64, 64)])
def test_w8a8_exact_accumulator(backend, m, n, k):
    g = _gen(m * 1000 + n + k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    xq[0, :] = 127
    wq[0, :] = -127  # extreme product -127*127*K
    want = _np_acc(xq.numpy(), wq.numpy())
    for cfg in _cfgs(backend, W8_CFGS):
        out = _poisoned((m, n), torch.float32)
        x_, w_, o_ = _to(xq, wq, out)
        qk.gemm_w8a8(x_, torch.ones(m, device=DEV), w_, torch.ones(n, device=DEV), backend=backend, config=cfg, out=o_)
        got = o_.cpu().double().numpy()
        assert not np.isnan(got).any(), f"unwritten outputs with config {cfg}"
        assert np.array_equal(got, want), f"accumulator mismatch with config {cfg}"
    assert want[0, 0] == -127 * 127 * k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_w8a8_epilogue_scales_bias(backend, out_dtype):
    m, n, k = 7, 48, 160
    g = _gen(7)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    xs = torch.rand(m, generator=g) * 0.01 + 1e-3
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    want = _np_epilogue(_np_acc(xq.numpy(), wq.numpy()), xs.numpy(), ws.numpy(), bias.numpy())
    for cfg in _cfgs(backend, W8_CFGS):
        y = qk.gemm_w8a8(*_to(xq, xs, wq, ws, bias), out_dtype=out_dtype, backend=backend, config=cfg)
        assert y.dtype == out_dtype and y.shape == (m, n)
        rtol = 1e-5 if out_dtype == torch.float32 else 2e-3
        np.testing.assert_allclose(y.cpu().double().numpy(), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_w8a8_leading_dims_and_backends_agree():
    g = _gen(3)
    xq = torch.randint(-127, 128, (2, 3, 64), dtype=torch.int8, generator=g)
    xs = torch.rand(2, 3, generator=g)
    wq = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
    ws = torch.rand(24, generator=g)
    ys = [qk.gemm_w8a8(*_to(xq, xs, wq, ws), backend=b).cpu() for b in BACKENDS]
    assert ys[0].shape == (2, 3, 24)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


# ----------------------------------------------------------------------------- W4A8 / W4A4
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (19, 24, 256), (3, 17, 48)])
def test_w4a8_per_channel_exact(backend, m, n, k):
    g = _gen(m + n + k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    xq[0, :], w4[0, :] = -127, -8
    xq[-1, :], w4[-1, :] = 127, 7
    wp = qk.pack_int4(w4)
    want = _np_acc(xq.numpy(), _np_unpack(wp.numpy()))
    assert want[0, 0] == (127 * 8 * k if m > 1 else -127 * 8 * k)
    for cfg in _cfgs(backend, W4_CFGS):
        out = _poisoned((m, n), torch.float32)
        x_, w_, o_ = _to(xq, wp, out)
        qk.gemm_w4a8(x_, torch.ones(m, device=DEV), w_, torch.ones(n, device=DEV), backend=backend, config=cfg, out=o_)
        got = o_.cpu().double().numpy()
        assert not np.isnan(got).any()
        assert np.array_equal(got, want), f"accumulator mismatch with config {cfg}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [256, 200])
def test_w4a8_group128_epilogue(backend, k):
    m, n, gs = 5, 40, 128
    g = _gen(k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    wp = qk.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
    xs = torch.rand(m, generator=g) + 0.5
    ws = torch.rand(n, -(-k // gs), generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    want = _np_grouped(xq.numpy(), _np_unpack(wp.numpy()), xs.numpy(), ws.numpy(), gs, bias.numpy())
    for cfg in _cfgs(backend, W4_CFGS):
        out = _poisoned((m, n), torch.float32)
        qk.gemm_w4a8(*_to(xq, xs, wp, ws), group_size=gs, bias=bias.to(DEV), backend=backend, config=cfg, out=out)
        np.testing.assert_allclose(out.cpu().double().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _np_int_groups(w8: np.ndarray, mult: np.ndarray, gs: int) -> np.ndarray:
    """Codes times their group's integer multiplier, in int64 (independent of the kernels)."""
    out = w8.astype(np.int64).copy()
    for g, k0 in enumerate(range(0, w8.shape[1], gs)):
        out[:, k0 : k0 + gs] *= mult[:, g : g + 1].astype(np.int64)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k,gs", [(1, 40, 256, 128), (19, 24, 512, 256), (70, 33, 384, 128)])
def test_w4a8_integer_group_scales_exact(backend, m, n, k, gs):
    """Integer group scales: one int32 accumulator of x * (code * mult) over all of K (checked
    bit-exactly with unit scales, extremes included: 127 x 7 x 18 per element), then the
    per-channel epilogue; W4A4 and the float-input linear take the same multipliers."""
    g = _gen(m + n + k + gs)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w4 = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    mult = torch.randint(1, 19, (n, k // gs), dtype=torch.uint8, generator=g)
    xq[0, :], w4[0, :], mult[0, :] = -127, 7, 18
    wp = qk.pack_int4(w4)
    w_eff = _np_int_groups(_np_unpack(wp.numpy()), mult.numpy(), gs)
    want = _np_acc(xq.numpy(), w_eff)
    assert want[0, 0] == -127 * 7 * 18 * k
    xs = torch.rand(m, generator=g) + 0.5
    ws = torch.rand(n, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    want_epi = _np_epilogue(want, xs.numpy(), ws.numpy(), bias.numpy())
    for cfg in _cfgs(backend, W4_CFGS):
        out = _poisoned((m, n), torch.float32)
        x_, w_, m_, o_ = _to(xq, wp, mult, out)
        ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
        qk.gemm_w4a8(x_, ones_m, w_, ones_n, gs, backend=backend, config=cfg, out=o_, group_mult=m_)
        assert np.array_equal(o_.cpu().double().numpy(), want), f"accumulator mismatch with config {cfg}"
        y = qk.gemm_w4a8(*_to(xq, xs, wp, ws), gs, bias.to(DEV), backend=backend, config=cfg, group_mult=m_)
        np.testing.assert_allclose(y.cpu().double().numpy(), want_epi, rtol=1e-5, atol=1e-5 * np.abs(want_epi).max())
    # W4A4: packed int4 activations, same multipliers
    x4 = torch.randint(-7, 8, (m, k), dtype=torch.int8, generator=g)
    y4 = qk.gemm_w4a4(*_to(qk.pack_int4(x4), xs, wp, ws), gs, backend=backend, group_mult=mult.to(DEV))
    want4 = _np_epilogue(_np_acc(x4.numpy(), w_eff), xs.numpy(), ws.numpy(), None)
    np.testing.assert_allclose(y4.cpu().double().numpy(), want4, rtol=1e-5, atol=1e-5 * np.abs(want4).max())
    # float input: quantize_per_token then the GEMM, fused or not, same numbers
    xf = torch.randn(m, k, generator=g)
    lin = qk.linear_w4a8(*_to(xf, wp, ws), gs, bias.to(DEV), backend=backend, group_mult=mult.to(DEV))
    q8, s8 = qk.quantize_per_token(xf.to(DEV), 8, backend=backend)
    two = qk.gemm_w4a8(q8, s8, *_to(wp, ws), gs, bias.to(DEV), backend=backend, group_mult=mult.to(DEV))
    assert torch.equal(lin, two)


def test_integer_group_scales_clear_errors():
    xq = torch.zeros(2, 256, dtype=torch.int8)
    wp = torch.zeros(4, 128, dtype=torch.uint8)
    ws, mult = torch.ones(4), torch.ones(4, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="group_mult must have dtype"):
        qk.gemm_w4a8(xq, torch.ones(2), wp, ws, 128, group_mult=mult.to(torch.int32), backend="cpu")
    with pytest.raises(ValueError, match=r"group_mult must have shape \(N, K / group_size\) = \(4, 2\)"):
        qk.gemm_w4a8(xq, torch.ones(2), wp, ws, 128, group_mult=mult[:, :1], backend="cpu")
    with pytest.raises(ValueError, match="group_mult needs a group_size that divides K"):
        qk.gemm_w4a8(xq, torch.ones(2), wp, ws, None, group_mult=mult, backend="cpu")
    with pytest.raises(ValueError, match=r"per-channel ws must have shape \(4,\)"):
        qk.gemm_w4a8(xq, torch.ones(2), wp, torch.ones(4, 2), 128, group_mult=mult, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grouped", [False, True])
def test_w4a4_exact_and_grouped(backend, grouped):
    m, n, k = 18, 20, 200
    g = _gen(11 + grouped)
    x4 = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=g)
    w4 = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    x4[0, :], w4[0, :] = -8, -8
    xp, wp = qk.pack_int4(x4), qk.pack_int4(w4)
    xs = torch.ones(m) if not grouped else torch.rand(m, generator=g) + 0.5
    ws = torch.ones(n) if not grouped else torch.rand(n, 2, generator=g) + 0.5
    gs = 128 if grouped else None
    acc = _np_acc(_np_unpack(xp.numpy()), _np_unpack(wp.numpy()))
    assert acc[0, 0] == 64 * k
    for cfg in _cfgs(backend, W4_CFGS):
        out = _poisoned((m, n), torch.float16)
        qk.gemm_w4a4(*_to(xp, xs, wp, ws), group_size=gs, backend=backend, config=cfg, out=out)
        got = out.cpu().double().numpy()
        assert not np.isnan(got).any()
        want = (
            acc
            if not grouped
            else _np_grouped(_np_unpack(xp.numpy()), _np_unpack(wp.numpy()), xs.numpy(), ws.numpy(), 128, None)
        )
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


# ----------------------------------------------------------------------------- quantization
def _np_quant(x, bits, norm_w=None, eps=1e-6, offset=0.0, inv_s=None, perm=None, rot=None):
    """The documented math in float32 numpy: returns (int codes (M, K), scale (M,))."""
    qmax = 127 if bits == 8 else 7
    x = x.astype(np.float32)
    v = x.copy()
    if norm_w is not None:
        v = v * (np.float32(offset) + norm_w.astype(np.float32))[None, :]
    if inv_s is not None:
        v = v * inv_s.astype(np.float32)[None, :]
    if perm is not None:
        v = v[:, perm]
    if rot is not None:
        b = rot.shape[-1]
        blocks = v.reshape(v.shape[0], -1, b)
        r = np.broadcast_to(rot, (blocks.shape[1], b, b)) if rot.ndim == 2 else rot
        v = np.einsum("mgb,gbc->mgc", blocks, r.astype(np.float32)).reshape(v.shape)
    if norm_w is not None:
        rstd = np.float32(1.0) / np.sqrt((x * x).sum(1) / np.float32(x.shape[1]) + np.float32(eps))
        v = v * rstd[:, None]
    amax = np.abs(v).max(1)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1.0)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(qmax) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.round(v * inv[:, None]), -qmax, qmax).astype(np.int64)
    return q, scale


def _codes(q, bits):
    q = q.cpu()
    return _np_unpack(q.numpy()) if bits == 4 else q.numpy().astype(np.int64)


def _check_quant(q, s, want_q, want_s, bits, exact):
    got = _codes(q, bits)
    assert got.shape == want_q.shape
    if exact:
        assert np.array_equal(got, want_q)
        np.testing.assert_array_equal(s.cpu().numpy(), want_s)
    else:  # reductions in another order: codes may move by one step at rounding boundaries
        assert np.abs(got - want_q).max() <= 1
        assert (got == want_q).mean() > 0.98
        np.testing.assert_allclose(s.cpu().numpy(), want_s, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m,k", [(1, 200), (21, 96), (6, 2050)])
def test_quantize_per_token(backend, bits, m, k):
    g = _gen(m * k + bits)
    x = torch.randn(m, k, generator=g) * 3
    x[0, 5] = 40.0  # an outlier channel
    if m > 1:
        x[1] = 0.0  # all-zero row: scale 1, codes 0
    inv_s = torch.rand(k, generator=g) + 0.5
    want_q, want_s = _np_quant(x.numpy(), bits, inv_s=inv_s.numpy())
    kq = k // 2 if bits == 4 else k
    qd = torch.uint8 if bits == 4 else torch.int8
    out = (torch.full((m, kq), 0x5A, dtype=qd, device=DEV), _poisoned((m,), torch.float32))
    q, s = qk.quantize_per_token(*_to(x), bits=bits, inv_smooth=inv_s.to(DEV), backend=backend, out=out)
    assert q is out[0] and s is out[1]
    _check_quant(q, s, want_q, want_s, bits, exact=True)
    if m > 1:
        assert s[1].item() == 1.0 and not _codes(q, bits)[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_rmsnorm_quantize_fused_vs_unfused(backend, bits):
    m, k = 9, 192
    g = _gen(bits)
    x = (torch.randn(m, k, generator=g) * 4).to(torch.float16)
    w = torch.randn(k, generator=g) * 0.1
    inv_s = torch.rand(k, generator=g) + 0.5
    # Unfused reference: Gemma RMSNorm (x * rstd * (1 + w)) in float64, then smoothing, then
    # plain per-token absmax quantization.
    xd = x.double()
    normed = xd / torch.sqrt((xd * xd).mean(1, keepdim=True) + 1e-6) * (1.0 + w.double())
    v = (normed * inv_s.double()).numpy()
    amax = np.abs(v).max(1)
    qmax = 127 if bits == 8 else 7
    want_q = np.clip(np.round(v / (amax / qmax)[:, None]), -qmax, qmax).astype(np.int64)
    q, s = qk.rmsnorm_quantize(*_to(x, w), 1e-6, bits=bits, offset=1.0, inv_smooth=inv_s.to(DEV), backend=backend)
    _check_quant(q, s, want_q, (amax / qmax).astype(np.float32), bits, exact=False)
    # And the kernel's own documented arithmetic order, element for element.
    q2, s2 = _np_quant(x.float().numpy(), bits, norm_w=w.numpy(), offset=1.0, inv_s=inv_s.numpy())
    _check_quant(q, s, q2, s2, bits, exact=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bits,k,b,per_block", [(8, 192, 64, False), (8, 96, 32, True), (4, 256, 64, True), (4, 160, 16, False)]
)
def test_quantize_with_perm_and_rotation(backend, bits, k, b, per_block):
    m = 17
    g = _gen(k + b)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(k, generator=g) * 0.1 + 1.0
    inv_s = torch.rand(k, generator=g) + 0.5
    perm = torch.randperm(k, generator=g)
    nb = k // b if per_block else 1
    rot = torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))[0].float()
    rot = rot if per_block else rot[0]
    want_q, want_s = _np_quant(
        x.numpy(), bits, norm_w=w.numpy(), inv_s=inv_s.numpy(), perm=perm.numpy(), rot=rot.numpy()
    )
    q, s = qk.rmsnorm_quantize(
        *_to(x, w), 1e-6, bits=bits, inv_smooth=inv_s.to(DEV), perm=perm.to(DEV), rotation=rot.to(DEV), backend=backend
    )
    _check_quant(q, s, want_q, want_s, bits, exact=False)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_linear_close_to_float(backend):
    """quantize -> integer GEMM -> epilogue approximates the float layer within int8 noise."""
    m, n, k = 6, 32, 256
    g = _gen(5)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / 16
    ws = w.abs().amax(1) / 127
    wq = torch.clamp(torch.round(w / ws[:, None]), -127, 127).to(torch.int8)
    xq, xs = qk.quantize_per_token(x.to(DEV), backend=backend)
    y = qk.gemm_w8a8(xq, xs, *_to(wq, ws), backend=backend).cpu()
    ref = x @ w.T
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    i8 = torch.zeros((4, 64), dtype=torch.int8)
    one = torch.ones(4)
    with pytest.raises(TypeError, match="int8"):
        qk.gemm_w8a8(i8.float(), one, i8, one)
    with pytest.raises(ValueError, match=r"wq must be \(N, K\)"):
        qk.gemm_w8a8(i8, one, torch.zeros((4, 32), dtype=torch.int8), one)
    with pytest.raises(ValueError, match="one scale per row"):
        qk.gemm_w8a8(i8, torch.ones(3), i8, one)
    with pytest.raises(ValueError, match="out_dtype"):
        qk.gemm_w8a8(i8, one, i8, one, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        qk.gemm_w8a8(i8, one, i8, one, backend="cuda")
    with pytest.raises(ValueError, match="group-wise ws must have shape"):
        qk.gemm_w4a8(i8, one, torch.zeros((4, 32), dtype=torch.uint8), torch.ones(4, 2), group_size=128)
    with pytest.raises(ValueError, match="wq_packed must be"):
        qk.gemm_w4a8(i8, one, torch.zeros((4, 64), dtype=torch.uint8), one)
    with pytest.raises(ValueError, match="bias must have shape"):
        qk.gemm_w8a8(i8, one, i8, one, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="out must be"):
        qk.gemm_w8a8(i8, one, i8, one, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        qk.quantize_per_token(torch.randn(2, 8), bits=3)
    with pytest.raises(ValueError, match="K must be even"):
        qk.quantize_per_token(torch.randn(2, 7), bits=4)
    with pytest.raises(ValueError, match="multiple of the rotation block"):
        qk.quantize_per_token(torch.randn(2, 48), rotation=torch.eye(32))
    with pytest.raises(ValueError, match="half-width"):
        qk.quantize_per_token(torch.randn(2, 64), bits=4, rotation=torch.eye(64))
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        qk.rmsnorm_quantize(torch.randn(2, 8), torch.ones(7), 1e-6)
    if TRITON_OK:
        with pytest.raises(ValueError, match="multiple of 128"):
            qk.gemm_w4a8(
                i8, one, torch.zeros((4, 32), dtype=torch.uint8), torch.ones(4, 2), group_size=32, backend="triton"
            )


def test_backend_scope_and_dispatch():
    assert qk.resolve_backend(None, torch.device("cpu")) == "cpu"
    assert qk.resolve_backend(None, torch.device("cuda", 0)) == "triton"
    with qk.backend_scope("reference"):
        assert qk.resolve_backend(None, torch.device("cpu")) == "reference"
        assert qk.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert qk.resolve_backend(None, torch.device("cpu")) == "cpu"


def test_config_table_small_m_splits_long_k():
    """The fixed table (used during CUDA-graph capture) splits K for short-N, long-K layers."""
    h100 = dict(device=torch.device("cpu"), num_sms=132)
    cfg = qk.gemm_config("w8a8", 1, 2048, 16384, **h100)
    assert cfg["BLOCK_M"] == 16 and cfg["SPLIT_K"] > 1
    assert qk.gemm_config("w4a8", 1, 2048, 16384, **h100)["SPLIT_K"] > 1
    big = qk.gemm_config("w8a8", 816, 16384, 2048, **h100)
    assert big["BLOCK_M"] == 128 and big["SPLIT_K"] == 1
    assert qk.m_bucket(1) == 16 and qk.m_bucket(50) == 64 and qk.m_bucket(816) == 1024


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device with compiled (not interpreted) Triton")
@pytest.mark.parametrize("m,n,k", [(1, 2048, 16384), (50, 1024, 4096), (300, 2560, 2048)])
def test_cuda_graph_capture_bf16_layer_shapes(m, n, k):
    """The fixed config table runs inside CUDA-graph capture and replays bit-identically;
    bf16 output at real layer shapes stays within bf16 rounding of the exact result."""
    g = _gen(m + n)
    x = torch.randn(m, k, generator=g).to(DEV, torch.bfloat16)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(DEV)
    w4 = qk.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)).to(DEV)
    ws = (torch.rand(n, generator=g) * 1e-3).to(DEV)
    wsg = (torch.rand(n, k // 128, generator=g) * 1e-3).to(DEV)

    def step():
        xq, xs = qk.quantize_per_token(x)
        return (
            qk.gemm_w8a8(xq, xs, wq, ws, out_dtype=torch.bfloat16),
            qk.gemm_w4a8(xq, xs, w4, wsg, 128, out_dtype=torch.bfloat16),
            qk.linear_w8a8(x, wq, ws),
            qk.linear_w4a8(x, w4, wsg, 128),
        )

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
    xq, xs = qk.quantize_per_token(x, backend="reference")
    ref8 = qk.gemm_w8a8(xq, xs, wq, ws, backend="reference")
    ref4 = qk.gemm_w4a8(xq, xs, w4, wsg, 128, backend="reference")
    for y, ref in ((eager[0], ref8), (eager[1], ref4), (eager[2], ref8), (eager[3], ref4)):
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, float(err)


# ----------------------------------------------------------------------------- fused linears
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (13, 33, 256)])
def test_linear_fused_quant_equals_quantize_then_gemm(backend, m, n, k):
    """Quantizing inside the GEMM gives bit-identical results to the two-step path."""
    g = _gen(m + k)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.float16)
    x[0, 3] = 30.0
    inv_s = torch.rand(k, generator=g) + 0.5
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01
    wp = qk.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g))
    wsg = torch.rand(n, -(-k // 128), generator=g) * 0.01
    bias = torch.randn(n, generator=g)
    x, inv_s, wq, ws, wp, wsg, bias = _to(x, inv_s, wq, ws, wp, wsg, bias)
    xq, xs = qk.quantize_per_token(x, inv_smooth=inv_s, backend=backend)
    want8 = qk.gemm_w8a8(xq, xs, wq, ws, bias, torch.float32, backend=backend)
    want4 = qk.gemm_w4a8(xq, xs, wp, wsg, 128, bias, torch.float32, backend=backend)
    for cfg8, cfg4 in zip(_cfgs(backend, W8_CFGS), _cfgs(backend, W4_CFGS)):
        fuse = backend == "triton"
        out = _poisoned((m, n), torch.float32)
        y8 = qk.linear_w8a8(
            x, wq, ws, bias, torch.float32, inv_smooth=inv_s, backend=backend, config=cfg8, fuse=fuse, out=out
        )
        assert y8 is out and torch.equal(y8, want8), f"w8a8 fused mismatch with {cfg8}"
        y4 = qk.linear_w4a8(
            x, wp, wsg, 128, bias, torch.float32, inv_smooth=inv_s, backend=backend, config=cfg4, fuse=fuse
        )
        torch.testing.assert_close(y4, want4, rtol=1e-6, atol=1e-6 * float(want4.abs().max()))
    assert qk.linear_w8a8(x, wq, ws, backend=backend).dtype == torch.float16


def test_tuned_configs_round_trip_through_json(tmp_path):
    """A tuning run's configs (benchmark JSON) load back and steer the Triton launch."""
    from quantvla_kernels import ops

    cfg = dict(
        kind="w8a8",
        m_bucket=16,
        N=40,
        K=200,
        BLOCK_M=16,
        BLOCK_N=16,
        BLOCK_K=32,
        GROUP_M=1,
        SPLIT_K=2,
        num_warps=4,
        num_stages=2,
    )
    path = tmp_path / "results.json"
    path.write_text(__import__("json").dumps({"tuned_configs": [cfg]}))
    saved = dict(ops._TUNED)
    try:
        assert qk.load_tuned_configs(path) == 1
        assert any(c["N"] == 40 and c["SPLIT_K"] == 2 for c in qk.tuned_configs())
        picked = ops._pick_config("w8a8", 3, 40, 200, torch.device("cpu"), run=None)
        assert picked["SPLIT_K"] == 2 and picked["BLOCK_N"] == 16
        if TRITON_OK:
            g = _gen(1)
            xq = torch.randint(-127, 128, (3, 200), dtype=torch.int8, generator=g)
            wq = torch.randint(-127, 128, (40, 200), dtype=torch.int8, generator=g)
            y = qk.gemm_w8a8(*_to(xq, torch.ones(3), wq, torch.ones(40)), backend="triton")
            assert np.array_equal(y.cpu().double().numpy(), _np_acc(xq.numpy(), wq.numpy()))
        with pytest.raises(ValueError, match="malformed"):
            qk.load_tuned_configs([dict(kind="w9a9", m_bucket=16, N=1, K=1)])
    finally:
        ops._TUNED.clear()
        ops._TUNED.update(saved)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_rows_longer_than_one_tile(backend):
    """K > 16384 takes the two-pass kernel (statistics, then codes) instead of the single tile."""
    m, k = 3, 16400
    g = _gen(16400)
    x = torch.randn(m, k, generator=g)
    x[2, -1] = 50.0  # the absmax sits in the last, partial tile
    w = torch.randn(k, generator=g) * 0.1
    want_q, want_s = _np_quant(x.numpy(), 8)
    q, s = qk.quantize_per_token(*_to(x), backend=backend)
    _check_quant(q, s, want_q, want_s, 8, exact=True)
    want_q, want_s = _np_quant(x.numpy(), 8, norm_w=w.numpy(), offset=1.0)
    q, s = qk.rmsnorm_quantize(*_to(x, w), 1e-6, offset=1.0, backend=backend)
    _check_quant(q, s, want_q, want_s, 8, exact=False)
