"""Per-token activation quantization (optionally fused with RMSNorm, smoothing, permutation
and block rotation): the public entry points, the torch / Triton dispatch, and the choice
between the row-wise and the tile Triton kernels."""

from __future__ import annotations

import math

import torch

from .dispatch import (
    _triton_modules,
    log_fallback_once,
    resolve_backend,
    triton_build_errors,
    triton_cdiv,
    triton_next_pow2,
)
from .packing import PACK_GROUP
from .torch_math import _quantize_torch
from .validation import (
    _QMAX,
    OUT_DTYPES,
    _check_bits,
    _check_out,
    _check_perm,
    _check_rotation,
    _check_same_device,
    _check_tensor,
)


def _quantize_impl(
    x,
    norm_weight,
    eps,
    offset,
    inv_smooth,
    perm,
    rotation,
    bits,
    backend,
    out,
    rotation_kernel="row",
    rotation_precision="ieee",
    norm_shift=None,
):
    _check_tensor(x, "x", (torch.float32, torch.float16, torch.bfloat16), "activations (..., K)")
    bits = _check_bits(bits)
    _check_rotation_options(rotation_kernel, rotation_precision)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    if bits == 4 and k % 2:
        raise ValueError(f"bits=4 packs two values per byte: K must be even, got K={k}")
    device = x.device
    if norm_weight is not None:
        _check_tensor(norm_weight, "norm_weight", OUT_DTYPES, "RMSNorm weight (K,)")
        if tuple(norm_weight.shape) != (k,):
            raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if inv_smooth is not None:
        _check_tensor(inv_smooth, "inv_smooth", OUT_DTYPES, "inverse smoothing factors (K,)")
        if tuple(inv_smooth.shape) != (k,):
            raise ValueError(f"inv_smooth must have shape ({k},), got {tuple(inv_smooth.shape)}")
    if norm_shift is not None:
        if norm_weight is None:
            raise ValueError("norm_shift needs norm_weight: it is the shift of an adaptive norm x * rstd * w + shift")
        _check_tensor(norm_shift, "norm_shift", OUT_DTYPES, "adaptive norm shift (K,)")
        if tuple(norm_shift.shape) != (k,):
            raise ValueError(f"norm_shift must have shape ({k},), got {tuple(norm_shift.shape)}")
    _check_same_device(device, norm_weight=norm_weight, inv_smooth=inv_smooth, norm_shift=norm_shift)
    rotation = _check_rotation(rotation, k, bits, device)
    perm = _check_perm(perm, k, device)
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    kq = k // 2 if bits == 4 else k
    qdtype = torch.uint8 if bits == 4 else torch.int8
    if out is not None:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("out must be a (q, scale) pair of tensors or None")
        _check_out(out[0], (*lead, kq), qdtype, device, "out[0] (codes)")
        _check_out(out[1], lead, torch.float32, device, "out[1] (scales)")
    name = resolve_backend(backend, device)
    if name == "triton" and norm_shift is not None and not norm_shift_supported(rotation, k, bits, rotation_kernel):
        raise ValueError(
            "norm_shift on Triton runs in the row kernel only: a shared (B, B) rotation with B >= 16, "
            f"rotation_kernel='row', 8-bit or K % {PACK_GROUP} == 0 (check with norm_shift_supported)"
        )
    if name != "triton" or m == 0 or (norm_shift is not None and _ROW_BROKEN):
        q, s = _quantize_torch(x2, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, norm_shift)
        q, s = q.reshape(*lead, kq), s.reshape(lead)
        if out is None:
            return q, s
        return out[0].copy_(q), out[1].copy_(s)
    q2 = out[0].view(m, kq) if out is not None else None
    s2 = out[1].view(m) if out is not None else None
    q, s = _quantize_triton(
        x2,
        norm_weight,
        eps,
        offset,
        inv_smooth,
        perm,
        rotation,
        bits,
        q2,
        s2,
        rotation_kernel,
        rotation_precision,
        norm_shift,
    )
    if out is not None:
        return out[0], out[1]
    return q.reshape(*lead, kq), s.reshape(lead)


