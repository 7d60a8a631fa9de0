"""The compiled fused CPU integer linear (kernels/cpu_int_linear.cpp): it builds on this
machine, and its outputs are bit for bit those of the torch-op lean path, which the tests in
test_quant_cpu_path.py tie to the general kernels path and the float64 oracle."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantvla_core.quant.qlinear import QuantLinear
from quantvla_core.quant.transforms import InputTransform, hadamard
from quantvla_kernels import cpu_fused

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fused():
    mod = cpu_fused.module()
    assert mod is not None, f"the fused CPU linear did not build here: {cpu_fused.failure()}"
    return mod


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
def test_fused_equals_torch_ops_bit_for_bit(fused, m, k, n, scheme, transform):
    torch.manual_seed(m * 7 + k + n)
    lin = nn.Linear(k, n, bias=(m % 2 == 1))
    w_bits, a_bits = (8, 8) if scheme == "w8a8" else (4, 4) if scheme.startswith("w4a4") else (4, 8)
    group = 128 if scheme.endswith("g128") else None
    g = torch.Generator().manual_seed(k)
    t = None
    if transform == "smooth+hadamard":
        t = InputTransform(inv_smooth=torch.rand(k, generator=g) + 0.5, rotation=hadamard(64).float(),
                           rotation_kind="hadamard")
    elif transform == "perm+svd":
        q, _ = torch.linalg.qr(torch.randn(k // 32, 32, 32, generator=g, dtype=torch.float64))
        t = InputTransform(inv_smooth=torch.rand(k, generator=g) + 0.5, perm=torch.randperm(k, generator=g),
                           rotation=q.float(), rotation_kind="svd")
    ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, group_size=group, transform=t,
                                 clip_grid=(1.0,))
    x = torch.randn(m, k) * 2
    x[0, 1] = 60.0  # outlier channel
    if m > 2:
        x[1] = 0.0  # an all-zero token: codes 0, output = bias
    for xx in (x, x.bfloat16()):
        y_fused, y_ops = _both(ql, xx)
        assert y_fused.dtype == xx.dtype and y_fused.shape == (m, n)
        assert torch.equal(y_fused.float().view(torch.int32), y_ops.float().view(torch.int32)), (scheme, transform)
    # and the math is right against the float64 oracle, independent of both paths
    y, _ = _both(ql, x)
    torch.testing.assert_close(y.double(), ql.forward_reference(x), rtol=1e-5, atol=1e-4)


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
