"""Triton integer GEMMs: y[m, n] = (sum_k x[m, k] w[n, k]) * xs[m] * ws[n] (+ bias[n]).

Both operands are K-major (x (M, K), w (N, K), K contiguous), which is what Hopper's 8-bit
wgmma needs; the weight tile is loaded as (BLOCK_N, BLOCK_K) and fed transposed to ``tl.dot``.

Epilogue (every kernel): per-token x per-channel scales, bias, then optionally an activation
(``ACT``: GELU-tanh or SiLU) - with ``GATED`` on interleaved gate/up column pairs, writing
act(gate) * up (half the columns: a fused gate/up projection's MLP input) - and a residual
add, so the float output is written once.

* ``w8a8_kernel``: int8 x int8 -> int32 accumulator.
* ``w4_kernel``: int4 weights packed by ``packing.py`` (and optionally int4 activations packed
  the same way).  A K-tile is one 128-wide packing group: 64 bytes per row unpack with two
  shifts into the low half (columns k0..k0+63) and high half (k0+64..k0+127), each a contiguous
  activation slice, so a tile is two int8 ``tl.dot`` calls and no shuffles.  Group-wise scales
  (group_size a multiple of 128) are applied per tile into a float accumulator; per-channel
  scales keep the int32 accumulator to the end, and so do integer group scales (``INT_GROUPS``:
  each group's uint8 multiplier times the unpacked codes, still int8, in registers; one float
  scale per channel in the epilogue - the W8A8 main loop on half the weight bytes).  ``SWAP`` computes acc^T = W x^T so the
  unpacked (register-resident) weights are the LEFT operand - on Hopper wgmma takes A from
  registers but B only from shared memory - and the weight rows fill the 64-row MMA
  dimension when there are few tokens.

Small M: split-K.  Program (pid, pid_k) covers a contiguous K range and, when SPLIT_K > 1,
writes its int32 (or, for group scales, float32) partial tile to a workspace;
``splitk_reduce_kernel`` adds the SPLIT_K partials in a fixed order and applies the epilogue.
Int32 partial sums are exact, so the result does not depend on the split at all.

Fused dynamic activation quantization (``A_FLOAT``, meant for small M): x arrives in float;
each program first scans its BLOCK_M rows over all of K, in (BLOCK_M, PRO_K) tiles - ideally
one tile, since the scan is a latency chain - for the per-token absmax (times the optional
inverse smoothing vector), then quantizes every x tile in registers right before the
dot.  Same arithmetic as ``norm_quant_kernel`` without a norm, so codes and scales are
bit-identical to quantize-then-GEMM while saving a launch and the int8 round trip.  The
program with pid_n == pid_k == 0 also stores the scales (the split-K reduction reads them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_quant import _round_half_even


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order so neighbouring programs share weight tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _activate(y, ACT: tl.constexpr):
    """ACT 1: GELU (tanh approximation), 2: SiLU; tanh as 1 - 2 / (exp(2u) + 1). exp's
    argument is capped at 88 (exp(88) < FLT_MAX): the results saturate without an inf, as in
    the CPU linear."""
    if ACT == 1:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 88.0)) + 1.0))
    elif ACT == 2:
        y = y / (1.0 + tl.exp(tl.minimum(-y, 88.0)))
    return y


@triton.jit
def _epilogue_store(
    acc,
    xs,
    rm,
    rn,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    stride_om,
    APPLY_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    res_ptr,
    rgate_ptr,
    stride_rm,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RGATE: tl.constexpr,
):
    """Scales, bias, then the optional activation (GATED: interleaved gate/up column pairs ->
    act(gate) * up, half the columns), then the optional per-column residual gate and the
    optional residual; one store."""
    mmask = rm < M
    nmask = rn < N
    y = acc.to(tl.float32) * xs[:, None]
    if APPLY_WS:
        ws = tl.load(ws_ptr + rn, mask=nmask, other=0.0)
        y = y * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    if GATED:
        gate, up = tl.split(tl.reshape(y, (y.shape[0], y.shape[1] // 2, 2)))
        y = _activate(gate, ACT) * up
        cols, _odd = tl.split(tl.reshape(rn, (rn.shape[0] // 2, 2)))
        cols = cols // 2
        ncols = N // 2
    else:
        y = _activate(y, ACT)
        cols = rn
        ncols = N
    omask = mmask[:, None] & (cols < ncols)[None, :]
    if HAS_RGATE:  # a gated residual (pi0.5): residual + gate[col] * y
        g = tl.load(rgate_ptr + cols, mask=cols < ncols, other=0.0).to(tl.float32)
        y = y * g[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + rm[:, None] * stride_rm + cols[None, :], mask=omask, other=0.0)
        y = y + r.to(tl.float32)
    optr = out_ptr + rm[:, None] * stride_om + cols[None, :]
    tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _act_scales(
    x_ptr,
    smooth_ptr,
    xs_ptr,
    xs_out_ptr,
    rm,
    rm_l,
    M,
    K,
    stride_xm,
    store,
    A_FLOAT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per-row (scale, 127/absmax): loaded (int8 input) or computed over all of K (float input)."""
    if A_FLOAT:
        rk = tl.arange(0, BLOCK_K)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            km = kk < K
            v = tl.load(x_ptr + rm_l[:, None] * stride_xm + kk[None, :], mask=km[None, :], other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                v = v * tl.load(smooth_ptr + kk, mask=km, other=0.0).to(tl.float32)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        ones = tl.full((BLOCK_M,), 1.0, tl.float32)
        pos = amax > 0.0
        safe = tl.where(pos, amax, ones)
        xs = tl.where(pos, tl.math.div_rn(safe, ones * 127.0), ones)
        inv = tl.where(pos, tl.math.div_rn(ones * 127.0, safe), 0.0)
        if store:
            tl.store(xs_out_ptr + rm, xs, mask=rm < M)
    else:
        xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
        inv = xs
    return xs, inv


@triton.jit
def _quant_tile(v, inv, smooth_ptr, kk, km, HAS_SMOOTH: tl.constexpr):
    """Float x tile -> int8 codes with the row's 127/absmax (ties to even, clamped)."""
    v = v.to(tl.float32)
    if HAS_SMOOTH:
        v = v * tl.load(smooth_ptr + kk, mask=km, other=0.0).to(tl.float32)[None, :]
    q = _round_half_even(v * inv[:, None])
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def _store_partial(acc, rm, rn, part_ptr, pid_k, M, N):
    optr = part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
    tl.store(optr, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def w8a8_kernel(
    x_ptr,
    w_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    smooth_ptr,
    xs_out_ptr,
    res_ptr,
    rgate_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_rm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    A_FLOAT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    PRO_K: tl.constexpr,
    SWAP: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RGATE: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/columns onto valid ones: loads need no M/N mask, stores are masked.
    rm_l = rm % M
    rn_l = rn % N
    xs, inv = _act_scales(
        x_ptr,
        smooth_ptr,
        xs_ptr,
        xs_out_ptr,
        rm,
        rm_l,
        M,
        K,
        stride_xm,
        (pid_n == 0) & (pid_k == 0),
        A_FLOAT,
        HAS_SMOOTH,
        BLOCK_M,
        PRO_K,
    )
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    x_ptrs = x_ptr + rm_l[:, None] * stride_xm + (k_start + rk)[None, :]
    w_ptrs = w_ptr + rn_l[:, None] * stride_wn + (k_start + rk)[None, :]
    if SWAP:  # acc^T = W x^T: weight rows fill the MMA's M dimension (wgmma needs 64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kk in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
            if A_FLOAT:
                a = _quant_tile(a, inv, smooth_ptr, k_start + kk + rk, rk < BLOCK_K, HAS_SMOOTH)
        else:
            kmask = rk < K - (k_start + kk)
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0)
            b = tl.load(w_ptrs, mask=kmask[None, :], other=0)
            if A_FLOAT:
                a = _quant_tile(a, inv, smooth_ptr, k_start + kk + rk, kmask, HAS_SMOOTH)
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT_K == 1:
        _epilogue_store(
            acc,
            xs,
            rm,
            rn,
            ws_ptr,
            bias_ptr,
            out_ptr,
            M,
            N,
            stride_om,
            True,
            HAS_BIAS,
            res_ptr,
            rgate_ptr,
            stride_rm,
            ACT,
            GATED,
            HAS_RES,
            HAS_RGATE,
        )
    else:
        _store_partial(acc, rm, rn, part_ptr, pid_k, M, N)


@triton.jit
def _unpack_lo_hi(p):
    """uint8 bytes -> (low, high) signed nibbles as int8."""
    b = p.to(tl.int8, bitcast=True)
    return (b << 4) >> 4, b >> 4


@triton.jit
def w4_kernel(
    x_ptr,
    w_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    smooth_ptr,
    xs_out_ptr,
    res_ptr,
    rgate_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wsn,
    gm_ptr,
    stride_gmn,
    stride_om,
    stride_rm,
    group_size,
    A_PACKED: tl.constexpr,
    GROUPED: tl.constexpr,
    INT_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    A_FLOAT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    PRO_K: tl.constexpr,
    SWAP: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RGATE: tl.constexpr,
):
    HALF: tl.constexpr = 64
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_l = rm % M
    rn_l = rn % N
    j = tl.arange(0, HALF)
    xs, inv = _act_scales(
        x_ptr,
        smooth_ptr,
        xs_ptr,
        xs_out_ptr,
        rm,
        rm_l,
        M,
        K,
        stride_xm,
        (pid_n == 0) & (pid_k == 0),
        A_FLOAT,
        HAS_SMOOTH,
        BLOCK_M,
        PRO_K,
    )
    num_tiles = tl.cdiv(K, 2 * HALF)
    tiles_per_split = tl.cdiv(num_tiles, SPLIT_K)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    if SWAP:  # acc^T = W x^T: the unpacked weights are the register-resident left operand
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        acc_f = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        k0 = t * (2 * HALF)
        if EVEN_K:
            half = HALF
            jm = j < HALF
            wb = tl.load(w_ptr + rn_l[:, None] * stride_wn + (k0 // 2 + j)[None, :])
            if A_PACKED:
                xb = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 // 2 + j)[None, :])
                x_lo, x_hi = _unpack_lo_hi(xb)
            else:
                x_lo = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 + j)[None, :])
                x_hi = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 + HALF + j)[None, :])
        else:
            half = tl.minimum(K - k0, 2 * HALF) // 2
            jm = j < half
            wb = tl.load(w_ptr + rn_l[:, None] * stride_wn + (k0 // 2 + j)[None, :], mask=jm[None, :], other=0)
            if A_PACKED:
                xb = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 // 2 + j)[None, :], mask=jm[None, :], other=0)
                x_lo, x_hi = _unpack_lo_hi(xb)
            else:
                x_lo = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 + j)[None, :], mask=jm[None, :], other=0)
                x_hi = tl.load(x_ptr + rm_l[:, None] * stride_xm + (k0 + half + j)[None, :], mask=jm[None, :], other=0)
        if A_FLOAT:
            x_lo = _quant_tile(x_lo, inv, smooth_ptr, k0 + j, jm, HAS_SMOOTH)
            x_hi = _quant_tile(x_hi, inv, smooth_ptr, k0 + half + j, jm, HAS_SMOOTH)
        w_lo, w_hi = _unpack_lo_hi(wb)
        if INT_GROUPS:  # integer group scales: into the codes (|code x mult| <= 126), int32 stays
            gm = tl.load(gm_ptr + rn_l * stride_gmn + k0 // group_size).to(tl.int8)
            w_lo = w_lo * gm[:, None]
            w_hi = w_hi * gm[:, None]
        if GROUPED:
            wsg = tl.load(ws_ptr + rn_l * stride_wsn + k0 // group_size)
            if SWAP:
                part = tl.dot(w_lo, tl.trans(x_lo), out_dtype=tl.int32)
                part = tl.dot(w_hi, tl.trans(x_hi), part, out_dtype=tl.int32)
                acc_f += part.to(tl.float32) * wsg[:, None]
            else:
                part = tl.dot(x_lo, tl.trans(w_lo), out_dtype=tl.int32)
                part = tl.dot(x_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
                acc_f += part.to(tl.float32) * wsg[None, :]
        else:
            if SWAP:
                acc_i = tl.dot(w_lo, tl.trans(x_lo), acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(w_hi, tl.trans(x_hi), acc_i, out_dtype=tl.int32)
            else:
                acc_i = tl.dot(x_lo, tl.trans(w_lo), acc_i, out_dtype=tl.int32)
                acc_i = tl.dot(x_hi, tl.trans(w_hi), acc_i, out_dtype=tl.int32)
    if SWAP:
        acc_i = tl.trans(acc_i)
        acc_f = tl.trans(acc_f)
    if GROUPED:
        if SPLIT_K == 1:
            _epilogue_store(
                acc_f,
                xs,
                rm,
                rn,
                ws_ptr,
                bias_ptr,
                out_ptr,
                M,
                N,
                stride_om,
                False,
                HAS_BIAS,
                res_ptr,
                rgate_ptr,
                stride_rm,
                ACT,
                GATED,
                HAS_RES,
                HAS_RGATE,
            )
        else:
            _store_partial(acc_f, rm, rn, part_ptr, pid_k, M, N)
    else:
        if SPLIT_K == 1:
            _epilogue_store(
                acc_i,
                xs,
                rm,
                rn,
                ws_ptr,
                bias_ptr,
                out_ptr,
                M,
                N,
                stride_om,
                True,
                HAS_BIAS,
                res_ptr,
                rgate_ptr,
                stride_rm,
                ACT,
                GATED,
                HAS_RES,
                HAS_RGATE,
            )
        else:
            _store_partial(acc_i, rm, rn, part_ptr, pid_k, M, N)


@triton.jit
def splitk_reduce_kernel(
    part_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    res_ptr,
    rgate_ptr,
    M,
    N,
    stride_om,
    stride_rm,
    SPLIT_K: tl.constexpr,
    APPLY_WS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RGATE: tl.constexpr,
):
    """Sum SPLIT_K partial tiles in a fixed order, then the scale/bias epilogue."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m2 = (rm < M)[:, None] & (rn < N)[None, :]
    ptrs = part_ptr + rm[:, None] * N + rn[None, :]
    acc = tl.load(ptrs, mask=m2, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptrs + s * M * N, mask=m2, other=0)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    _epilogue_store(
        acc,
        xs,
        rm,
        rn,
        ws_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        stride_om,
        APPLY_WS,
        HAS_BIAS,
        res_ptr,
        rgate_ptr,
        stride_rm,
        ACT,
        GATED,
        HAS_RES,
        HAS_RGATE,
    )