def _quantize_triton(
    x2,
    norm_weight,
    eps,
    offset,
    inv_smooth,
    perm,
    rotation,
    bits,
    q=None,
    s=None,
    rotation_kernel="row",
    prec="ieee",
    norm_shift=None,
):
    _, tq = _triton_modules(x2.device)
    m, k = x2.shape
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    kq = k // 2 if bits == 4 else k
    if q is None:
        q = torch.empty((m, kq), dtype=torch.uint8 if bits == 4 else torch.int8, device=x2.device)
        s = torch.empty((m,), dtype=torch.float32, device=x2.device)
    has_rot = rotation is not None
    single = False
    num_warps = 4
    if has_rot or bits == 4:
        block_k, block_m = 64, 16 if has_rot else 4
    elif k <= 16384:  # one row per program, the whole row in one tile
        block_k, block_m, single = max(16, triton_next_pow2(k)), 1, True
        num_warps = 4 if block_k <= 2048 else 8 if block_k <= 8192 else 16
    else:
        block_k, block_m = 1024, 4
    dummy = s
    if has_rot:
        rot = rotation.to(torch.float32).contiguous()
        stride_rb = rot.stride(0) if rot.dim() == 3 else 0
        if rotation_kernel == "row" and _row_kernel_applies(rot, k, bits):
            try:
                _launch_row_quant(tq, x2, norm_weight, eps, offset, inv_smooth, perm, rot, bits, q, s, prec, norm_shift)
                return q, s
            except triton_build_errors() as e:  # this Triton / card cannot build the row kernel
                if x2.device.type != "cuda":  # the interpreter builds nothing: a bug, not a toolchain limit
                    raise
                _disable_row_kernel(e)
                if norm_shift is not None:  # only the row kernel takes a shift: the exact torch path
                    q2, s2 = _quantize_torch(x2, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, norm_shift)
                    return q.copy_(q2), s.copy_(s2)
    tq.norm_quant_kernel[(triton_cdiv(m, block_m),)](
        x2,
        norm_weight.contiguous() if norm_weight is not None else dummy,
        inv_smooth.contiguous() if inv_smooth is not None else dummy,
        perm.contiguous() if perm is not None else dummy,
        rot if has_rot else dummy,
        q,
        s,
        m,
        k,
        x2.stride(0),
        q.stride(0),
        stride_rb if has_rot else 0,
        float(eps),
        float(offset),
        HAS_NORM=norm_weight is not None,
        HAS_SMOOTH=inv_smooth is not None,
        HAS_PERM=perm is not None,
        HAS_ROT=has_rot,
        ROT_B=rotation.shape[-1] if has_rot else 1,
        QMAX=_QMAX[bits],
        PACK4=bits == 4,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        SINGLE_TILE=single,
        ROT_PREC=_ROT_PREC[prec],
        num_warps=num_warps,
    )
    return q, s


# Rotated activations on Triton, chosen per call by two arguments of the public ops:
# rotation_kernel="row" (default): one program per token, the rotation one dot of the row
#   reshaped to (K / B, B) rows (shared (B, B) rotation, 16 <= B, 8-bit or K % 128 == 0);
#   "tile": the BLOCK_M=16 kernel with a block-diagonal (B, B) dot per tile, which also runs
#   every rotation the row kernel does not take and is the fallback when it fails to build.
# rotation_precision="ieee" (default, fp32 FMA: the tested-exact numbers) | "tf32" (tensor
#   cores, v rounded to a 10-bit mantissa before the dot: codes at rounding boundaries may move
#   by one) | "tf32x3" (tensor cores, split operands: within a few fp32 ulps of ieee).  Only
#   CUDA honours tf32 / tf32x3; the interpreter computes every variant in fp32.
_ROT_PREC = {"ieee": 0, "tf32": 1, "tf32x3": 2}
ROTATION_KERNELS = ("row", "tile")
ROW_CHUNK_MAX = 4096
_ROW_BROKEN = False


def _check_rotation_options(rotation_kernel: str, rotation_precision: str) -> None:
    if rotation_kernel not in ROTATION_KERNELS:
        raise ValueError(f"rotation_kernel must be one of {ROTATION_KERNELS}, got {rotation_kernel!r}")
    if rotation_precision not in _ROT_PREC:
        raise ValueError(f"rotation_precision must be one of {tuple(_ROT_PREC)}, got {rotation_precision!r}")


def _row_kernel_applies(rot: torch.Tensor, k: int, bits: int) -> bool:
    b = rot.shape[-1]
    return not _ROW_BROKEN and rot.dim() == 2 and b >= 16 and (bits == 8 or k % PACK_GROUP == 0)


def _row_chunk(k: int, b: int, bits: int) -> int:
    """Columns per piece: a power of two giving the dot at least 16 rows (K / B per piece for
    8 bits, half of that per nibble tile for 4 bits), at most ROW_CHUNK_MAX."""
    least = (32 if bits == 4 else 16) * b
    return max(least, min(triton_next_pow2(k), ROW_CHUNK_MAX))


def norm_shift_supported(rotation: torch.Tensor | None, k: int, bits: int, rotation_kernel: str = "row") -> bool:
    """Whether the Triton kernels take an adaptive norm's shift (``rmsnorm_quantize(...,
    norm_shift=)``) for this layer: the row kernel does (shared rotation, B >= 16); the tile
    kernels do not (the caller then runs the norm on its own). The torch path always does."""
    return (
        rotation is not None and rotation_kernel == "row" and _row_kernel_applies(rotation, k, bits) and not _ROW_BROKEN
    )


