"""QuantLinear's lean CPU forward: bit for bit the general kernels path, weight cache that is
rebuilt when the weights change and never saved or counted as weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantvla_kernels as qk
from quantvla_core.quant.qlinear import QuantLinear, quant_backend
from quantvla_core.quant.transforms import InputTransform, hadamard
from quantvla_kernels import ops


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def torch_op_lean_path():
    """These tests pin the torch-op lean path (the fallback where no compiler is found); the
    compiled fused linear is tied to it in test_kernels_cpu_fused.py."""
    from quantvla_kernels import cpu_fused

    cpu_fused.set_enabled(False)
    yield
    cpu_fused.set_enabled(True)


def _transform(kind: str, k: int, block: int) -> InputTransform | None:
    g = torch.Generator().manual_seed(k + block)
    smooth = torch.rand(k, generator=g) + 0.5
    if kind == "none":
        return None
    if kind == "smooth":
        return InputTransform(inv_smooth=smooth)
    if kind == "perm":
        return InputTransform(inv_smooth=smooth, perm=torch.randperm(k, generator=g))
    if kind == "hadamard":
        return InputTransform(inv_smooth=smooth, rotation=hadamard(block).float(), rotation_kind="hadamard")
    q, _ = torch.linalg.qr(torch.randn(k // block, block, block, generator=g, dtype=torch.float64))
    return InputTransform(
        inv_smooth=smooth, perm=torch.randperm(k, generator=g), rotation=q.float(), rotation_kind="svd"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _general(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the CPU path computed before the lean forward: the public ops with full checks."""
    return ql._forward_kernels(x.reshape(-1, ql.in_features), "cpu").to(x.dtype).reshape(*x.shape[:-1], -1)


# K=96 with B=32 makes the 4-bit path rotate before quantizing (a packing group splits a block).
@pytest.mark.parametrize("k,n,block", [(256, 96, 64), (96, 40, 32)])
@pytest.mark.parametrize("kind", ["none", "smooth", "perm", "hadamard", "svd"])
def test_lean_cpu_forward_is_bit_identical_to_general_path(k, n, block, kind):
    torch.manual_seed(k + n)
    lin = nn.Linear(k, n)
    x = torch.randn(2, 9, k) * 3
    x[0, 0] = 0  # an all-zero row: scale 1, codes 0
    x[1, 3, 5] = 40.0  # an outlier row
    t = _transform(kind, k, block)
    gs = 128 if k % 128 == 0 else 32
    for w_bits, a_bits, group in ((8, 8, None), (4, 8, gs), (4, 8, None), (4, 4, gs), (4, 4, None)):
        ql = QuantLinear.from_linear(lin, w_bits=w_bits, a_bits=a_bits, group_size=group, transform=t, clip_grid=(1.0,))
        with torch.inference_mode():
            lean = ql(x)
            again = ql(x)  # second call: cached weights
            ref = _general(ql, x)
        assert lean.shape == (2, 9, n)
        assert torch.equal(_bits(lean), _bits(ref)), (w_bits, a_bits, group, kind)
        assert torch.equal(_bits(again), _bits(ref))
        # and the integer math is right, against the float64 oracle (independent of the kernels)
        torch.testing.assert_close(
            lean.double(), ql.forward_reference(x.reshape(-1, k)).reshape(2, 9, n), rtol=1e-5, atol=1e-4
        )


def test_lean_cpu_forward_bf16_input_and_single_token():
    torch.manual_seed(1)
    lin = nn.Linear(128, 64, bias=False)
    t = _transform("hadamard", 128, 64)
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=64, transform=t, clip_grid=(1.0,))
    for x in (torch.randn(3, 128).bfloat16(), torch.randn(1, 128)):
        y = ql(x)
        assert y.dtype == x.dtype
        assert torch.equal(y.float(), _general(ql, x).float())


def test_lean_codes_equal_the_public_quantizer_unpacked():
    torch.manual_seed(2)
    x = torch.randn(7, 256) * 2
    x[3] = 0
    s = torch.rand(256) + 0.5
    r = hadamard(64).float()
    for bits in (8, 4):
        q, xs = ops.cpu_quantize_codes(x, bits, s, None, r)
        pq, ps = qk.quantize_per_token(x, bits, s, r, backend="cpu")
        assert q.dtype == torch.int8 and q.shape == (7, 256)
        assert torch.equal(q, qk.unpack_int4(pq) if bits == 4 else pq)
        assert torch.equal(_bits(xs), _bits(ps))
        m = 7 if bits == 4 else 127
        assert int(q.abs().max()) == m and bool((q[3] == 0).all()) and float(xs[3]) == 1.0


