"""The fast per-linear paths of issue 7 (rotated quantization, direct fp16/bf16 I/O) against the
former paths and an independent numpy reference, under the Triton interpreter on the CPU.

* rotation_kernel="row" (one program per token, rotation as one reshaped dot) must give the
  same codes and scales as the tile kernel ("tile", also the fallback) and the torch path.
* QuantLinear's direct I/O (kernels read fp16/bf16, GEMM writes the model dtype) must give the
  same outputs as x.float() -> kernels -> .to(dtype).  The interpreter rounds fp32 -> bf16 by
  truncation (CUDA rounds to nearest even, as torch does), so bf16 outputs of the Triton backend
  are compared within one bf16 step here; fp16 and the cpu backend are compared exactly.
* rotation_precision="tf32" is GPU-only (the interpreter computes fp32); its effect on the
  codes is bounded with a torch emulation of tf32 operand rounding.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import quantvla_kernels as qk  # noqa: E402
from quantvla_kernels import quantize as kquant  # noqa: E402 - owns the row-kernel launcher
from quantvla_kernels.ops import triton_interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1 (CPU run)")

from test_kernels_ops import _codes, _np_quant  # noqa: E402 - the independent numpy references


@pytest.fixture
def row_spy(monkeypatch):
    """Counts launches of the row kernel (so a silent fallback to the tile kernel fails)."""
    calls = []
    real = kquant._launch_row_quant

    def spy(*a, **kw):
        calls.append(a[1].shape)
        return real(*a, **kw)

    monkeypatch.setattr(kquant, "_launch_row_quant", spy)
    return calls


def _same_quant(q1, s1, q2, s2, bits):
    """Two quantizations of the same rotated input agree: scales to a few fp32 ulps and codes to
    at most one step on a few elements.  Not bit for bit: the rotation is a dot whose summation
    order belongs to the BLAS doing it (numpy's OpenBLAS in the interpreter, MKL / oneDNN in
    torch, and each picks kernels by CPU: OPENBLAS_CORETYPE=Haswell on AMD EPYC changes them),
    so a rotated value can differ in its last bit and a code at a rounding boundary by one."""
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    a, b = _codes(q1, bits), _codes(q2, bits)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.995


def _same_output(y, ref, min_equal=0.5):
    """Linear outputs from quantizations that agree as _same_quant does: most are equal, the
    others move by at most a few code steps (a small fraction of the output range)."""
    y, ref = y.float(), ref.float()
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    assert (y == ref).float().mean() >= min_equal


def _hadamard(b):
    from quantvla_core.quant.transforms import hadamard

    return hadamard(b).to(torch.float32)


# K 2048 / 8192 run one chunk (SINGLE) / two chunks of 4096 (two passes); 4-bit 256 pads to 2048
@pytest.mark.parametrize(
    "bits,k,b,norm",
    [
        (8, 256, 64, False),
        (8, 2048, 64, True),
        (8, 8192, 64, False),
        (8, 96, 32, True),
        (8, 128, 16, False),
        (4, 256, 64, True),
        (4, 8192, 64, False),
        (4, 384, 32, False),
    ],
)
def test_row_kernel_matches_tile_kernel_torch_and_numpy(row_spy, bits, k, b, norm):
    m = 5
    g = torch.Generator().manual_seed(k + b + bits)
    x = torch.randn(m, k, generator=g) * 2
    x[0, 3] = 60.0  # outlier
    x[1] = 0.0  # zero row: scale 1, codes 0
    inv_s = torch.rand(k, generator=g) + 0.5
    perm = torch.randperm(k, generator=g)
    rot = _hadamard(b) if b == 64 else torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))[0].float()
    w = torch.randn(k, generator=g) * 0.1 if norm else None

    def run(kind, backend):
        if norm:
            return qk.rmsnorm_quantize(
                x,
                w,
                1e-6,
                bits=bits,
                offset=1.0,
                inv_smooth=inv_s,
                rotation=rot,
                perm=perm,
                backend=backend,
                rotation_kernel=kind,
            )
        return qk.quantize_per_token(x, bits, inv_s, rot, perm=perm, backend=backend, rotation_kernel=kind)

    q_row, s_row = run("row", "triton")
    assert len(row_spy) == 1
    q_tile, s_tile = run("tile", "triton")
    assert len(row_spy) == 1
    q_cpu, s_cpu = run("row", "cpu")
    _same_quant(q_row, s_row, q_tile, s_tile, bits)
    if not norm:  # (with a norm, sum(x^2) is reduced in another order than torch's)
        _same_quant(q_row, s_row, q_cpu, s_cpu, bits)
    want_q, want_s = _np_quant(
        x.numpy(),
        bits,
        norm_w=None if w is None else w.numpy(),
        offset=1.0 if norm else 0.0,
        inv_s=inv_s.numpy(),
        perm=perm.numpy(),
        rot=rot.numpy(),
    )
    got = _codes(q_row, bits)
    assert np.abs(got - want_q).max() <= 1 and (got == want_q).mean() > 0.98
    assert (got[1] == 0).all() and s_row[1] == 1.0
    np.testing.assert_allclose(s_row.numpy(), want_s, rtol=1e-5)
    assert np.abs(got).max() == (127 if bits == 8 else 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_kernel_reads_half_inputs_as_their_fp32_values(row_spy, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 1024, generator=g) * 3).to(dtype)
    inv_s = torch.rand(1024, generator=g) + 0.5
    for bits in (8, 4):
        q1, s1 = qk.quantize_per_token(x, bits, inv_s, _hadamard(64), backend="triton")
        q2, s2 = qk.quantize_per_token(x.float(), bits, inv_s, _hadamard(64), backend="cpu")
        _same_quant(q1, s1, q2, s2, bits)
    assert len(row_spy) == 2


def test_row_kernel_not_used_where_it_does_not_apply(row_spy):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 192, generator=g)
    per_block = torch.linalg.qr(torch.randn(3, 64, 64, generator=g, dtype=torch.float64))[0].float()
    q, s = qk.quantize_per_token(x, 8, None, per_block, backend="triton")  # (K/B, B, B): tile kernel
    assert torch.equal(q, qk.quantize_per_token(x, 8, None, per_block, backend="cpu")[0])
    qk.quantize_per_token(x, 8, None, _hadamard(8), backend="triton")  # B < 16: tile kernel
    qk.quantize_per_token(torch.randn(3, 192, generator=g), 4, None, _hadamard(32), backend="triton")  # K % 128
    assert row_spy == []


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_rotation_options_reject_unknown_values(backend):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"rotation_kernel must be one of \('row', 'tile'\), got 'fast'"):
        qk.quantize_per_token(x, 8, None, _hadamard(64), backend=backend, rotation_kernel="fast")
    with pytest.raises(ValueError, match=r"rotation_precision must be one of .*'tf32x3'\), got 'bf16'"):
        qk.rmsnorm_quantize(
            x, torch.ones(64), 1e-6, 8, rotation=_hadamard(64), backend=backend, rotation_precision="bf16"
        )


@pytest.mark.parametrize("prec", ["tf32", "tf32x3"])
def test_fast_rotation_precisions_run_and_equal_fp32_in_the_interpreter(row_spy, prec):
    """The interpreter computes every input_precision in fp32: the variants compile and, here,
    give the exact codes (the CUDA effect of tf32 is bounded by the emulation test below)."""
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(5))
    want = qk.quantize_per_token(x, 8, None, _hadamard(64), backend="cpu")
    for kind in ("row", "tile"):
        q, s = qk.quantize_per_token(
            x, 8, None, _hadamard(64), backend="triton", rotation_kernel=kind, rotation_precision=prec
        )
        _same_quant(q, s, want[0], want[1], 8)
    assert len(row_spy) == 1


def _tf32(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> tf32 operand rounding as the tensor cores see it (10-bit mantissa, ties away)."""
    bits = v.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("bits,max_flip", [(8, 0.02), (4, 0.003)])
