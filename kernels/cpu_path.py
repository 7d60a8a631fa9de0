"""The lean CPU path of QuantLinear: pre-split weight codes, activation codes, exact int linear."""

from __future__ import annotations

import torch

from .packing import unpack_int4
from .validation import _QMAX, _check_bits, _check_tensor


# ----------------------------------------------------------------------------- lean CPU path
# QuantLinear's CPU forward: the same numbers as quantize_per_token + gemm_* on backend 'cpu'
# (see test_kernels_ops.py::test_cpu_lean_*), without per-call validation (the caller checked
# its operands when it was built), without packing 4-bit activation codes only to unpack
# them, and with weights unpacked / split once (cpu_weight_groups) instead of on every call.
def cpu_weight_groups(wq: torch.Tensor, w_bits: int, k: int, group_size: int | None) -> tuple:
    """int8 weight codes ready for :func:`cpu_int_linear`: unpacked (4-bit) and, with group-wise
    scales, split into contiguous (N, group_size) K-groups.  Validates shapes once; callers
    cache the result (it holds N x K bytes for 4-bit weights: twice the packed size)."""
    _check_bits(w_bits)
    want = (torch.uint8,) if w_bits == 4 else (torch.int8,)
    _check_tensor(wq, "wq", want, "packed int4 weights (N, K/2)" if w_bits == 4 else "int8 weights (N, K)")
    cols = k // 2 if w_bits == 4 else k
    if wq.dim() != 2 or wq.shape[1] != cols:
        raise ValueError(f"wq must be (N, {cols}) for K={k} and {w_bits}-bit codes, got {tuple(wq.shape)}")
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must divide K={k}, got {group_size}")
    w = unpack_int4(wq) if w_bits == 4 else wq.contiguous()
    if group_size is None:
        return (w,)
    return tuple(w[:, k0 : k0 + group_size].contiguous() for k0 in range(0, k, group_size))


def cpu_quantize_codes(x: torch.Tensor, bits: int, inv_smooth=None, perm=None, rotation=None):
    """Per-token codes of float32 x (M, K) as int8 (M, K) (4-bit codes too, unpacked) and fp32
    scales (M,): bit for bit what quantize_per_token(backend='cpu') computes before packing.
    ``perm`` must be int64 (index it once at build time); no checks: the caller validated."""
    qmax = _QMAX[bits]
    m, k = x.shape
    v = x
    if inv_smooth is not None:
        v = v * inv_smooth[None, :]
    if perm is not None:
        v = v[:, perm]
    if rotation is not None:
        b = rotation.shape[-1]
        if rotation.dim() == 2:  # one (M*K/B, B) @ (B, B) matmul for all blocks
            v = (v.reshape(m, k // b, b) @ rotation).reshape(m, k)
        else:
            v = torch.einsum("mgb,gbc->mgc", v.reshape(m, k // b, b), rotation).reshape(m, k)
    amax = v.abs().amax(dim=1)
    pos = amax > 0
    # Same IEEE quotients as the general path's full_like divisor (a one-element tensor, not a
    # Python number: "number / tensor" is not computed as that quotient); rows with amax 0 get
    # scale 1 and inverse 0 from the where, so their inf/nan quotients are never used.
    qm = _cpu_qmax_tensor(qmax)
    scale = torch.where(pos, amax / qm, 1.0)
    inv = torch.where(pos, qm / amax, 0.0)
    # |v * inv| <= qmax (1 + 2^-23) < qmax + 0.5, so rounding never leaves [-qmax, qmax]: the
    # clamp of the general path is a no-op here and is skipped.
    q = torch.mul(v, inv[:, None]).round_().to(torch.int8)
    return q, scale


_CPU_QMAX: dict = {}


def _cpu_qmax_tensor(qmax: int) -> torch.Tensor:
    if qmax not in _CPU_QMAX:
        with torch.inference_mode(False):  # a normal tensor, also usable by autograd callers
            _CPU_QMAX[qmax] = torch.tensor([float(qmax)])
    return _CPU_QMAX[qmax]


def cpu_int_linear(
    q: torch.Tensor, xs: torch.Tensor, w_groups: tuple, ws: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """fp32 (M, N) from int8 codes q (M, K), scales xs (M,) and :func:`cpu_weight_groups` output:
    the shared epilogue (acc * xs * ws + bias; group-wise: sum_g acc_g * ws[:, g] in group
    order, then * xs + bias), exact int32 accumulation through torch._int_mm."""
    if q.shape[1] * 128 * 128 >= 2**31:
        raise ValueError(f"K={q.shape[1]} could overflow the int32 accumulator (max K is 131071)")
    if len(w_groups) == 1 and ws.dim() == 1:
        y = torch._int_mm(q, w_groups[0].t()).to(torch.float32).mul_(xs[:, None]).mul_(ws[None, :])
    else:
        gs, ng = w_groups[0].shape[1], len(w_groups)
        acc = torch.empty((ng, q.shape[0], w_groups[0].shape[0]), dtype=torch.int32)
        for g, wg in enumerate(w_groups):
            torch._int_mm(q[:, g * gs : (g + 1) * gs], wg.t(), out=acc[g])
        # acc_g * ws[:, g] for all groups at once (a contiguous (G, 1, N) scale: 2x faster than
        # broadcasting the transposed view)
        part = acc.to(torch.float32).mul_(ws.t().contiguous()[:, None, :])
        y = part[0].add(0.0)  # 0 + p0 as the general path does (turns -0.0 into +0.0)
        for g in range(1, ng):  # then in group order: float sums are not associative
            y.add_(part[g])
        y = y.mul_(xs[:, None])
    if bias is not None:
        y = y.add_(bias[None, :])
    return y
