"""Public integer ops: activation quantization and W8A8 / W4A8 / W4A4 GEMMs, dispatched by device.

Backends (``backend=`` keyword, or :func:`set_default_backend` / :func:`backend_scope`):

* ``"triton"``  - the Triton kernels (default on CUDA).  On CPU tensors it needs the Triton
  interpreter (``TRITON_INTERPRET=1`` in the environment before these kernels are imported).
* ``"cpu"``     - exact integer math in torch: ``torch._int_mm`` (int32 accumulation) where it
  applies, else float64 matmul, which is exact for these int8 products (default on CPU).
* ``"reference"`` - deliberately plain: unpack everything, float64 matmul, loop over groups.

All backends share one epilogue: ``y = acc.float() * xs[m] * ws[n] (+ bias[n])`` cast to
``out_dtype``; with group-wise weight scales ``y = (sum_g acc_g.float() * ws[n, g]) * xs[m]``.

Activation quantization (symmetric, per token): ``q = round_half_even(y * QMAX / absmax(y))``
clamped to +-QMAX (127 for 8 bits, 7 for 4 bits), ``scale = absmax / QMAX``; an all-zero row
gets scale 1 and q 0.  ``y`` is built as ``v = x * (offset + w)`` (RMSNorm weight),
``v = v * inv_smooth``, ``v = v[:, perm]``, ``v = v @ R_b`` on each block b of B channels,
``y = v * rstd`` where ``rstd = 1 / sqrt(sum(x^2) / K + eps)``.  Folding into weights (as
``InputTransform.fold_weight`` does): ``W' = rotate(permute(W * s))`` on the K axis, so
``y W'^T`` equals the original ``norm(x) W^T``.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Iterator

import torch

from .packing import PACK_GROUP, unpack_int4

BACKENDS = ("triton", "cpu", "reference")
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROTATION_BLOCKS = (1, 2, 4, 8, 16, 32, 64)
_QMAX = {8: 127, 4: 7}

_state = threading.local()
_global_default: str | None = None


# ----------------------------------------------------------------------------- backend choice
def set_default_backend(name: str | None) -> None:
    """Force every op (unless given ``backend=``) onto one backend; None restores dispatch."""
    global _global_default
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS} or None")
    _global_default = name


@contextlib.contextmanager
def backend_scope(name: str | None) -> Iterator[None]:
    """Context manager: ops inside run on ``name`` (thread-local); lets a whole Policy be
    compared between backends without touching its modules."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS} or None")
    prev = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = prev


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op will use for tensors on ``device``."""
    name = backend or getattr(_state, "backend", None) or _global_default
    if name is None:
        return "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS}")
    return name


def triton_interpreting() -> bool:
    """Whether Triton kernels defined now run in the interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the flag is the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_modules(device: torch.device):
    """Import the Triton kernels lazily (the interpreter flag is read at import time)."""
    interpreted = triton_interpreting()
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "backend='triton' got CPU tensors but the Triton interpreter is off: set "
            "TRITON_INTERPRET=1 before importing quantvla_kernels' Triton kernels, or use "
            "backend='cpu' / 'reference'")
    from . import triton_gemm, triton_quant

    return triton_gemm, triton_quant


# ----------------------------------------------------------------------------- validation
def _check_tensor(t, name: str, dtypes: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]} ({what}), got {t.dtype}")


def _check_out_dtype(out_dtype) -> torch.dtype:
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in OUT_DTYPES]}, got {out_dtype}")
    return out_dtype


def _check_bits(bits: int) -> int:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return bits


def _flatten_act(xq: torch.Tensor, xs: torch.Tensor, name: str):
    if xq.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., K)")
    lead = tuple(xq.shape[:-1])
    m = math.prod(lead)
    if xs.numel() != m:
        raise ValueError(f"xs must hold one scale per row of {name}: expected {m} values "
                         f"(shape {lead}), got shape {tuple(xs.shape)}")
    return lead, xq.reshape(m, xq.shape[-1]).contiguous(), xs.reshape(m).to(torch.float32).contiguous()