def test_tf32_rotation_moves_few_codes_by_at_most_one(bits, max_flip):
    """Model of rotation_precision="tf32" on CUDA: the Hadamard entries (+-1/8) are exact in
    tf32, the rotated input is rounded to tf32 before an fp32-accumulated dot.  Activations with
    outlier channels (what smoothing leaves) over 4096 channels."""
    g = torch.Generator().manual_seed(6)
    m, k = 64, 4096
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    r = _hadamard(64)
    assert torch.equal(_tf32(r), r)
    exact = qk.quantize_per_token(x, bits, None, r, backend="cpu")
    # quantize_per_token(rotation=R) on tf32(x) is exactly "tf32 operands, fp32 dot"
    fast = qk.quantize_per_token(_tf32(x), bits, None, r, backend="cpu")
    a, b = _codes(exact[0], bits), _codes(fast[0], bits)
    flips = (a != b).mean()
    assert np.abs(a - b).max() <= 1
    assert 0 < flips < max_flip
    torch.testing.assert_close(fast[1], exact[1], rtol=2e-3, atol=0)


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantlinear_direct_io_matches_the_cast_path(monkeypatch, row_spy, w_bits, a_bits, dtype):
    from quantvla_core.quant.qlinear import QuantLinear
    from quantvla_core.quant.transforms import InputTransform

    g = torch.Generator().manual_seed(w_bits * 10 + a_bits)
    lin = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(96, generator=g))
    t = InputTransform(torch.rand(256, generator=g) + 0.5, None, _hadamard(64), "hadamard")
    ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, transform=t).to(dtype)
    x = (torch.randn(3, 7, 256, generator=g) * 2).to(dtype)
    seen = []
    real = {n: getattr(qk, n) for n in ("gemm_w8a8", "gemm_w4a8", "gemm_w4a4")}
    for n, f in real.items():
        monkeypatch.setattr(qk, n, lambda *a, _f=f, **kw: seen.append((a[0].dtype, kw["out_dtype"])) or _f(*a, **kw))
    out = {}
    for backend in ("cpu", "triton"):
        ql.backend = backend
        # "direct": the model-dtype input as it is; "cast": the same values as fp32, whose fp32
        # output is then rounded to the model dtype (what the layer computed before direct I/O)
        for path, xin in (("direct", x), ("cast", x.float())):
            y = ql._forward_kernels(xin.reshape(-1, 256), backend) if backend == "cpu" else ql(xin).reshape(-1, 96)
            out[backend, path] = y
    assert seen[0][1] == dtype and seen[1][1] == torch.float32  # the GEMM wrote the model dtype
    assert out["cpu", "direct"].dtype == dtype and out["triton", "direct"].dtype == dtype
    ref = out["cpu", "cast"].to(dtype)
    assert torch.equal(out["cpu", "direct"], ref)
    _same_output(out["triton", "cast"].to(dtype), ref)  # the rotation's dot: see _same_quant
    if dtype == torch.float16:
        _same_output(out["triton", "direct"], out["triton", "cast"].to(dtype))
    else:  # interpreter truncates fp32 -> bf16: about half the values are one bf16 step lower
        _same_output(out["triton", "direct"], ref, min_equal=0.25)
    assert len(row_spy) == 2  # the triton forwards quantized through the row kernel