def _launch_row_quant(tq, x2, norm_weight, eps, offset, inv_smooth, perm, rot, bits, q, s, prec, norm_shift=None):
    m, k = x2.shape
    b = rot.shape[-1]
    chunk = _row_chunk(k, b, bits)
    dummy = s
    tq.row_quant_kernel[(m,)](
        x2,
        norm_weight.contiguous() if norm_weight is not None else dummy,
        inv_smooth.contiguous() if inv_smooth is not None else dummy,
        perm.contiguous() if perm is not None else dummy,
        rot,
        q,
        s,
        k,
        x2.stride(0),
        q.stride(0),
        float(eps),
        float(offset),
        norm_shift.contiguous() if norm_shift is not None else dummy,
        HAS_NORM=norm_weight is not None,
        HAS_SMOOTH=inv_smooth is not None,
        HAS_PERM=perm is not None,
        ROT_B=b,
        ROT_PREC=_ROT_PREC[prec],
        QMAX=_QMAX[bits],
        PACK4=bits == 4,
        CHUNK=chunk,
        SINGLE=chunk >= k,
        HAS_SHIFT=norm_shift is not None,
        NORM_IN_SCALE=norm_weight is not None and norm_shift is None,
        num_warps=4 if chunk <= 2048 else 8,
    )


def _disable_row_kernel(err: Exception) -> None:
    """The row kernel was first compiled for a GPU in the run that measures it: if this
    Triton/card rejects it, log why once and use the tile kernel (same codes) from then on."""
    global _ROW_BROKEN
    _ROW_BROKEN = True
    log_fallback_once(
        "building the row-wise quantization kernel",
        err,
        "quantizing rotated activations with the tile kernel from now on (same codes)",
    )


def quantize_per_token(
    x: torch.Tensor,
    bits: int = 8,
    inv_smooth: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    *,
    perm: torch.Tensor | None = None,
    backend: str | None = None,
    out: tuple | None = None,
    rotation_kernel: str = "row",
    rotation_precision: str = "ieee",
):
    """Symmetric per-token quantization of x (..., K) -> (q, scale (...,) float32).

    q is int8 (..., K) for bits=8, packed uint8 (..., K // 2) for bits=4 (layout of
    packing.py).  ``inv_smooth`` (K,) multiplies x first, ``perm`` (K,) reorders channels
    (``v[:, j] = v[:, perm[j]]``), then ``rotation`` - (B, B) shared or (K/B, B, B) per block,
    B a power of two <= 64 - maps each block of B channels ``v_b -> v_b @ R_b``.  This is the
    activation side of quantvla_core.quant.transforms.InputTransform, done in the kernel.

    Rotated input on Triton: ``rotation_kernel`` "row" (default, one program per token, for a
    shared rotation with B >= 16) or "tile" (16 tokens per program; the same codes, the kernel of
    every other rotation and the fallback when the row kernel fails to build); ``rotation_precision``
    "ieee" (default, exact fp32), "tf32" or "tf32x3" (tensor cores, CUDA only: tf32 can move a
    code at a rounding boundary by one step).  The other backends ignore both (after checking them).
    """
    return _quantize_impl(
        x, None, 0.0, 0.0, inv_smooth, perm, rotation, bits, backend, out, rotation_kernel, rotation_precision
    )


def rmsnorm_quantize(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    bits: int = 8,
    offset: float = 0.0,
    inv_smooth: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    *,
    perm: torch.Tensor | None = None,
    backend: str | None = None,
    out: tuple | None = None,
    rotation_kernel: str = "row",
    rotation_precision: str = "ieee",
    norm_shift: torch.Tensor | None = None,
):
    """RMSNorm ``x * rstd * (offset + w)`` (Gemma: offset=1) fused with smoothing, rotation and
    per-token quantization, in one kernel on Triton.  Returns (q, scale) as quantize_per_token,
    whose ``rotation_kernel`` / ``rotation_precision`` it takes too.  ``norm_shift`` (K,): an
    adaptive norm ``x * rstd * (offset + w) + shift`` (pi0.5's adaRMS with w = 1 + scale,
    offset 0); on Triton only where `norm_shift_supported` says so (else ValueError)."""
    if norm_weight is None:
        raise ValueError("rmsnorm_quantize needs norm_weight (K,); use quantize_per_token without a norm")
    return _quantize_impl(
        x,
        norm_weight,
        eps,
        offset,
        inv_smooth,
        perm,
        rotation,
        bits,
        backend,
        out,
        rotation_kernel,
        rotation_precision,
        norm_shift,
    )