def _check_weight_scales(ws: torch.Tensor, n: int, k: int, group_size: int | None):
    _check_tensor(ws, "ws", (torch.float32, torch.float16, torch.bfloat16), "weight scales")
    if group_size is None:
        if ws.dim() == 2 and ws.shape[1] == 1:
            ws = ws[:, 0]
        if tuple(ws.shape) != (n,):
            raise ValueError(f"per-channel ws must have shape ({n},) (one scale per output channel), "
                             f"got {tuple(ws.shape)}; pass group_size for group-wise scales")
    else:
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        g = -(-k // group_size)
        if tuple(ws.shape) != (n, g):
            raise ValueError(f"group-wise ws must have shape (N, ceil(K / group_size)) = ({n}, {g}) "
                             f"for K={k}, group_size={group_size}; got {tuple(ws.shape)}")
    return ws.to(torch.float32).contiguous()


def _check_bias(bias, n: int, device: torch.device):
    if bias is None:
        return None
    _check_tensor(bias, "bias", OUT_DTYPES, "per-output-channel bias")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the activations are on {device}")
    return bias.contiguous()


def _check_out(out, shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out"):
    """A caller-provided output (CUDA graphs want fixed buffers): exact shape/dtype, contiguous."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def _check_same_device(device: torch.device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {device}; "
                             "all operands must be on one device")


# ----------------------------------------------------------------------------- torch math
def _epilogue(acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor | None, bias, out_dtype):
    y = acc.to(torch.float32) * xs[:, None]
    if ws is not None:
        y = y * ws[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)[None, :]
    return y.to(out_dtype)


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
        except RuntimeError:  # shape rules differ between torch versions: take the exact f64 path
            pass
    return (x8.to(torch.float64) @ w8.to(torch.float64).t()).to(torch.int32)


def _grouped_acc_torch(x8, w8, ws, group_size, dot):
    """sum over groups of dot(x_g, w_g).float() * ws[:, g], accumulated in group order."""
    k = x8.shape[1]
    y = torch.zeros((x8.shape[0], w8.shape[0]), dtype=torch.float32, device=x8.device)
    for g, k0 in enumerate(range(0, k, group_size)):
        acc = dot(x8[:, k0:k0 + group_size].contiguous(), w8[:, k0:k0 + group_size].contiguous())
        y = y + acc.to(torch.float32) * ws[None, :, g]
    return y


def _reference_dot(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    return x8.to(torch.float64) @ w8.to(torch.float64).t()


def _gemm_torch(x8, xs, w8, ws, group_size, bias, out_dtype, backend):
    dot = _reference_dot if backend == "reference" else _int_dot_exact
    if group_size is None:
        return _epilogue(dot(x8, w8), xs, ws, bias, out_dtype)
    y = _grouped_acc_torch(x8, w8, ws, group_size, dot)
    return _epilogue(y, xs, None, bias, out_dtype)


def _quantize_torch(x, norm_weight, eps, offset, inv_smooth, perm, rotation, bits):
    m, k = x.shape
    qmax = _QMAX[bits]
    xf = x.to(torch.float32)
    v = xf
    if norm_weight is not None:
        v = v * (float(offset) + norm_weight.to(torch.float32))[None, :]
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
    # Tensor divisors on purpose: torch on CUDA turns "tensor / python number" into a multiply
    # by the reciprocal, which is not the IEEE quotient the kernel computes.
    if norm_weight is not None:
        ms = (xf * xf).sum(dim=1) / torch.full((m,), float(k), device=x.device)
        rstd = torch.ones_like(ms) / torch.sqrt(ms + eps)
        v = v * rstd[:, None]
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


# ----------------------------------------------------------------------------- quantization
def _check_rotation(rotation, k: int, bits: int, device: torch.device):
    if rotation is None:
        return None
    _check_tensor(rotation, "rotation", (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                  "orthogonal block rotation (B, B) or (K/B, B, B)")
    if rotation.dim() not in (2, 3) or rotation.shape[-1] != rotation.shape[-2]:
        raise ValueError(f"rotation must be (B, B) (shared by all blocks) or (K/B, B, B) (one per "
                         f"block), got shape {tuple(rotation.shape)}")
    b = rotation.shape[-1]
    if b not in ROTATION_BLOCKS:
        raise ValueError(f"rotation block size B must be one of {ROTATION_BLOCKS}, got {b}")
    if k % b:
        raise ValueError(f"K={k} must be a multiple of the rotation block size B={b}")
    if rotation.dim() == 3 and rotation.shape[0] != k // b:
        raise ValueError(f"per-block rotation must have K/B = {k // b} blocks, got {rotation.shape[0]}")
    if bits == 4 and ((k % PACK_GROUP) // 2) % b:
        raise ValueError(
            f"with bits=4 the last packing group of K={k} has half-width {(k % PACK_GROUP) // 2}, "
            f"not a multiple of the rotation block B={b}; use a smaller B or K % 128 == 0")
    if rotation.device != device:
        raise ValueError(f"rotation is on {rotation.device} but x is on {device}")
    return rotation


def _check_perm(perm, k: int, device: torch.device):
    if perm is None:
        return None
    _check_tensor(perm, "perm", (torch.int64, torch.int32), "channel permutation (K,)")
    if tuple(perm.shape) != (k,):
        raise ValueError(f"perm must have shape ({k},), got {tuple(perm.shape)}")
    if perm.device != device:
        raise ValueError(f"perm is on {perm.device} but x is on {device}")
    return perm


def _quantize_impl(x, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, backend, out):
    _check_tensor(x, "x", (torch.float32, torch.float16, torch.bfloat16), "activations (..., K)")
    bits = _check_bits(bits)
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
    _check_same_device(device, norm_weight=norm_weight, inv_smooth=inv_smooth)
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
    if name != "triton" or m == 0:
        q, s = _quantize_torch(x2, norm_weight, eps, offset, inv_smooth, perm, rotation, bits)
        q, s = q.reshape(*lead, kq), s.reshape(lead)
        if out is None:
            return q, s
        return out[0].copy_(q), out[1].copy_(s)
    q2 = out[0].view(m, kq) if out is not None else None
    s2 = out[1].view(m) if out is not None else None
    q, s = _quantize_triton(x2, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, q2, s2)
    if out is not None:
        return out[0], out[1]
    return q.reshape(*lead, kq), s.reshape(lead)


def _quantize_triton(x2, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, q=None, s=None):
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
    prec = rotation_precision()
    if has_rot:
        rot = rotation.to(torch.float32).contiguous()
        stride_rb = rot.stride(0) if rot.dim() == 3 else 0
        if _row_kernel_applies(rot, k, bits):
            try:
                _launch_row_quant(tq, x2, norm_weight, eps, offset, inv_smooth, perm, rot, bits, q, s, prec)
                return q, s
            except Exception as e:  # noqa: BLE001 - a compile failure of the row kernel only
                if x2.device.type != "cuda":  # the interpreter: a bug, not a toolchain limit
                    raise
                _disable_row_kernel(e)
    tq.norm_quant_kernel[(triton_cdiv(m, block_m),)](
        x2, norm_weight.contiguous() if norm_weight is not None else dummy,
        inv_smooth.contiguous() if inv_smooth is not None else dummy,
        perm.contiguous() if perm is not None else dummy,
        rot if has_rot else dummy, q, s,
        m, k, x2.stride(0), q.stride(0), stride_rb if has_rot else 0, float(eps), float(offset),
        HAS_NORM=norm_weight is not None, HAS_SMOOTH=inv_smooth is not None,
        HAS_PERM=perm is not None, HAS_ROT=has_rot, ROT_B=rotation.shape[-1] if has_rot else 1,
        QMAX=_QMAX[bits], PACK4=bits == 4, BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_TILE=single,
        ROT_PREC=_ROT_PREC[prec], num_warps=num_warps)
    return q, s


# Rotated activations: how the quantization kernel runs (read on every call, so a benchmark can
# compare the variants in one process; a captured CUDA graph keeps what was set at capture).
# QUANTVLA_QUANT_KERNEL=row (default): one program per token, the rotation one dot of the row
#   reshaped to (K / B, B) rows (shared (B, B) rotation, 16 <= B, 8-bit or K % 128 == 0);
#   =tile: the original BLOCK_M=16 kernel with a block-diagonal (64, 64) dot per tile.
# QUANTVLA_ROT_PRECISION=ieee (default, fp32 FMA: the tested-exact numbers) | tf32 (tensor cores,
#   v rounded to a 10-bit mantissa before the dot: codes at rounding boundaries may move by one)
#   | tf32x3 (tensor cores, split operands: within a few fp32 ulps of ieee).  Only CUDA honours
#   tf32 / tf32x3; the interpreter computes every variant in fp32.
_ROT_PREC = {"ieee": 0, "tf32": 1, "tf32x3": 2}
ROW_CHUNK_MAX = 4096
_ROW_BROKEN = False


def rotation_precision() -> str:
    p = os.environ.get("QUANTVLA_ROT_PRECISION", "ieee").strip().lower() or "ieee"
    if p not in _ROT_PREC:
        raise ValueError(f"QUANTVLA_ROT_PRECISION must be one of {tuple(_ROT_PREC)}, got {p!r}")
    return p


def quant_kernel_kind() -> str:
    kind = os.environ.get("QUANTVLA_QUANT_KERNEL", "row").strip().lower() or "row"
    if kind not in ("row", "tile"):
        raise ValueError(f"QUANTVLA_QUANT_KERNEL must be row or tile, got {kind!r}")
    return kind


def _row_kernel_applies(rot: torch.Tensor, k: int, bits: int) -> bool:
    b = rot.shape[-1]
    return (not _ROW_BROKEN and quant_kernel_kind() == "row" and rot.dim() == 2 and b >= 16
            and (bits == 8 or k % PACK_GROUP == 0))


def _row_chunk(k: int, b: int, bits: int) -> int:
    """Columns per piece: a power of two giving the dot at least 16 rows (K / B per piece for
    8 bits, half of that per nibble tile for 4 bits), at most ROW_CHUNK_MAX."""
    least = (32 if bits == 4 else 16) * b
    return max(least, min(triton_next_pow2(k), ROW_CHUNK_MAX))


def _launch_row_quant(tq, x2, norm_weight, eps, offset, inv_smooth, perm, rot, bits, q, s, prec):
    m, k = x2.shape
    b = rot.shape[-1]
    chunk = _row_chunk(k, b, bits)
    dummy = s
    tq.row_quant_kernel[(m,)](
        x2, norm_weight.contiguous() if norm_weight is not None else dummy,
        inv_smooth.contiguous() if inv_smooth is not None else dummy,
        perm.contiguous() if perm is not None else dummy, rot, q, s,
        k, x2.stride(0), q.stride(0), float(eps), float(offset),
        HAS_NORM=norm_weight is not None, HAS_SMOOTH=inv_smooth is not None, HAS_PERM=perm is not None,
        ROT_B=b, ROT_PREC=_ROT_PREC[prec], QMAX=_QMAX[bits], PACK4=bits == 4, CHUNK=chunk,
        SINGLE=chunk >= k, num_warps=4 if chunk <= 2048 else 8)


def _disable_row_kernel(err: Exception) -> None:
    """The row kernel was first compiled for a GPU in the run that measures it: if this
    Triton/card rejects it, say so once and use the tile kernel from then on."""
    global _ROW_BROKEN
    import warnings

    _ROW_BROKEN = True
    warnings.warn(f"row-wise quantization kernel failed to build ({type(err).__name__}: {str(err)[:200]}); "
                  "using the tile kernel", RuntimeWarning, stacklevel=3)


def quantize_per_token(x: torch.Tensor, bits: int = 8, inv_smooth: torch.Tensor | None = None,
                       rotation: torch.Tensor | None = None, *, perm: torch.Tensor | None = None,
                       backend: str | None = None, out: tuple | None = None):
    """Symmetric per-token quantization of x (..., K) -> (q, scale (...,) float32).

    q is int8 (..., K) for bits=8, packed uint8 (..., K // 2) for bits=4 (layout of
    packing.py).  ``inv_smooth`` (K,) multiplies x first, ``perm`` (K,) reorders channels
    (``v[:, j] = v[:, perm[j]]``), then ``rotation`` - (B, B) shared or (K/B, B, B) per block,
    B a power of two <= 64 - maps each block of B channels ``v_b -> v_b @ R_b``.  This is the
    activation side of quantvla_core.quant.transforms.InputTransform, done in the kernel.
    """
    return _quantize_impl(x, None, 0.0, 0.0, inv_smooth, perm, rotation, bits, backend, out)


def rmsnorm_quantize(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, bits: int = 8,
                     offset: float = 0.0, inv_smooth: torch.Tensor | None = None,
                     rotation: torch.Tensor | None = None, *, perm: torch.Tensor | None = None,
                     backend: str | None = None, out: tuple | None = None):
    """RMSNorm ``x * rstd * (offset + w)`` (Gemma: offset=1) fused with smoothing, rotation and
    per-token quantization, in one kernel on Triton.  Returns (q, scale) as quantize_per_token."""
    if norm_weight is None:
        raise ValueError("rmsnorm_quantize needs norm_weight (K,); use quantize_per_token without a norm")
    return _quantize_impl(x, norm_weight, eps, offset, inv_smooth, perm, rotation, bits, backend, out)


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- GEMM configs
_SMS: dict = {}
_TUNED: dict = {}
_AUTOTUNE = os.environ.get("QUANTVLA_AUTOTUNE", "0") == "1"


def set_autotune(enabled: bool) -> None:
    """Benchmark a few tile configs per (kernel, M bucket, N, K) on first use (CUDA only, M <= 64,
    never during CUDA-graph capture, where the fixed table is used)."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def m_bucket(m: int) -> int:
    """Configs are keyed by M rounded up to a power of two (16..1024)."""
    return min(1024, max(16, triton_next_pow2(m)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _split_for(tiles: int, k_tiles: int, sms: int, min_iters: int) -> int:
    """Power-of-two split-K that brings the CTA count up to about 2 per SM while every split
    keeps at least ``min_iters`` K-iterations."""
    split = 1
    while split < 16 and tiles * split * 2 <= 2 * sms and k_tiles // (split * 2) >= min_iters:
        split *= 2
    return split


def gemm_config(kind: str, m: int, n: int, k: int, device: torch.device,
                num_sms: int | None = None) -> dict:
    """The fixed (non-tuned) tile table: small M uses BLOCK_M 16/32/64 with split-K, large M
    128x128 tiles; see docs/kernels-notes.md for the reasoning."""
    mb = m_bucket(m)
    sms = num_sms or _num_sms(device)
    kind = {"w8a8f": "w8a8", "w4a8f": "w4a8"}.get(kind, kind)
    if kind == "w8a8":
        bk = min(256, max(32, triton_next_pow2(k)))
        if mb <= 64:
            cfg = dict(BLOCK_M=mb, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1, num_warps=4, num_stages=4)
        elif mb <= 128:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=min(bk, 128), GROUP_M=8, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=min(bk, 128), GROUP_M=8, num_warps=8, num_stages=4)
        k_tiles = triton_cdiv(k, cfg["BLOCK_K"])
    else:  # w4a8 / w4a4: the K tile is one 128-wide packing group
        if mb <= 64:
            # A W4 step moves BLOCK_N x 64 bytes; at BLOCK_N 64 (4 KB) the H200 run reached only
            # 0.9 TB/s, so wider tiles where N allows (unmeasured guess, see kernels-notes.md).
            bn = 128 if n >= 4096 else 64
            cfg = dict(BLOCK_M=mb, BLOCK_N=bn, GROUP_M=1, num_warps=4, num_stages=4)
        elif mb <= 128:
            cfg = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)
        # Swapped (acc^T = W x^T) by default: see triton_gemm.py; chosen from Hopper's operand
        # rules after the H200 run, where the unswapped W4 kernel was 3x slower than W8A8.
        # QUANTVLA_W4_SWAP=0 restores the unswapped kernel (the one measured on the H200).
        cfg["SWAP"] = os.environ.get("QUANTVLA_W4_SWAP", "1") != "0"
        k_tiles = triton_cdiv(k, PACK_GROUP)
    tiles = triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"])
    if kind == "w8a8" and mb <= 64 and cfg["BLOCK_N"] > 32 and tiles < sms and 20 * tiles >= 9 * sms:
        # Narrower tiles fill the card without split-K, whose reduction is one more launch.
        cfg["BLOCK_N"] //= 2
        cfg["SPLIT_K"] = 1
        return fit_smem(kind, cfg)
    cfg["SPLIT_K"] = _split_for(tiles, k_tiles, sms, 2 if mb <= 128 else 4)
    return fit_smem(kind, cfg)


def _candidates(kind: str, m: int, n: int, k: int, device) -> list[dict]:
    """Tile configs the tuner tries: the fixed-table choice plus neighbours in BLOCK_N,
    BLOCK_K (int8 weights) and split-K for small M; wider tiles for large M."""
    base = gemm_config(kind, m, n, k, device)
    out = [base]
    if m_bucket(m) <= 64:
        bks = (256, 512) if kind == "w8a8" else (None,)
        for bn in ((32, 64, 128) if kind == "w8a8" else (64, 128)):
            for bk in bks:
                k_tiles = triton_cdiv(k, bk or PACK_GROUP)
                for split in (1, 2, 4, 8):
                    if split > 1 and k_tiles // split < 1:
                        continue
                    c = dict(base, BLOCK_N=bn, SPLIT_K=split, num_stages=3 if bk == 512 else 4)
                    if bk:
                        c["BLOCK_K"] = min(bk, max(32, triton_next_pow2(k)))
                    if c not in out:
                        out.append(c)
        if kind != "w8a8":
            out += [dict(c, SWAP=not c.get("SWAP", False)) for c in list(out)]
        else:  # swapped W8A8: weight rows as the 64-row MMA dimension (wgmma-eligible)
            out += [dict(c, SWAP=True) for c in list(out)
                    if c["BLOCK_N"] >= 64 and c.get("BLOCK_K") == min(256, max(32, triton_next_pow2(k)))]
    else:
        if kind != "w8a8":
            out.append(dict(base, SWAP=not base.get("SWAP", False)))
        out += [dict(base, BLOCK_N=256, num_warps=8, num_stages=3, SPLIT_K=1),
                dict(base, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, SPLIT_K=1),
                dict(base, num_stages=3), dict(base, SPLIT_K=2)]
    return out


SMEM_BUDGET = 160 * 1024
"""Bytes of pipelined operand tiles a config may ask for (H100/H200 allow 227 KB per block;
Triton adds layout-conversion scratch on top)."""


def smem_estimate(kind: str, cfg: dict, x_bytes: int = 1) -> int:
    """Shared memory of the software pipeline: stages x (x tile + weight tile)."""
    if kind.startswith("w8a8"):
        per = cfg["BLOCK_M"] * cfg["BLOCK_K"] * x_bytes + cfg["BLOCK_N"] * cfg["BLOCK_K"]
    else:
        per = cfg["BLOCK_M"] * PACK_GROUP * x_bytes + cfg["BLOCK_N"] * (PACK_GROUP // 2)
    return cfg["num_stages"] * per


def fit_smem(kind: str, cfg: dict, x_bytes: int = 1) -> dict:
    """Fewer stages (then a shorter K tile) until the pipeline fits SMEM_BUDGET."""
    cfg = dict(cfg)
    while smem_estimate(kind, cfg, x_bytes) > SMEM_BUDGET:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif kind.startswith("w8a8") and cfg["BLOCK_K"] > 64:
            cfg["BLOCK_K"] //= 2
        else:
            break
    return cfg


def _pick_config(kind, m, n, k, device, run, x_bytes: int = 1) -> dict:
    """Tuned config if one was measured for this (kind, M bucket, N, K), else the fixed table.
    The fused float-input kinds reuse their int8-input kind's tuning."""
    base_kind = {"w8a8f": "w8a8", "w4a8f": "w4a8"}.get(kind, kind)
    _load_env_tuned()
    key = (base_kind, m_bucket(m), n, k)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return fit_smem(kind, cfg, x_bytes)
    if (not (_AUTOTUNE and device.type == "cuda") or base_kind != kind or m_bucket(m) > 64
            or torch.cuda.is_current_stream_capturing()):
        return fit_smem(kind, gemm_config(kind, m, n, k, device), x_bytes)
    from triton.testing import do_bench

    best, best_t = None, float("inf")
    for cand in _candidates(kind, m, n, k, device):
        if smem_estimate(kind, cand, x_bytes) > SMEM_BUDGET:
            continue
        try:
            t = do_bench(lambda: run(cand), warmup=5, rep=20)
        except Exception:  # a config can exceed shared memory on a smaller card
            continue
        if t < best_t:
            best, best_t = cand, t
    _TUNED[key] = best or gemm_config(kind, m, n, k, device)
    return _TUNED[key]


def tuned_configs() -> list[dict]:
    """What the tuner chose so far (for benchmark reports and for baking into the table)."""
    return [dict(kind=k[0], m_bucket=k[1], N=k[2], K=k[3], **cfg) for k, cfg in _TUNED.items()]


_CFG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "SWAP", "num_warps", "num_stages")
_env_loaded = False


def load_tuned_configs(source) -> int:
    """Install tuned configs: a list as returned by :func:`tuned_configs`, or a JSON file holding
    such a list or a benchmark result with ``tuned_configs``.  Keyed by (kind, M bucket, N, K);
    they apply to every card, so load the file measured on the card you run.  Returns the count.
    ``QUANTVLA_TUNED_CONFIGS=<file>`` loads one automatically on first use."""
    if isinstance(source, (str, os.PathLike)):
        import json

        with open(source, encoding="utf-8") as f:
            source = json.load(f)
    if isinstance(source, dict):
        source = source.get("tuned_configs", [])
    if not isinstance(source, list):
        raise ValueError("tuned configs must be a list of dicts (or a JSON file / benchmark result holding one)")
    for i, c in enumerate(source):
        missing = [key for key in ("kind", "m_bucket", "N", "K", "BLOCK_M", "BLOCK_N", "SPLIT_K") if key not in c]
        if missing or c["kind"] not in ("w8a8", "w4a8", "w4a4") or (c["kind"] == "w8a8" and "BLOCK_K" not in c):
            raise ValueError(f"tuned config #{i} is malformed (missing {missing or ['BLOCK_K']}, or unknown "
                             f"kind {c.get('kind')!r}; kinds: w8a8, w4a8, w4a4): {c}")
        cfg = {key: int(c[key]) for key in _CFG_KEYS if key in c}
        cfg.setdefault("GROUP_M", 1)
        cfg.setdefault("num_warps", 4)
        cfg.setdefault("num_stages", 3)
        _TUNED[(c["kind"], int(c["m_bucket"]), int(c["N"]), int(c["K"]))] = cfg
    return len(source)


def _load_env_tuned() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        path = os.environ.get("QUANTVLA_TUNED_CONFIGS")
        if path:
            load_tuned_configs(path)


# ----------------------------------------------------------------------------- Triton GEMMs
PROLOGUE_ELEMS = 16384
"""Largest (BLOCK_M x PRO_K) float tile the fused prologue loads at once (64 KB of fp32)."""


def _prologue_k(block_m: int, k: int) -> int:
    return max(16, min(triton_next_pow2(k), PROLOGUE_ELEMS // block_m))


def _launch_w8a8(tg, x, xs, w8, ws, bias, out, cfg, smooth=None, xs_out=None):
    """x int8 with scales xs, or (xs None) float x quantized inside the kernel, scales -> xs_out."""
    m, k = x.shape
    n = w8.shape[0]
    split = cfg["SPLIT_K"]
    a_float = xs is None
    part = torch.empty((split, m, n), dtype=torch.int32, device=x.device) if split > 1 else out
    grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)
    scales = xs_out if a_float else xs
    tg.w8a8_kernel[grid](
        x, w8, scales, ws, bias if bias is not None else ws, out, part,
        smooth if smooth is not None else ws, scales,
        m, n, k, x.stride(0), w8.stride(0), out.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
        GROUP_M=cfg["GROUP_M"], EVEN_K=k % (cfg["BLOCK_K"] * split) == 0,
        HAS_BIAS=bias is not None, A_FLOAT=a_float, HAS_SMOOTH=smooth is not None,
        PRO_K=_prologue_k(cfg["BLOCK_M"], k) if a_float else 16, SWAP=bool(cfg.get("SWAP", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        _launch_reduce(tg, part, scales, ws, bias, out, apply_ws=True)
    return out


def _launch_reduce(tg, part, xs, ws, bias, out, apply_ws):
    split, m, n = part.shape
    grid = (triton_cdiv(m, 16), triton_cdiv(n, 128))
    tg.splitk_reduce_kernel[grid](part, xs, ws, bias if bias is not None else xs, out, m, n, out.stride(0),
                                  SPLIT_K=split, APPLY_WS=apply_ws, HAS_BIAS=bias is not None,
                                  BLOCK_M=16, BLOCK_N=128, num_warps=4)


def _launch_w4(tg, x, xs, wp, ws, group_size, bias, out, k, a_packed, cfg, smooth=None, xs_out=None):
    m = x.shape[0]
    n = wp.shape[0]
    split = cfg["SPLIT_K"]
    grouped = group_size is not None
    a_float = xs is None
    scales = xs_out if a_float else xs
    pdtype = torch.float32 if grouped else torch.int32
    part = torch.empty((split, m, n), dtype=pdtype, device=x.device) if split > 1 else out
    grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)

    def launch(swap: bool):
        tg.w4_kernel[grid](
            x, wp, scales, ws, bias if bias is not None else ws, out, part,
            smooth if smooth is not None else ws, scales,
            m, n, k, x.stride(0), wp.stride(0), ws.stride(0) if grouped else 1, out.stride(0),
            group_size if grouped else PACK_GROUP,
            A_PACKED=a_packed, GROUPED=grouped, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            SPLIT_K=split, GROUP_M=cfg["GROUP_M"], EVEN_K=k % PACK_GROUP == 0,
            HAS_BIAS=bias is not None, A_FLOAT=a_float, HAS_SMOOTH=smooth is not None,
            PRO_K=_prologue_k(cfg["BLOCK_M"], k) if a_float else 16, SWAP=swap,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    swap = bool(cfg.get("SWAP", False)) and not _W4_SWAP_BROKEN
    try:
        launch(swap)
    except Exception as e:  # noqa: BLE001 - compile-time failure of the unmeasured variant only
        if not swap:
            raise
        _disable_w4_swap(e)
        launch(False)
    if split > 1:
        _launch_reduce(tg, part, scales, ws, bias, out, apply_ws=not grouped)
    return out


_W4_SWAP_BROKEN = False


def _disable_w4_swap(err: Exception) -> None:
    """The swapped W4 kernel was never compiled on a GPU before it became the default: if this
    Triton/card rejects it (compile errors surface before any launch, also under graph
    capture), say so once and use the unswapped kernel from then on."""
    global _W4_SWAP_BROKEN
    import warnings

    _W4_SWAP_BROKEN = True
    warnings.warn(f"swapped W4 kernel failed to build ({type(err).__name__}: {str(err)[:200]}); "
                  "using the unswapped W4 kernel", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- public GEMMs
def gemm_w8a8(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
              backend: str | None = None, config: dict | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 activations xq (..., K) with per-token scales xs (...,) times int8 weights wq (N, K)
    with per-channel scales ws (N,) -> (..., N) in out_dtype (default float32, or out's dtype).
    ``config`` overrides the Triton tile choice (tuning and tests); ``out`` is written in place."""
    _check_tensor(xq, "xq", (torch.int8,), "int8 activations (..., K)")
    _check_tensor(xs, "xs", (torch.float32, torch.float16, torch.bfloat16), "per-token scales")
    _check_tensor(wq, "wq", (torch.int8,), "int8 weights (N, K)")
    if out_dtype is None and isinstance(out, torch.Tensor):
        out_dtype = out.dtype
    out_dtype = _check_out_dtype(out_dtype)
    if wq.dim() != 2 or wq.shape[1] != xq.shape[-1]:
        raise ValueError(f"wq must be (N, K) with K = xq.shape[-1] = {xq.shape[-1]}, got {tuple(wq.shape)}")
    lead, x2, xs2 = _flatten_act(xq, xs, "xq")
    n, k = wq.shape
    device = xq.device
    _check_same_device(device, xs=xs, wq=wq, ws=ws)
    ws = _check_weight_scales(ws, n, k, None)
    bias = _check_bias(bias, n, device)
    out = _check_out(out, (*lead, n), out_dtype, device)
    name = resolve_backend(backend, device)
    m = x2.shape[0]
    if name != "triton" or m == 0 or n == 0 or k == 0:
        y = _gemm_torch(x2, xs2, wq, ws, None, bias, out_dtype, name)
        return y.reshape(*lead, n) if out is None else out.copy_(y.reshape(*lead, n))
    tg, _ = _triton_modules(device)
    wq = wq.contiguous()
    out2 = (torch.empty((m, n), dtype=out_dtype, device=device) if out is None
            else out.view(m, n))

    def run(cfg):
        return _launch_w8a8(tg, x2, xs2, wq, ws, bias, out2, cfg)

    run(config or _pick_config("w8a8", m, n, k, device, run))
    return out2.reshape(*lead, n) if out is None else out


def _gemm_w4(xq, xs, wq_packed, ws, group_size, bias, out_dtype, backend, config, a_packed, out):
    aname = "xq_packed" if a_packed else "xq"
    _check_tensor(xq, aname, (torch.uint8,) if a_packed else (torch.int8,),
                  "packed int4 activations (..., K/2)" if a_packed else "int8 activations (..., K)")
    _check_tensor(xs, "xs", (torch.float32, torch.float16, torch.bfloat16), "per-token scales")
    _check_tensor(wq_packed, "wq_packed", (torch.uint8,), "packed int4 weights (N, K/2) from pack_int4")
    if out_dtype is None and isinstance(out, torch.Tensor):
        out_dtype = out.dtype
    out_dtype = _check_out_dtype(out_dtype)
    k = xq.shape[-1] * 2 if a_packed else xq.shape[-1]
    if k % 2:
        raise ValueError(f"int4 weights need an even K, got K={k}")
    if wq_packed.dim() != 2 or wq_packed.shape[1] * 2 != k:
        raise ValueError(f"wq_packed must be (N, K/2) = (N, {k // 2}) for K={k}, got {tuple(wq_packed.shape)}")
    lead, x2, xs2 = _flatten_act(xq, xs, aname)
    n = wq_packed.shape[0]
    device = xq.device
    _check_same_device(device, xs=xs, wq_packed=wq_packed, ws=ws)
    ws = _check_weight_scales(ws, n, k, group_size)
    bias = _check_bias(bias, n, device)
    out = _check_out(out, (*lead, n), out_dtype, device)
    name = resolve_backend(backend, device)
    m = x2.shape[0]
    if name == "triton" and group_size is not None and group_size % PACK_GROUP:
        raise ValueError(f"the Triton int4 kernels take group_size as a multiple of {PACK_GROUP} "
                         f"(or None for per-channel), got {group_size}; backend='cpu' takes any")
    if name != "triton" or m == 0 or n == 0 or k == 0:
        x8 = unpack_int4(x2) if a_packed else x2
        y = _gemm_torch(x8, xs2, unpack_int4(wq_packed), ws, group_size, bias, out_dtype, name)
        return y.reshape(*lead, n) if out is None else out.copy_(y.reshape(*lead, n))
    tg, _ = _triton_modules(device)
    wq_packed = wq_packed.contiguous()
    out2 = (torch.empty((m, n), dtype=out_dtype, device=device) if out is None
            else out.view(m, n))
    kind = "w4a4" if a_packed else "w4a8"

    def run(cfg):
        return _launch_w4(tg, x2, xs2, wq_packed, ws, group_size, bias, out2, k, a_packed, cfg)

    run(config or _pick_config(kind, m, n, k, device, run))
    return out2.reshape(*lead, n) if out is None else out


def gemm_w4a8(xq: torch.Tensor, xs: torch.Tensor, wq_packed: torch.Tensor, ws: torch.Tensor,
              group_size: int | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, *, backend: str | None = None,
              config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 activations (..., K) x int4 weights packed (N, K/2); ws (N,) per channel or
    (N, ceil(K / group_size)) per group -> (..., N)."""
    return _gemm_w4(xq, xs, wq_packed, ws, group_size, bias, out_dtype, backend, config, False, out)


def gemm_w4a4(xq_packed: torch.Tensor, xs: torch.Tensor, wq_packed: torch.Tensor, ws: torch.Tensor,
              group_size: int | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, *, backend: str | None = None,
              config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int4 activations packed (..., K/2) (from quantize_per_token(bits=4)) x int4 weights
    packed (N, K/2) -> (..., N).  Both are unpacked to int8 for the int8 tensor-core dot."""
    return _gemm_w4(xq_packed, xs, wq_packed, ws, group_size, bias, out_dtype, backend, config, True, out)


# ----------------------------------------------------------------------------- float-in linears
FUSE_MAX_M = 64
"""Up to this many tokens the Triton linears quantize activations inside the GEMM; above it
every weight-tile column would re-read x, so a separate quantization kernel is cheaper."""


def _linear(x, wq, ws, group_size, bias, out_dtype, inv_smooth, backend, config, out, fuse, w_bits):
    _check_tensor(x, "x", OUT_DTYPES, "float activations (..., K)")
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    out_dtype = x.dtype if out_dtype is None and out is None else out_dtype
    name = resolve_backend(backend, x.device)
    # Auto: fuse only while the prologue scan is a single tile (a loop of dependent loads
    # costs more than the separate single-tile quantization kernel).
    auto = m <= FUSE_MAX_M and m_bucket(m) * triton_next_pow2(k) <= PROLOGUE_ELEMS
    use_fused = name == "triton" and m > 0 and (auto if fuse is None else bool(fuse))
    if not use_fused:
        xq, xs = quantize_per_token(x, 8, inv_smooth, backend=name)
        if w_bits == 8:
            return gemm_w8a8(xq, xs, wq, ws, bias, out_dtype, backend=name, config=config, out=out)
        return gemm_w4a8(xq, xs, wq, ws, group_size, bias, out_dtype, backend=name, config=config, out=out)
    # Validate through the int8 entry points' rules, on a zero-size stand-in for the codes.
    if inv_smooth is not None:
        _check_tensor(inv_smooth, "inv_smooth", OUT_DTYPES, "inverse smoothing factors (K,)")
        if tuple(inv_smooth.shape) != (k,):
            raise ValueError(f"inv_smooth must have shape ({k},), got {tuple(inv_smooth.shape)}")
    if w_bits == 8:
        _check_tensor(wq, "wq", (torch.int8,), "int8 weights (N, K)")
        if wq.dim() != 2 or wq.shape[1] != k:
            raise ValueError(f"wq must be (N, K) with K = x.shape[-1] = {k}, got {tuple(wq.shape)}")
    else:
        _check_tensor(wq, "wq_packed", (torch.uint8,), "packed int4 weights (N, K/2) from pack_int4")
        if k % 2 or wq.dim() != 2 or wq.shape[1] * 2 != k:
            raise ValueError(f"wq_packed must be (N, K/2) = (N, {k // 2}) for K={k}, got {tuple(wq.shape)}")
        if group_size is not None and group_size % PACK_GROUP:
            raise ValueError(f"the Triton int4 kernels take group_size as a multiple of {PACK_GROUP} "
                             f"(or None for per-channel), got {group_size}; backend='cpu' takes any")
    n = wq.shape[0]
    device = x.device
    _check_same_device(device, wq=wq, ws=ws, inv_smooth=inv_smooth)
    ws = _check_weight_scales(ws, n, k, group_size if w_bits == 4 else None)
    bias = _check_bias(bias, n, device)
    out_dtype = _check_out_dtype(out_dtype if out is None else out.dtype)
    out = _check_out(out, (*lead, n), out_dtype, device)
    tg, _ = _triton_modules(device)
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    wq = wq.contiguous()
    smooth = inv_smooth.contiguous() if inv_smooth is not None else None
    out2 = torch.empty((m, n), dtype=out_dtype, device=device) if out is None else out.view(m, n)
    xs_out = torch.empty((m,), dtype=torch.float32, device=device)
    if w_bits == 8:
        def run(cfg):
            return _launch_w8a8(tg, x2, None, wq, ws, bias, out2, cfg, smooth, xs_out)
        kind = "w8a8f"
    else:
        def run(cfg):
            return _launch_w4(tg, x2, None, wq, ws, group_size, bias, out2, k, False, cfg, smooth, xs_out)
        kind = "w4a8f"
    run(config or _pick_config(kind, m, n, k, device, run, x_bytes=x2.element_size()))
    return out2.reshape(*lead, n) if out is None else out


def linear_w8a8(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, *, inv_smooth: torch.Tensor | None = None,
                backend: str | None = None, config: dict | None = None, out: torch.Tensor | None = None,
                fuse: bool | None = None) -> torch.Tensor:
    """Float x (..., K) -> dynamic per-token int8 -> W8A8 GEMM -> (..., N) in out_dtype (default
    x.dtype).  Exactly quantize_per_token(x, 8, inv_smooth) then gemm_w8a8; on Triton with few
    tokens and short rows (``fuse``: None = automatic) both happen in one kernel."""
    return _linear(x, wq, ws, None, bias, out_dtype, inv_smooth, backend, config, out, fuse, 8)


def linear_w4a8(x: torch.Tensor, wq_packed: torch.Tensor, ws: torch.Tensor, group_size: int | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                inv_smooth: torch.Tensor | None = None, backend: str | None = None,
                config: dict | None = None, out: torch.Tensor | None = None,
                fuse: bool | None = None) -> torch.Tensor:
    """Float x -> dynamic per-token int8 -> W4A8 GEMM; see :func:`linear_w8a8`."""
    return _linear(x, wq_packed, ws, group_size, bias, out_dtype, inv_smooth, backend, config, out, fuse, 4)


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
    return tuple(w[:, k0:k0 + group_size].contiguous() for k0 in range(0, k, group_size))


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


def cpu_int_linear(q: torch.Tensor, xs: torch.Tensor, w_groups: tuple, ws: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
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
            torch._int_mm(q[:, g * gs:(g + 1) * gs], wg.t(), out=acc[g])
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
