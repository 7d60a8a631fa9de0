"""Int4 packing: exact round trip, the documented byte layout, clear errors."""

import pytest
import torch

import quantvla_kernels as qk


@pytest.mark.parametrize("k", [2, 48, 64, 128, 130, 192, 256, 300])
def test_round_trip_exact_all_values(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (7, k), dtype=torch.int8, generator=g)
    q[0, :] = -8
    q[1, :] = 7
    p = qk.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (7, k // 2)
    assert torch.equal(qk.unpack_int4(p), q)


def test_documented_layout_full_and_tail_group():
    # K = 128 + 6: one full group (half 64) and a tail group of width 6 (half 3).
    k = 134
    q = torch.zeros((1, k), dtype=torch.int8)
    q[0, 5], q[0, 5 + 64] = 3, -2  # byte 5: low 3, high -2 (0xE)
    q[0, 128 + 1], q[0, 128 + 1 + 3] = -8, 7  # tail byte 64 + 1: low -8 (0x8), high 7
    p = qk.pack_int4(q)
    assert int(p[0, 5]) == 0xE3
    assert int(p[0, 65]) == 0x78
    assert int(p.sum()) == 0xE3 + 0x78


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="even"):
        qk.pack_int4(torch.zeros((2, 3), dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        qk.pack_int4(torch.full((2, 4), 8, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        qk.pack_int4(torch.zeros((2, 4), dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        qk.pack_int4(torch.zeros((4,), dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        qk.unpack_int4(torch.zeros((2, 4), dtype=torch.int8))
