"""The integer GEMMs (W8A8, W4A8, W4A4) and the float-input linears: checks, the torch
fallback, and the Triton launchers (split-K reduction, swapped W4 kernel fallback)."""

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
from .packing import PACK_GROUP, unpack_int4
from .quantize import quantize_per_token
from .tiles import _pick_config, m_bucket
from .torch_math import _gemm_torch, group_multiplied_codes
from .validation import (
    OUT_DTYPES,
    _check_bias,
    _check_epilogue,
    _check_group_mult,
    _check_out,
    _check_out_dtype,
    _check_same_device,
    _check_tensor,
    _check_weight_scales,
    _flatten_act,
)


# ----------------------------------------------------------------------------- Triton GEMMs
PROLOGUE_ELEMS = 16384
"""Largest (BLOCK_M x PRO_K) float tile the fused prologue loads at once (64 KB of fp32)."""


def _prologue_k(block_m: int, k: int) -> int:
    return max(16, min(triton_next_pow2(k), PROLOGUE_ELEMS // block_m))


_ACT_CODES = {None: 0, "gelu_tanh": 1, "silu": 2}


def _epilogue_spec(act, gated, residual, residual_gate=None):
    """None when the epilogue is the plain scales + bias one (the kernels' default path)."""
    if act is None and residual is None:
        return None
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if residual_gate is not None and residual_gate.stride(-1) != 1:
        residual_gate = residual_gate.contiguous()
    return act, gated, residual, residual_gate


def _epi_args(epi, out):
    """Kernel arguments of the fused epilogue ``epi`` = (act, gated, residual, residual gate)
    or None: (residual, its row stride, residual gate, constexpr flags)."""
    act, gated, res, rgate = epi if epi is not None else (None, False, None, None)
    return (
        res if res is not None else out,
        res.stride(0) if res is not None else 0,
        rgate if rgate is not None else out,
        dict(ACT=_ACT_CODES[act], GATED=bool(gated), HAS_RES=res is not None, HAS_RGATE=rgate is not None),
    )


def _launch_w8a8(tg, x, xs, w8, ws, bias, out, cfg, smooth=None, xs_out=None, epi=None):
    """x int8 with scales xs, or (xs None) float x quantized inside the kernel, scales -> xs_out.
    ``epi``: the optional activation / gated pair / residual epilogue (act, gated, residual 2-D)."""
    m, k = x.shape
    n = w8.shape[0]
    split = cfg["SPLIT_K"]
    a_float = xs is None
    part = torch.empty((split, m, n), dtype=torch.int32, device=x.device) if split > 1 else out
    grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)
    scales = xs_out if a_float else xs
    res, stride_r, rgate, flags = _epi_args(epi, out)
    tg.w8a8_kernel[grid](
        x,
        w8,
        scales,
        ws,
        bias if bias is not None else ws,
        out,
        part,
        smooth if smooth is not None else ws,
        scales,
        res,
        rgate,
        m,
        n,
        k,
        x.stride(0),
        w8.stride(0),
        out.stride(0),
        stride_r,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        SPLIT_K=split,
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=k % (cfg["BLOCK_K"] * split) == 0,
        HAS_BIAS=bias is not None,
        A_FLOAT=a_float,
        HAS_SMOOTH=smooth is not None,
        PRO_K=_prologue_k(cfg["BLOCK_M"], k) if a_float else 16,
        SWAP=bool(cfg.get("SWAP", False)),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **flags,
    )
    if split > 1:
        _launch_reduce(tg, part, scales, ws, bias, out, apply_ws=True, epi=epi)
    return out


def _launch_reduce(tg, part, xs, ws, bias, out, apply_ws, epi=None):
    split, m, n = part.shape
    grid = (triton_cdiv(m, 16), triton_cdiv(n, 128))
    res, stride_r, rgate, flags = _epi_args(epi, out)
    tg.splitk_reduce_kernel[grid](
        part,
        xs,
        ws,
        bias if bias is not None else xs,
        out,
        res,
        rgate,
        m,
        n,
        out.stride(0),
        stride_r,
        SPLIT_K=split,
        APPLY_WS=apply_ws,
        HAS_BIAS=bias is not None,
        BLOCK_M=16,
        BLOCK_N=128,
        num_warps=4,
        **flags,
    )


def _launch_w4(
    tg, x, xs, wp, ws, group_size, bias, out, k, a_packed, cfg, smooth=None, xs_out=None, epi=None, group_mult=None
):
    m = x.shape[0]
    n = wp.shape[0]
    split = cfg["SPLIT_K"]
    int_groups = group_mult is not None  # integer group scales: one int32 accumulator, ws per channel
    grouped = group_size is not None and not int_groups
    a_float = xs is None
    scales = xs_out if a_float else xs
    pdtype = torch.float32 if grouped else torch.int32
    part = torch.empty((split, m, n), dtype=pdtype, device=x.device) if split > 1 else out
    grid = (triton_cdiv(m, cfg["BLOCK_M"]) * triton_cdiv(n, cfg["BLOCK_N"]), split)
    res, stride_r, rgate, flags = _epi_args(epi, out)

    def launch(swap: bool):
        tg.w4_kernel[grid](
            x,
            wp,
            scales,
            ws,
            bias if bias is not None else ws,
            out,
            part,
            smooth if smooth is not None else ws,
            scales,
            res,
            rgate,
            m,
            n,
            k,
            x.stride(0),
            wp.stride(0),
            ws.stride(0) if grouped else 1,
            group_mult if int_groups else wp,
            group_mult.stride(0) if int_groups else 1,
            out.stride(0),
            stride_r,
            group_size if group_size is not None else PACK_GROUP,
            A_PACKED=a_packed,
            GROUPED=grouped,
            INT_GROUPS=int_groups,
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            SPLIT_K=split,
            GROUP_M=cfg["GROUP_M"],
            EVEN_K=k % PACK_GROUP == 0,
            HAS_BIAS=bias is not None,
            A_FLOAT=a_float,
            HAS_SMOOTH=smooth is not None,
            PRO_K=_prologue_k(cfg["BLOCK_M"], k) if a_float else 16,
            SWAP=swap,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
            **flags,
        )

    swap = bool(cfg.get("SWAP", False)) and not _W4_SWAP_BROKEN
    try:
        launch(swap)
    except triton_build_errors() as e:  # this Triton / card cannot build the swapped variant
        if not swap or x.device.type != "cuda":  # the interpreter builds nothing: a bug, not a toolchain limit
            raise
        _disable_w4_swap(e)
        launch(False)
    if split > 1:
        _launch_reduce(tg, part, scales, ws, bias, out, apply_ws=not grouped, epi=epi)
    return out


_W4_SWAP_BROKEN = False


def _disable_w4_swap(err: Exception) -> None:
    """The swapped W4 kernel was never compiled on a GPU before it became the default: if this
    Triton/card rejects it (compile errors surface before any launch, also under graph
    capture), log why once and use the unswapped kernel (same numbers) from then on."""
    global _W4_SWAP_BROKEN
    _W4_SWAP_BROKEN = True
    log_fallback_once("building the swapped W4 GEMM kernel", err, "using the unswapped W4 kernel from now on")


# ----------------------------------------------------------------------------- public GEMMs
def gemm_w8a8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 activations xq (..., K) with per-token scales xs (...,) times int8 weights wq (N, K)
    with per-channel scales ws (N,) -> (..., N) in out_dtype (default float32, or out's dtype).
    ``config`` overrides the Triton tile choice (tuning and tests); ``out`` is written in place.
    Fused epilogue: ``act`` ('gelu_tanh' | 'silu') on the output, or with ``gated`` on
    interleaved (gate, up) column pairs -> act(gate) * up, (..., N/2); then ``+ residual``
    (shaped like the output), with ``residual_gate`` (N_out,) ``residual + residual_gate * y``
    (a gated residual, pi0.5's adaRMS gate for one sample)."""
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
    n_out = _check_epilogue(act, gated, residual, lead, n, device, residual_gate)
    out = _check_out(out, (*lead, n_out), out_dtype, device)
    name = resolve_backend(backend, device)
    m = x2.shape[0]
    res2 = None if residual is None else residual.reshape(m, n_out)
    if name != "triton" or m == 0 or n == 0 or k == 0:
        y = _gemm_torch(x2, xs2, wq, ws, None, bias, out_dtype, name, act, gated, res2, residual_gate)
        return y.reshape(*lead, n_out) if out is None else out.copy_(y.reshape(*lead, n_out))
    tg, _ = _triton_modules(device)
    wq = wq.contiguous()
    out2 = torch.empty((m, n_out), dtype=out_dtype, device=device) if out is None else out.view(m, n_out)
    epi = _epilogue_spec(act, gated, res2, residual_gate)

    def run(cfg):
        return _launch_w8a8(tg, x2, xs2, wq, ws, bias, out2, cfg, epi=epi)

    run(config or _pick_config("w8a8", m, n, k, device, run))
    return out2.reshape(*lead, n_out) if out is None else out


def _gemm_w4(
    xq,
    xs,
    wq_packed,
    ws,
    group_size,
    bias,
    out_dtype,
    backend,
    config,
    a_packed,
    out,
    act=None,
    gated=False,
    residual=None,
    group_mult=None,
    residual_gate=None,
):
    aname = "xq_packed" if a_packed else "xq"
    _check_tensor(
        xq,
        aname,
        (torch.uint8,) if a_packed else (torch.int8,),
        "packed int4 activations (..., K/2)" if a_packed else "int8 activations (..., K)",
    )
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
    _check_same_device(device, xs=xs, wq_packed=wq_packed, ws=ws, group_mult=group_mult)
    if group_mult is None:
        ws = _check_weight_scales(ws, n, k, group_size)
    else:
        group_mult, ws = _check_group_mult(group_mult, ws, n, k, group_size)
    bias = _check_bias(bias, n, device)
    n_out = _check_epilogue(act, gated, residual, lead, n, device, residual_gate)
    out = _check_out(out, (*lead, n_out), out_dtype, device)
    name = resolve_backend(backend, device)
    m = x2.shape[0]
    res2 = None if residual is None else residual.reshape(m, n_out)
    if name == "triton" and group_size is not None and group_size % PACK_GROUP:
        raise ValueError(
            f"the Triton int4 kernels take group_size as a multiple of {PACK_GROUP} "
            f"(or None for per-channel), got {group_size}; backend='cpu' takes any"
        )
    if name != "triton" or m == 0 or n == 0 or k == 0:
        x8 = unpack_int4(x2) if a_packed else x2
        w8 = unpack_int4(wq_packed)
        if group_mult is not None:  # the 8-bit per-channel weight it equals
            w8, group_size = group_multiplied_codes(w8, group_mult, group_size), None
        y = _gemm_torch(x8, xs2, w8, ws, group_size, bias, out_dtype, name, act, gated, res2, residual_gate)
        return y.reshape(*lead, n_out) if out is None else out.copy_(y.reshape(*lead, n_out))
    tg, _ = _triton_modules(device)
    wq_packed = wq_packed.contiguous()
    out2 = torch.empty((m, n_out), dtype=out_dtype, device=device) if out is None else out.view(m, n_out)
    kind = "w4a4" if a_packed else "w4a8"
    epi = _epilogue_spec(act, gated, res2, residual_gate)

    def run(cfg):
        return _launch_w4(
            tg, x2, xs2, wq_packed, ws, group_size, bias, out2, k, a_packed, cfg, epi=epi, group_mult=group_mult
        )

    run(config or _pick_config(kind, m, n, k, device, run))
    return out2.reshape(*lead, n_out) if out is None else out


def gemm_w4a8(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq_packed: torch.Tensor,
    ws: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    group_mult: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 activations (..., K) x int4 weights packed (N, K/2); ws (N,) per channel or
    (N, ceil(K / group_size)) per group -> (..., N); epilogue options as :func:`gemm_w8a8`.
    ``group_mult`` (uint8 (N, K / group_size), values 1..18) with ws (N,): integer group scales,
    group g of channel n scaled by ``group_mult[n, g] * ws[n]``; the codes are multiplied in
    registers and every group sums into one int32 accumulator (the W8A8 main loop)."""
    return _gemm_w4(
        xq,
        xs,
        wq_packed,
        ws,
        group_size,
        bias,
        out_dtype,
        backend,
        config,
        False,
        out,
        act,
        gated,
        residual,
        group_mult=group_mult,
        residual_gate=residual_gate,
    )


def gemm_w4a4(
    xq_packed: torch.Tensor,
    xs: torch.Tensor,
    wq_packed: torch.Tensor,
    ws: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    group_mult: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """int4 activations packed (..., K/2) (from quantize_per_token(bits=4)) x int4 weights
    packed (N, K/2) -> (..., N).  Both are unpacked to int8 for the int8 tensor-core dot.
    Epilogue options as :func:`gemm_w8a8`; ``group_mult`` as :func:`gemm_w4a8`."""
    return _gemm_w4(
        xq_packed,
        xs,
        wq_packed,
        ws,
        group_size,
        bias,
        out_dtype,
        backend,
        config,
        True,
        out,
        act,
        gated,
        residual,
        group_mult=group_mult,
        residual_gate=residual_gate,
    )


# ----------------------------------------------------------------------------- float-in linears
FUSE_MAX_M = 64
"""Up to this many tokens the Triton linears quantize activations inside the GEMM; above it
every weight-tile column would re-read x, so a separate quantization kernel is cheaper."""


def _linear(
    x,
    wq,
    ws,
    group_size,
    bias,
    out_dtype,
    inv_smooth,
    backend,
    config,
    out,
    fuse,
    w_bits,
    act=None,
    gated=False,
    residual=None,
    group_mult=None,
    residual_gate=None,
):
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
        epi = dict(act=act, gated=gated, residual=residual, residual_gate=residual_gate)
        if w_bits == 8:
            return gemm_w8a8(xq, xs, wq, ws, bias, out_dtype, backend=name, config=config, out=out, **epi)
        return gemm_w4a8(
            xq,
            xs,
            wq,
            ws,
            group_size,
            bias,
            out_dtype,
            backend=name,
            config=config,
            out=out,
            group_mult=group_mult,
            **epi,
        )
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
            raise ValueError(
                f"the Triton int4 kernels take group_size as a multiple of {PACK_GROUP} "
                f"(or None for per-channel), got {group_size}; backend='cpu' takes any"
            )
    n = wq.shape[0]
    device = x.device
    _check_same_device(device, wq=wq, ws=ws, inv_smooth=inv_smooth, group_mult=group_mult)
    if group_mult is None:
        ws = _check_weight_scales(ws, n, k, group_size if w_bits == 4 else None)
    else:
        group_mult, ws = _check_group_mult(group_mult, ws, n, k, group_size)
    bias = _check_bias(bias, n, device)
    out_dtype = _check_out_dtype(out_dtype if out is None else out.dtype)
    n_out = _check_epilogue(act, gated, residual, lead, n, device, residual_gate)
    out = _check_out(out, (*lead, n_out), out_dtype, device)
    epi = _epilogue_spec(act, gated, None if residual is None else residual.reshape(m, n_out), residual_gate)
    tg, _ = _triton_modules(device)
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    wq = wq.contiguous()
    smooth = inv_smooth.contiguous() if inv_smooth is not None else None
    out2 = torch.empty((m, n_out), dtype=out_dtype, device=device) if out is None else out.view(m, n_out)
    xs_out = torch.empty((m,), dtype=torch.float32, device=device)
    if w_bits == 8:

        def run(cfg):
            return _launch_w8a8(tg, x2, None, wq, ws, bias, out2, cfg, smooth, xs_out, epi=epi)

        kind = "w8a8f"
    else:

        def run(cfg):
            return _launch_w4(
                tg,
                x2,
                None,
                wq,
                ws,
                group_size,
                bias,
                out2,
                k,
                False,
                cfg,
                smooth,
                xs_out,
                epi=epi,
                group_mult=group_mult,
            )

        kind = "w4a8f"
    run(config or _pick_config(kind, m, n, k, device, run, x_bytes=x2.element_size()))
    return out2.reshape(*lead, n_out) if out is None else out


def linear_w8a8(
    x: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    inv_smooth: torch.Tensor | None = None,
    backend: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    fuse: bool | None = None,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float x (..., K) -> dynamic per-token int8 -> W8A8 GEMM -> (..., N) in out_dtype (default
    x.dtype).  Exactly quantize_per_token(x, 8, inv_smooth) then gemm_w8a8 (epilogue options
    as there); on Triton with few tokens and short rows (``fuse``: None = automatic) both happen
    in one kernel."""
    return _linear(
        x,
        wq,
        ws,
        None,
        bias,
        out_dtype,
        inv_smooth,
        backend,
        config,
        out,
        fuse,
        8,
        act,
        gated,
        residual,
        residual_gate=residual_gate,
    )


def linear_w4a8(
    x: torch.Tensor,
    wq_packed: torch.Tensor,
    ws: torch.Tensor,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    inv_smooth: torch.Tensor | None = None,
    backend: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    fuse: bool | None = None,
    act: str | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    group_mult: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float x -> dynamic per-token int8 -> W4A8 GEMM; see :func:`linear_w8a8` (and
    :func:`gemm_w4a8` for ``group_mult``)."""
    return _linear(
        x,
        wq_packed,
        ws,
        group_size,
        bias,
        out_dtype,
        inv_smooth,
        backend,
        config,
        out,
        fuse,
        4,
        act,
        gated,
        residual,
        group_mult=group_mult,
        residual_gate=residual_gate,
    )