def _np_adaptive_quant(x, bits, w, shift, eps, inv_s, perm, rot):
    """Adaptive norm then quantization, written out in float64 numpy:
    v = rot(perm((x * rstd * w + shift) * inv_s)), codes = round(v * qmax / absmax(v))."""
    qmax = 127 if bits == 8 else 7
    x = x.astype(np.float64)
    rstd = 1.0 / np.sqrt((x * x).mean(1) + eps)
    v = (x * rstd[:, None] * w.astype(np.float64) + shift.astype(np.float64)) * inv_s.astype(np.float64)
    v = v[:, perm]
    b = rot.shape[-1]
    v = (v.reshape(v.shape[0], -1, b) @ rot.astype(np.float64)).reshape(v.shape)
    amax = np.abs(v).max(1)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.round(v * np.where(amax > 0, qmax / np.where(amax > 0, amax, 1), 0)[:, None]), -qmax, qmax)
    return q.astype(np.int64), scale


# K 1024 one chunk, 8192 two chunks of 4096 (the chunked passes); 4-bit in both
@pytest.mark.parametrize("bits,k,b", [(8, 1024, 64), (8, 8192, 32), (4, 1024, 64), (4, 8192, 16), (8, 96, 32)])
def test_row_kernel_with_an_adaptive_norm_shift(row_spy, bits, k, b):
    """rmsnorm_quantize(..., norm_shift=): pi0.5's adaRMS (w = 1 + scale, offset 0, + shift)
    in the row kernel, against the torch path and a float64 numpy reference; the shift is
    added before smoothing, permutation and rotation, so absmax is taken after it."""
    m = 4
    g = torch.Generator().manual_seed(k + b + bits + 1)
    x = torch.randn(m, k, generator=g) * 2
    x[0, 3] = 60.0  # outlier
    w = torch.rand(k, generator=g) + 0.5
    shift = torch.randn(k, generator=g) * 0.3
    shift[5] = 4.0  # a large shift: it must reach the scale
    inv_s = torch.rand(k, generator=g) + 0.5
    perm = torch.randperm(k, generator=g)
    rot = _hadamard(b)
    assert qk.norm_shift_supported(rot, k, bits)
    args = dict(bits=bits, inv_smooth=inv_s, rotation=rot, perm=perm, norm_shift=shift)
    q_row, s_row = qk.rmsnorm_quantize(x, w, 1e-6, backend="triton", **args)
    assert len(row_spy) == 1
    q_cpu, s_cpu = qk.rmsnorm_quantize(x, w, 1e-6, backend="cpu", **args)
    _same_quant(q_row, s_row, q_cpu, s_cpu, bits)
    want_q, want_s = _np_adaptive_quant(
        x.numpy(), bits, w.numpy(), shift.numpy(), 1e-6, inv_s.numpy(), perm.numpy(), rot.numpy()
    )
    np.testing.assert_allclose(s_row.numpy(), want_s, rtol=2e-6)
    got = _codes(q_row, bits)
    assert np.abs(got - want_q).max() <= 1 and (got == want_q).mean() > 0.98
    # without the shift the scales differ: the test would notice a shift that went missing
    _, s_plain = qk.rmsnorm_quantize(x, w, 1e-6, backend="triton", bits=bits, inv_smooth=inv_s, rotation=rot, perm=perm)
    assert not torch.allclose(s_plain, s_row, rtol=1e-3)