def test_weight_cache_is_not_saved_or_counted_and_costs_unpacked_bytes():
    lin = nn.Linear(256, 48)
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=128, transform=_transform("hadamard", 256, 64))
    keys, stored = set(ql.state_dict()), ql.storage_bytes()
    buffers = {n for n, _ in ql.named_buffers()}
    assert ql.cpu_cache_bytes() == 0
    ql(torch.randn(4, 256))
    assert ql.cpu_cache_bytes() == 48 * 256  # int8 codes: twice the packed 4-bit bytes
    assert set(ql.state_dict()) == keys and ql.storage_bytes() == stored
    assert {n for n, _ in ql.named_buffers()} == buffers
    w8 = QuantLinear.from_linear(lin, w_bits=8, a_bits=8)
    w8(torch.randn(2, 256))
    assert w8.cpu_cache_bytes() == 0  # int8 codes are used as stored


def test_weight_cache_follows_new_and_in_place_changed_codes():
    torch.manual_seed(3)
    a, b = nn.Linear(256, 32), nn.Linear(256, 32)
    x = torch.randn(5, 256)
    t = _transform("smooth", 256, 64)
    qa = QuantLinear.from_linear(a, w_bits=4, a_bits=4, group_size=128, transform=t)
    qb = QuantLinear.from_linear(b, w_bits=4, a_bits=4, group_size=128, transform=t)
    ya = qa(x)
    qa.load_state_dict(qb.state_dict())  # in-place copy: same tensors, new version
    assert torch.equal(qa(x), qb(x)) and not torch.equal(qa(x), ya)
    qa.set_codes(b.weight.new_zeros(32, 256, dtype=torch.int8), torch.ones(32, 2))  # new tensor
    assert torch.equal(qa(x), qa.bias.expand(5, 32))
    with torch.no_grad():
        qa.rotation = None
        qa.inv_smooth.fill_(2.0)  # transform buffers are read live
    assert torch.equal(_bits(qa(x)), _bits(_general(qa, x)))


def test_other_backends_and_cases_still_take_the_general_path():
    torch.manual_seed(4)
    lin = nn.Linear(128, 16)
    x = torch.randn(3, 128)
    static = QuantLinear.from_linear(lin, w_bits=8, a_bits=8, act_scale=0.05)
    w8g = QuantLinear.from_linear(lin, w_bits=8, a_bits=8, group_size=64)
    wonly = QuantLinear.from_linear(lin, w_bits=4, a_bits=None, group_size=64)
    for ql in (static, w8g, wonly):
        assert not ql._lean_cpu
        assert torch.equal(ql(x), _general(ql, x))
        assert ql.cpu_cache_bytes() == 0
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=64)
    with quant_backend("reference"):
        torch.testing.assert_close(ql(x).double(), ql.forward_reference(x))
    assert ql.cpu_cache_bytes() == 0  # the reference backend never builds the CPU cache


def test_cpu_weight_groups_rejects_mismatched_codes():
    with pytest.raises(ValueError, match=r"wq must be \(N, 64\)"):
        ops.cpu_weight_groups(torch.zeros(4, 32, dtype=torch.uint8), 4, 128, None)
    with pytest.raises(TypeError, match="packed int4"):
        ops.cpu_weight_groups(torch.zeros(4, 64, dtype=torch.int8), 4, 128, None)
    with pytest.raises(ValueError, match="group_size must divide"):
        ops.cpu_weight_groups(torch.zeros(4, 128, dtype=torch.int8), 8, 128, 48)
    groups = ops.cpu_weight_groups(qk.pack_int4(torch.randint(-7, 8, (4, 256), dtype=torch.int8)), 4, 256, 128)
    assert len(groups) == 2 and all(g.shape == (4, 128) and g.is_contiguous() for g in groups)


def test_cache_built_in_inference_mode_serves_grad_mode_callers():
    """Policy.predict runs under inference_mode; a later caller (calibration, a user's script)
    may run the same layer with autograd on."""
    lin = nn.Linear(128, 16)
    t = InputTransform(inv_smooth=torch.rand(128) + 0.5, perm=torch.randperm(128))
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=64, transform=t)
    x = torch.randn(3, 128)
    with torch.inference_mode():
        y0 = ql(x)
    xg = x.clone().requires_grad_(True)
    y1 = ql(xg)
    assert torch.equal(y0, y1.detach())
