"""The compiled fused CPU integer linear (kernels/cpu_int_linear.cpp): it builds on this
machine, and its outputs are bit for bit those of the torch-op lean path, which the tests in
test_quant_cpu_path.py tie to the general kernels path and the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantvla_core.quant.qlinear import QuantLinear, set_fast_hadamard
from quantvla_core.quant.transforms import InputTransform, hadamard
from quantvla_kernels import cpu_fused

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fused():
    mod = cpu_fused.module()
    assert mod is not None, f"the fused CPU linear did not build here: {cpu_fused.failure()}"
    return mod


def _fresh(ql: QuantLinear) -> QuantLinear:
    ql._cpu_cache = None  # the CPU operands (and the fast-Hadamard choice) are built on next use
    return ql


def _both(ql: QuantLinear, x: torch.Tensor):
    """(fused output, torch-op output) of the same layer and input."""
    with torch.inference_mode():
        y_fused = ql(x)
        cpu_fused.set_enabled(False)
        try:
            y_ops = ql(x)
        finally:
            cpu_fused.set_enabled(True)
    return y_fused, y_ops


@pytest.mark.parametrize("m,k,n", [(1, 128, 8), (17, 256, 96), (33, 384, 130), (5, 1024, 64)])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8-g128", "w4a8-ch", "w4a4-g128"])
@pytest.mark.parametrize("transform", ["none", "smooth+hadamard", "perm+svd"])
def test_fused_equals_torch_ops(fused, m, k, n, scheme, transform):
    torch.manual_seed(m * 7 + k + n)
    lin = nn.Linear(k, n, bias=(m % 2 == 1))
    w_bits, a_bits = (8, 8) if scheme == "w8a8" else (4, 4) if scheme.startswith("w4a4") else (4, 8)
    group = 128 if scheme.endswith("g128") else None
    g = torch.Generator().manual_seed(k)
    t = None
    if transform == "smooth+hadamard":
        t = InputTransform(
            inv_smooth=torch.rand(k, generator=g) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard"
        )
    elif transform == "perm+svd":
        q, _ = torch.linalg.qr(torch.randn(k // 32, 32, 32, generator=g, dtype=torch.float64))
        t = InputTransform(
            inv_smooth=torch.rand(k, generator=g) + 0.5,
            perm=torch.randperm(k, generator=g),
            rotation=q.float(),
            rotation_kind="svd",
        )
    ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, group_size=group, transform=t, clip_grid=(1.0,))
    x = torch.randn(m, k) * 2
    x[0, 1] = 60.0  # outlier channel
    if m > 2:
        x[1] = 0.0  # an all-zero token: codes 0, output = bias
    set_fast_hadamard(False)  # the Hadamard as the torch path's matmul: everything bit for bit
    try:
        for xx in (x, x.bfloat16()):
            y_fused, y_ops = _both(_fresh(ql), xx)
            assert y_fused.dtype == xx.dtype and y_fused.shape == (m, n)
            assert torch.equal(y_fused.float().view(torch.int32), y_ops.float().view(torch.int32)), (scheme, transform)
    finally:
        set_fast_hadamard(True)
    # the default fast transform: rotated values can differ in the last bit (so a row's scale,
    # and every output of that row, by an ulp) and a code at a rounding boundary by one step
    y_fast, y_ops = _both(_fresh(ql), x)
    if transform != "smooth+hadamard":
        assert torch.equal(y_fast, y_ops)
    else:
        torch.testing.assert_close(y_fast, y_ops, rtol=0, atol=0.02 * y_ops.abs().max().item())
    # and the math is right against the float64 oracle, independent of both paths
    torch.testing.assert_close(y_fast.double(), ql.forward_reference(x), rtol=1e-5, atol=1e-4)


def test_fast_hadamard_equals_the_rotation_matrix():
    """The transform against float64 x @ H / sqrt(B) for every block size it takes, without
    quantization noise: 8-bit codes of x H computed both ways agree within one step."""
    from quantvla_kernels import cpu_fused as cf

    mod = cf.module()
    for b in (16, 32, 64):
        k = 4 * b
        x = torch.randn(9, k, dtype=torch.float64) * torch.exp(torch.randn(k, dtype=torch.float64))
        h = hadamard(b)
        want = (x.reshape(9, k // b, b) @ h).reshape(9, k)
        w = torch.eye(k, dtype=torch.int8) * 127  # the GEMM returns the codes themselves
        y = mod.int_linear(
            x.float(), None, None, h.float(), [w], torch.ones(k) / 127, None, 127, b, float(h[0, 0]), None, 0.0, 0.0
        )
        amax = want.abs().amax(1, keepdim=True)
        codes_want = torch.round(want * 127 / amax)
        codes = torch.round(y.double() / (amax.float().double() / 127))
        assert (codes - codes_want).abs().max() <= 1, b
        torch.testing.assert_close(y.double(), want, rtol=0, atol=float(amax.max()) / 127)


def test_fused_takes_non_contiguous_and_batched_input(fused):
    torch.manual_seed(3)
    ql = QuantLinear.from_linear(nn.Linear(128, 32), w_bits=8, a_bits=8, clip_grid=(1.0,))
    x = torch.randn(4, 128, 6).transpose(1, 2)  # (4, 6, 128), not contiguous
    y_fused, y_ops = _both(ql, x)
    assert y_fused.shape == (4, 6, 32)
    assert torch.equal(y_fused, y_ops)


def test_disabled_extension_is_not_used(fused, monkeypatch):
    calls = []

    class Spy:
        def int_linear(self, *a):
            calls.append(1)
            return fused.int_linear(*a)

        def __getattr__(self, name):  # the rest of the extension's API, unwatched
            return getattr(fused, name)

    monkeypatch.setattr(cpu_fused, "_module", Spy())
    ql = QuantLinear.from_linear(nn.Linear(64, 16), w_bits=8, a_bits=8, clip_grid=(1.0,))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ql(x)
        assert calls == [1]
        cpu_fused.set_enabled(False)
        try:
            ql(x)
        finally:
            cpu_fused.set_enabled(True)
    assert calls == [1]


def _w8a8_layer(k: int, n: int, transform: str, backend: str) -> QuantLinear:
    """A W8A8 QuantLinear (K -> N), with smoothing + a Hadamard rotation of 64 or no transform."""
    t = None
    if transform == "smooth+hadamard":
        t = InputTransform(inv_smooth=torch.rand(k) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard")
    ql = QuantLinear.from_linear(nn.Linear(k, n), w_bits=8, a_bits=8, transform=t, clip_grid=(1.0,))
    ql.backend = backend
    return ql


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("transform", ["none", "smooth+hadamard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_inside_the_quantization_matches_norm_then_layer(fused, backend, transform, dtype):
    """try_forward_rmsnorm (CPU row pass / Triton rmsnorm_quantize) against the model's own
    RMSNorm module followed by the layer, with outlier channels: within a code step; and the
    normalised activations reach the same codes as a float64 norm would (oracle)."""
    from quantvla_core.models.layers import RMSNorm
    from quantvla_kernels.dispatch import triton_interpreting

    if backend == "triton" and not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    torch.manual_seed(5)
    k, n = 256, 96
    norm = RMSNorm(k, eps=1e-6, offset=1.0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(k) * 0.2)
        norm.weight[7] = 8.0  # an outlier channel the norm creates
    ql = _w8a8_layer(k, n, transform, backend)
    x = (torch.randn(2, 9, k) * 3).to(dtype)
    with torch.inference_mode():
        y = ql.try_forward_rmsnorm(x, norm.weight, norm.eps, norm.offset)
        want = ql(norm.to(dtype)(x) if dtype == torch.float32 else norm(x))
        oracle = ql.forward_reference(norm.double()(x.double()).reshape(-1, k)).reshape(2, 9, n)
    assert y is not None and y.dtype == dtype and y.shape == (2, 9, n)
    span = want.float().abs().max().item()
    torch.testing.assert_close(y.float(), want.float(), rtol=0, atol=0.03 * span)
    torch.testing.assert_close(y.double(), oracle, rtol=0, atol=0.03 * span)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("transform", ["none", "smooth+hadamard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_norm_inside_the_quantization_matches_norm_then_layer(fused, backend, transform, dtype):
    """try_forward_rmsnorm(..., norm_shift=) with pi0.5's adaRMS terms (weight 1 + scale, offset
    0, shift) against the AdaRMSNorm module followed by the layer and against a float64 oracle,
    with a large shift on one channel (it must reach the activation scale)."""
    from quantvla_core.models.layers import AdaRMSNorm
    from quantvla_kernels.dispatch import triton_interpreting

    if backend == "triton" and not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    if backend == "triton" and transform == "none":
        pytest.skip("Triton takes the shift in the row kernel only (a rotation of B >= 16)")
    torch.manual_seed(6)
    k, n = 256, 96
    norm = AdaRMSNorm(k, 32)
    cond = torch.randn(1, 32)
    with torch.no_grad():
        norm.dense.weight.normal_(0, 0.3)
        norm.dense.bias[k + 11] = 5.0  # a large shift on channel 11
    ql = _w8a8_layer(k, n, transform, backend)
    x = (torch.randn(1, 9, k) * 3).to(dtype)
    with torch.inference_mode():
        scale1, shift, _ = norm.terms(cond)
        y = ql.try_forward_rmsnorm(x, scale1.reshape(-1), norm.eps, 0.0, norm_shift=shift.reshape(-1))
        want = ql(norm.to(dtype)(x, cond.to(dtype))[0]) if dtype == torch.float32 else ql(norm(x, cond)[0])
        xd = x.double()
        normed = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps) * scale1.double() + shift.double()
        oracle = ql.forward_reference(normed.reshape(-1, k)).reshape(1, 9, n)
    assert y is not None and y.dtype == dtype and y.shape == (1, 9, n)
    span = want.float().abs().max().item()
    torch.testing.assert_close(y.float(), want.float(), rtol=0, atol=0.03 * span)
    torch.testing.assert_close(y.double(), oracle, rtol=0, atol=0.03 * span)
    with torch.inference_mode():  # without the shift the result moves: the test sees a lost shift
        y0 = ql.try_forward_rmsnorm(x, scale1.reshape(-1), norm.eps, 0.0)
    assert (y0.float() - y.float()).abs().max() > 0.1 * span


def test_rmsnorm_fusion_declines_what_it_does_not_cover(fused):
    from quantvla_core.models.layers import RMSNorm

    norm = RMSNorm(96)
    g = torch.Generator().manual_seed(0)
    svd = InputTransform(
        inv_smooth=None,
        perm=torch.randperm(96, generator=g),
        rotation=torch.linalg.qr(torch.randn(3, 32, 32, generator=g, dtype=torch.float64))[0].float(),
        rotation_kind="svd",
    )
    ql = QuantLinear.from_linear(nn.Linear(96, 8), w_bits=8, a_bits=8, transform=svd, clip_grid=(1.0,))
    assert ql.try_forward_rmsnorm(torch.randn(3, 96), norm.weight, norm.eps, norm.offset) is None
    ql_ref = QuantLinear.from_linear(nn.Linear(96, 8), w_bits=8, a_bits=8, clip_grid=(1.0,), backend="reference")
    assert ql_ref.try_forward_rmsnorm(torch.randn(3, 96), norm.weight, norm.eps, norm.offset) is None


@pytest.mark.parametrize("m", [1, 5, 17, 70])
@pytest.mark.parametrize("n,k,groups", [(48, 128, 1), (96, 256, 2), (64, 512, 4), (80, 384, 3)])
def test_vnni_gemm_is_bit_identical_to_int_mm(fused, m, n, k, groups):
    """The prepacked VNNI GEMM (AVX512-VNNI CPUs) gives the _int_mm path's numbers bit for bit:
    per channel and with group scales, for row counts that are not a multiple of its 4-row
    tile and column counts not a multiple of its 64-column strip."""
    if not fused.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    g = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g)
    x[0, 1] = 25.0
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01 if groups == 1 else torch.rand(groups, n, generator=g) * 0.01
    bias = torch.randn(n, generator=g)
    pieces = [w] if groups == 1 else [w[:, i * k // groups : (i + 1) * k // groups].contiguous() for i in range(groups)]
    packed, colsum = fused.vnni_pack(w, groups)
    assert packed.shape == (n // 16, k // 4, 16, 4) and colsum.shape == (groups, n)
    args = (None, None, None)
    want = fused.int_linear(x, *args, pieces, ws, bias, 127, 0, 0.0, None, 0.0, 0.0)
    only = fused.int_linear(x, *args, [], ws, bias, 127, 0, 0.0, None, 0.0, 0.0, 0, False, None, packed, colsum)
    both = fused.int_linear(x, *args, pieces, ws, bias, 127, 0, 0.0, None, 0.0, 0.0, 0, False, None, packed, colsum)
    assert torch.equal(only, want) and torch.equal(both, want)
    assert fused.vnni_pack(w[:, : k - 2].contiguous(), 1) == []  # K not a multiple of 4: not packed


def test_the_extension_runs_its_loops_on_every_torch_thread(fused):
    """ATen's parallel_for is serial in code built without OpenMP; the extension is built with
    it, so its row passes, epilogue and VNNI GEMM use torch's intra-op threads."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: nothing to split")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fused.parallel_threads(64) == 2
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    try:
        assert fused.parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)