def test_norm_shift_is_checked_and_refused_where_the_kernel_cannot_take_it():
    x, w = torch.randn(2, 256), torch.ones(256)
    with pytest.raises(ValueError, match="norm_shift needs norm_weight"):
        kquant._quantize_impl(x, None, 1e-6, 0.0, None, None, None, 8, "cpu", None, norm_shift=torch.zeros(256))
    with pytest.raises(ValueError, match=r"norm_shift must have shape \(256,\)"):
        qk.rmsnorm_quantize(x, w, 1e-6, backend="cpu", norm_shift=torch.zeros(128))
    # Triton: the row kernel only (a shared rotation of B >= 16); the torch path takes any
    assert not qk.norm_shift_supported(None, 256, 8) and not qk.norm_shift_supported(_hadamard(8), 256, 8)
    with pytest.raises(ValueError, match="row kernel only"):
        qk.rmsnorm_quantize(x, w, 1e-6, backend="triton", norm_shift=torch.zeros(256))
    q, s = qk.rmsnorm_quantize(x, w, 1e-6, backend="cpu", norm_shift=torch.full((256,), 0.5))
    assert q.shape == (2, 256) and (s > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,k", [(1, 17, 256), (2, 5, 96), (1, 3, 1000)])
def test_adaptive_rmsnorm_kernel_matches_the_torch_ops_and_float64(monkeypatch, dtype, b, t, k):
    """One Triton launch for pi0.5's float adaRMS, (x * rstd) * w[b] + shift[b] with per-sample
    w / shift, against the torch ops (the CPU path, the module's own formula) and float64."""
    import torch.nn.functional as F

    from quantvla_kernels import norm as knorm

    g = torch.Generator().manual_seed(b * t + k)
    x = (torch.randn(b, t, k, generator=g) * 3).to(dtype)
    x[0, 0, 5] = 80.0
    w = torch.rand(b, 1, k, generator=g) + 0.5
    s = torch.randn(b, 1, k, generator=g)
    launches = []
    real = knorm._triton
    monkeypatch.setattr(knorm, "_triton", lambda *a: launches.append(1) or real(*a))
    with torch.no_grad():
        got = qk.adaptive_rmsnorm(x, w, s, 1e-6, backend="triton")
        cpu = qk.adaptive_rmsnorm(x, w, s, 1e-6, backend="cpu")
    assert launches == [1] and got.dtype == dtype and got.shape == x.shape
    xf = x.float()
    assert torch.equal(cpu, (F.rms_norm(xf, (k,), eps=1e-6) * w + s).to(dtype))  # the module's formula
    ref = F.rms_norm(x.double(), (k,), eps=1e-6) * w.double() + s.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    else:  # the interpreter truncates fp32 -> bf16 (a GPU rounds): within one bf16 step
        step = ref.abs().clamp(min=1e-3) * 2**-7
        assert ((got.double() - ref).abs() <= step * 1.01).all()
    # gradients on: the torch ops (the kernel has no backward)
    with torch.enable_grad():
        wg = w.clone().requires_grad_()
        y = qk.adaptive_rmsnorm(x.float(), wg, s, 1e-6, backend="triton")
        y.sum().backward()
    assert launches == [1] and wg.grad is not None
