"""Symmetric integer quantizers for weights (offline) and activations (per token or static).

Why symmetric: an integer GEMM then needs only one scale per row of each operand and no
zero-point correction terms, so the epilogue is ``acc * s_act[m] * s_w[n]``.
Values are kept in [-qmax, qmax] (int8: 127, int4: 7); -2^(b-1) is never produced, so
negating a quantized tensor stays in range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
SUPPORTED_BITS = (4, 8)
GROUP_MULT_MAX = 18
"""Largest integer group multiplier of a 4-bit weight with integer group scales: 7 x 18 = 126,
so a code times its multiplier is still an int8 (the GEMM's operand)."""
# Fractions of the largest group scale tried as a channel's float scale (x GROUP_MULT_MAX).
_CHANNEL_GRID = (1.0, 0.97, 0.94, 0.9)


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit quantizer."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


@dataclass
class QuantizedWeight:
    """Integer codes (int8 tensor, values in [-qmax, qmax]) and their float32 scales.

    ``scale`` is (N,) per output channel, or (N, K // group_size) for group-wise weights; with
    integer group scales (``group_mult``, uint8 (N, K // group_size), values 1..GROUP_MULT_MAX)
    ``scale`` is (N,) and group g of channel n is ``q * group_mult[n, g] * scale[n]``.
    """

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int | None
    group_mult: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.q, self.scale, self.group_size, dtype, self.group_mult)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    n, k = w.shape
    if group_size is None:
        return w.reshape(n, 1, k)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K={k}")
    return w.reshape(n, k // group_size, group_size)


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    clip_grid: tuple[float, ...] | None = DEFAULT_CLIP_GRID,
    int_group_scales: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of a (N, K) weight.

    The clip ratio (fraction of the row/group absmax mapped to qmax) is chosen per channel or
    group by minimising the squared reconstruction error over ``clip_grid``; ``None`` or
    ``(1.0,)`` gives plain absmax scaling. ``int_group_scales`` (4-bit, group-wise): each
    group's scale becomes an integer multiple (1..GROUP_MULT_MAX) of one float scale per
    channel (see :func:`integer_group_scales`), so the GEMM can accumulate every group in int32.
    """
    if int_group_scales and (bits != 4 or group_size is None):
        raise ValueError(f"int_group_scales needs 4-bit group-wise weights, got bits={bits}, group_size={group_size}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains non-finite values; cannot quantize")
    m = qmax(bits)
    wf = w.detach().to(torch.float32)
    g = _grouped(wf, group_size)  # (N, G, gs)
    absmax = g.abs().amax(dim=-1)  # (N, G)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    grid = tuple(clip_grid) if clip_grid else (1.0,)
    for r in grid:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"clip ratios must lie in (0, 1], got {r}")
    best_err = None
    best_scale = None
    for r in grid:
        s = absmax * (r / m)
        q = torch.clamp(torch.round(g / s[..., None]), -m, m)
        err = (q * s[..., None] - g).pow(2).sum(-1)
        if best_err is None:
            best_err, best_scale = err, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
    if int_group_scales:
        return integer_group_scales(wf, best_scale, group_size)
    q = torch.clamp(torch.round(g / best_scale[..., None]), -m, m).to(torch.int8).reshape(w.shape)
    scale = best_scale if group_size is not None else best_scale[:, 0]
    return QuantizedWeight(q=q.contiguous(), scale=scale.contiguous(), bits=bits, group_size=group_size)


def integer_group_scales(w: torch.Tensor, group_scale: torch.Tensor, group_size: int) -> QuantizedWeight:
    """4-bit codes for ``w`` (N, K) whose group scales are ``scale[n] * mult[n, g]`` with integer
    ``mult`` in 1..GROUP_MULT_MAX, starting from float group scales ``group_scale`` (N, G).

    Why: with float group scales an integer GEMM must leave its int32 accumulator at every group
    boundary to apply a float scale (a dependent float multiply-add per group, which also stops a
    tensor-core main loop from accumulating in place). An integer multiplier folds into the
    unpacked codes instead (``code * mult`` is an int8 for |code| <= 7), so every group is
    summed in one int32 accumulator and one float scale per channel remains for the epilogue:
    the W8A8 main loop fed with half the weight bytes (QServe's progressive group quantization,
    without its zero points). Per channel the float scale is a fraction (``_CHANNEL_GRID``) of
    the largest group scale / GROUP_MULT_MAX; per group the floor or ceiling of the ideal
    multiplier, whichever reconstructs the group with less squared error."""
    m = qmax(4)
    n, k = w.shape
    g = _grouped(w, group_size)  # (N, G, gs)
    # An all-zero group has a placeholder scale (its codes are 0 whatever it is): it must not set
    # the channel scale, or every real group of the row would be squeezed onto multiplier 1.
    zero = g.abs().amax(dim=-1) == 0  # (N, G)
    live = group_scale.masked_fill(zero, 0.0).amax(dim=1)
    top = torch.where(live > 0, live, group_scale.amax(dim=1))  # an all-zero row: any scale
    best_err = best_scale = best_mult = None
    for frac in _CHANNEL_GRID:
        s1 = top * (frac / GROUP_MULT_MAX)  # (N,)
        ideal = group_scale / s1[:, None]
        err_c = mult_c = None
        for cand in (torch.floor(ideal), torch.ceil(ideal)):
            mult = cand.clamp(1, GROUP_MULT_MAX)
            s = s1[:, None] * mult
            q = torch.clamp(torch.round(g / s[..., None]), -m, m)
            err = (q * s[..., None] - g).pow(2).sum(-1)  # (N, G)
            if err_c is None:
                err_c, mult_c = err, mult
            else:
                better = err < err_c
                err_c, mult_c = torch.where(better, err, err_c), torch.where(better, mult, mult_c)
        total = err_c.sum(1)  # (N,)
        if best_err is None:
            best_err, best_scale, best_mult = total, s1, mult_c
        else:
            better = total < best_err
            best_err = torch.where(better, total, best_err)
            best_scale = torch.where(better, s1, best_scale)
            best_mult = torch.where(better[:, None], mult_c, best_mult)
    best_mult = torch.where(zero, torch.ones_like(best_mult), best_mult)
    s = best_scale[:, None] * best_mult
    q = torch.clamp(torch.round(g / s[..., None]), -m, m).to(torch.int8).reshape(n, k)
    return QuantizedWeight(
        q=q.contiguous(),
        scale=best_scale.contiguous(),
        bits=4,
        group_size=group_size,
        group_mult=best_mult.to(torch.uint8).contiguous(),
    )


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int | None,
    dtype: torch.dtype = torch.float32,
    group_mult: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float weight ``q * scale`` (scale broadcast per channel or per group); with integer group
    scales ``q * group_mult * scale`` (scale per channel)."""
    n, k = q.shape
    if group_mult is not None:
        codes = q.to(torch.int32).reshape(n, k // group_size, group_size) * group_mult.to(torch.int32)[..., None]
        return codes.reshape(n, k).to(dtype) * scale.to(dtype)[:, None]
    if group_size is None:
        return q.to(dtype) * scale.to(dtype)[:, None]
    g = q.to(dtype).reshape(n, k // group_size, group_size) * scale.to(dtype)[..., None]
    return g.reshape(n, k)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric absmax quantization of each row of a (M, K) activation.

    Returns int8 codes (M, K) and float scales (M,) in x's float dtype; an all-zero row gets
    scale 1 and codes 0. This is the reference the integer kernels are checked against.
    """
    m = qmax(bits)
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / m, torch.ones_like(absmax))
    q = torch.clamp(torch.round(x / scale[:, None]), -m, m).to(torch.int8)
    return q, scale


def quantize_static(x: torch.Tensor, bits: int, scale: float | torch.Tensor) -> torch.Tensor:
    """Quantize with a fixed per-tensor scale (from calibration); out-of-range values clip."""
    m = qmax(bits)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / s), -m, m).to(torch.int8)


def static_scale_from_absmax_samples(samples: torch.Tensor, bits: int, percentile: float = 99.9) -> float:
    """Per-tensor static activation scale: the given percentile of |x| mapped to qmax."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile}")
    flat = samples.detach().abs().flatten().to(torch.float32)
    if flat.numel() == 0:
        raise ValueError("no activation samples collected for a static scale")
    if flat.numel() > 1_000_000:  # torch.quantile has a size limit; subsample deterministically
        idx = torch.linspace(0, flat.numel() - 1, 1_000_000).long()
        flat = flat.sort().values[idx]
    v = float(torch.quantile(flat, percentile / 100.0))
    return max(v, 1e-8) / qmax(bits)
