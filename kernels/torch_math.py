"""The exact torch implementations behind the 'cpu' and 'reference' backends.

Integer GEMMs with the shared epilogue and per-token activation quantization, in the
arithmetic order of the contract in ops.py (the Triton kernels follow the same order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import log_fallback_once
from .validation import _QMAX


ACTIVATIONS = ("gelu_tanh", "silu")
"""Activations a GEMM epilogue applies (the models' MLP activations)."""


def activation(name: str, y: torch.Tensor) -> torch.Tensor:
    """The epilogue's activation in torch: GELU with the tanh approximation, or SiLU."""
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")


def finish_output(
    y: torch.Tensor,
    act: str | None,
    gated: bool,
    residual: torch.Tensor | None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float part of the epilogue after scales and bias, on fp32 y (M, N): ``act(y)``, or
    with ``gated`` ``act(y[:, 0::2]) * y[:, 1::2]`` (a gate/up pair per output column, the
    interleaved layout of a fused gate/up layer: (M, N/2)), then ``* residual_gate`` (per
    column) and ``+ residual`` (fp32)."""
    if act is not None:
        # contiguous halves: torch's activation kernels round differently on strided input
        y = activation(act, y[:, 0::2].contiguous()) * y[:, 1::2].contiguous() if gated else activation(act, y)
    if residual_gate is not None:
        y = y * residual_gate.to(y.dtype)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y


def _epilogue(
    acc: torch.Tensor,
    xs: torch.Tensor,
    ws: torch.Tensor | None,
    bias,
    out_dtype,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
):
    y = acc.to(torch.float32) * xs[:, None]
    if ws is not None:
        y = y * ws[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return finish_output(y, act, gated, residual, residual_gate).to(out_dtype)


def _int_dot_exact(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    """Exact int32 (M, N) = x8 (M, K) @ w8 (N, K)^T for int8 operands."""
    m, k = x8.shape
    if k * 128 * 128 >= 2**31:
        raise ValueError(f"K={k} could overflow the int32 accumulator (max K is 131071)")
    if x8.device.type == "cpu" and m > 0:
        return torch._int_mm(x8, w8.t())
    if x8.device.type == "cuda" and m > 16 and k % 8 == 0 and w8.shape[0] % 8 == 0:
        try:
            return torch._int_mm(x8, w8.t())
        except RuntimeError as e:  # shape rules differ between torch versions: take the exact f64 path
            log_fallback_once("torch._int_mm on CUDA", e, "using the exact float64 matmul (same numbers, slower)")
    return (x8.to(torch.float64) @ w8.to(torch.float64).t()).to(torch.int32)


def _grouped_acc_torch(x8, w8, ws, group_size, dot):
    """sum over groups of dot(x_g, w_g).float() * ws[:, g], accumulated in group order."""
    k = x8.shape[1]
    y = torch.zeros((x8.shape[0], w8.shape[0]), dtype=torch.float32, device=x8.device)
    for g, k0 in enumerate(range(0, k, group_size)):
        acc = dot(x8[:, k0 : k0 + group_size].contiguous(), w8[:, k0 : k0 + group_size].contiguous())
        y = y + acc.to(torch.float32) * ws[None, :, g]
    return y


def group_multiplied_codes(w8: torch.Tensor, group_mult: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 (N, K) ``w8 * group_mult`` per group (|values| <= 7 x 18 = 126): a 4-bit weight with
    integer group scales as the 8-bit per-channel weight it equals."""
    n, k = w8.shape
    codes = w8.to(torch.int16).reshape(n, k // group_size, group_size) * group_mult.to(torch.int16)[..., None]
    return codes.reshape(n, k).to(torch.int8)


def _reference_dot(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    return x8.to(torch.float64) @ w8.to(torch.float64).t()


def _gemm_torch(
    x8, xs, w8, ws, group_size, bias, out_dtype, backend, act=None, gated=False, residual=None, residual_gate=None
):
    dot = _reference_dot if backend == "reference" else _int_dot_exact
    if group_size is None:
        return _epilogue(dot(x8, w8), xs, ws, bias, out_dtype, act, gated, residual, residual_gate)
    y = _grouped_acc_torch(x8, w8, ws, group_size, dot)
    return _epilogue(y, xs, None, bias, out_dtype, act, gated, residual, residual_gate)


def _quantize_torch(x, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, norm_shift=None):
    m, k = x.shape
    qmax = _QMAX[bits]
    xf = x.to(torch.float32)
    v = xf

    def row_rstd():
        # Tensor divisors on purpose: torch on CUDA turns "tensor / python number" into a multiply
        # by the reciprocal, which is not the IEEE quotient the kernel computes.
        ms = (xf * xf).sum(dim=1) / torch.full((m,), float(k), device=x.device)
        return torch.ones_like(ms) / torch.sqrt(ms + eps)

    if norm_shift is not None:  # adaptive norm: rstd first, then weight and shift (kernel order)
        v = v * row_rstd()[:, None]
    if norm_weight is not None:
        v = v * (float(offset) + norm_weight.to(torch.float32))[None, :]
    if norm_shift is not None:
        v = v + norm_shift.to(torch.float32)[None, :]
    if inv_smooth is not None:
        v = v * inv_smooth.to(torch.float32)[None, :]
    if perm is not None:
        v = v[:, perm]
    if rotation is not None:
        b = rotation.shape[-1]
        r = rotation.to(torch.float32)
        if r.dim() == 2:
            v = (v.reshape(m, k // b, b) @ r).reshape(m, k)
        else:
            v = torch.einsum("mgb,gbc->mgc", v.reshape(m, k // b, b), r).reshape(m, k)
    if norm_weight is not None and norm_shift is None:  # rstd > 0 factors out: applied last
        v = v * row_rstd()[:, None]
    amax = v.abs().amax(dim=1) if k else torch.zeros(m, device=x.device)
    pos = amax > 0
    safe = torch.where(pos, amax, torch.ones_like(amax))
    qm = torch.full_like(amax, float(qmax))
    scale = torch.where(pos, safe / qm, torch.ones_like(amax))
    inv = torch.where(pos, qm / safe, torch.zeros_like(amax))
    q = torch.clamp(torch.round(v * inv[:, None]), -qmax, qmax).to(torch.int8)
    if bits == 4:
        from .packing import pack_int4

        q = pack_int4(q)
    return q, scale
