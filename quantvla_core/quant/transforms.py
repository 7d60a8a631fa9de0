"""Outlier transforms of a linear layer's input channels (DuQuant family), and their folding.

A transform T maps the input x -> x' = rotate(permute(x / s)) and the weight W -> W' with
x' W'^T == x W^T exactly in real arithmetic, so only quantization sees a different tensor:
- smoothing s (K,): divides activation outliers down, multiplies the matching weight columns;
- zigzag permutation: spreads high-energy channels evenly across rotation blocks;
- block rotation R (K/B blocks of B x B, orthogonal): Hadamard or per-block SVD of the weight.

Nothing here adds a pass over the activations at inference: the weight side is folded offline,
and the activation side is either folded into the preceding norm / linear (``fold_*``) or done
inside the activation-quantization step of QuantLinear (the kernels take ``inv_smooth``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

TRANSFORM_NAMES = ("smooth", "permute", "rotate")
ROTATIONS = ("hadamard", "svd")


@dataclass
class InputTransform:
    """The activation-side transform of one linear: x -> rotate(permute(x * inv_smooth))."""

    inv_smooth: torch.Tensor | None = None  # (K,) float32
    perm: torch.Tensor | None = None  # (K,) integer: x'[:, j] = x[:, perm[j]]
    rotation: torch.Tensor | None = None  # (B, B) shared or (K // B, B, B) per block, orthogonal
    rotation_kind: str | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Activation side, in x's dtype (the reference path calls it in fp64)."""
        if self.inv_smooth is not None:
            x = x * self.inv_smooth.to(device=x.device, dtype=x.dtype)
        if self.perm is not None:
            x = x[..., self.perm.to(x.device).long()]
        if self.rotation is not None:
            r = self.blocks(x.shape[-1]).to(device=x.device, dtype=x.dtype)
            nb, b, _ = r.shape
            lead = x.shape[:-1]
            x = torch.einsum("mnb,nbc->mnc", x.reshape(-1, nb, b), r)
            x = x.reshape(*lead, nb * b)
        return x

    def fold_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Weight side: W' = rotate(permute(W * s)) on the K axis, so x' W'^T == x W^T."""
        w = w.to(torch.float64)
        if self.inv_smooth is not None:
            w = w / self.inv_smooth.to(device=w.device, dtype=torch.float64)
        if self.perm is not None:
            w = w[:, self.perm.to(w.device).long()]
        if self.rotation is not None:
            r = self.blocks(w.shape[1]).to(device=w.device, dtype=torch.float64)
            nb, b, _ = r.shape
            w = torch.einsum("onb,nbc->onc", w.reshape(w.shape[0], nb, b), r).reshape(w.shape[0], nb * b)
        return w

    def blocks(self, k: int) -> torch.Tensor:
        """The rotation as (K // B, B, B) (a shared (B, B) block is broadcast, not copied)."""
        r = self.rotation
        return r.expand(k // r.shape[-1], *r.shape) if r.dim() == 2 else r


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotation_block_size(k: int, block: int = 64) -> int:
    """Largest power of two <= block that divides K (1 means: no useful rotation)."""
    b = 1
    while b * 2 <= block and k % (b * 2) == 0:
        b *= 2
    return b


def smoothing_vector(act_absmax: torch.Tensor, weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    """SmoothQuant-style s_k = max|X_k|^a / max|W_k|^(1-a), shared by all linears reading X.

    Returned s divides the activation and multiplies the weight columns. Clamped to
    [1e-5, 1e5] and 1 where a channel is dead, so folding never creates inf/nan.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"smoothing strength must lie in [0, 1], got {strength}")
    xa = act_absmax.detach().to(torch.float64).clamp_min(1e-5)
    wa = torch.stack([w.detach().abs().amax(0).to(torch.float64) for w in weights]).amax(0).clamp_min(1e-5)
    s = xa.pow(strength) / wa.pow(1.0 - strength)
    s = torch.where(act_absmax.to(torch.float64) > 0, s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)


def zigzag_permutation(energy: torch.Tensor, block: int) -> torch.Tensor:
    """Channels sorted by energy, dealt to blocks 0..n-1, n-1..0, 0..n-1, ... (DuQuant zigzag).

    Returns perm (K,) so that x[:, perm] has every block holding a similar energy mix.
    """
    k = energy.numel()
    if block <= 1 or k % block:
        return torch.arange(k)
    nb = k // block
    order = torch.argsort(energy.detach().to(torch.float64), descending=True, stable=True).tolist()
    buckets: list[list[int]] = [[] for _ in range(nb)]
    for i, ch in enumerate(order):
        rnd, pos = divmod(i, nb)
        buckets[pos if rnd % 2 == 0 else nb - 1 - pos].append(ch)
    return torch.tensor([c for b in buckets for c in b], dtype=torch.int64)


def svd_rotation(w: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block right singular vectors of W (N, K): W_blk @ V = U S, energy concentrated."""
    n, k = w.shape
    nb = k // block
    blocks = []
    for i in range(nb):
        _, _, vh = torch.linalg.svd(w[:, i * block : (i + 1) * block].to(torch.float64), full_matrices=True)
        blocks.append(vh.T)
    return torch.stack(blocks)


def build_transform(
    names: tuple[str, ...],
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor | None,
    strength: float = 0.5,
    rotation: str = "hadamard",
    block: int = 64,
) -> InputTransform:
    """Compute the transform for linears sharing one input (their weights listed)."""
    unknown = [n for n in names if n not in TRANSFORM_NAMES]
    if unknown:
        raise ValueError(f"unknown transforms {unknown}; accepted: {', '.join(TRANSFORM_NAMES)}")
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r}; accepted: {', '.join(ROTATIONS)}")
    weights = [w.detach().cpu() for w in weights]  # offline work, on the CPU in float64
    act_absmax = act_absmax.detach().cpu() if act_absmax is not None else None
    k = weights[0].shape[1]
    t = InputTransform()
    energy = act_absmax.to(torch.float64) if act_absmax is not None else None
    if "smooth" in names:
        if act_absmax is None:
            raise ValueError("smoothing needs calibration activation statistics")
        s = smoothing_vector(act_absmax, weights, strength)
        t.inv_smooth = (1.0 / s).to(torch.float32)
        energy = energy / s
    b = rotation_block_size(k, block)
    if "permute" in names and b > 1 and energy is not None:
        t.perm = zigzag_permutation(energy, b)
    if "rotate" in names and b > 1:
        t.rotation_kind = rotation
        if rotation == "hadamard":
            t.rotation = hadamard(b).to(torch.float32)  # one (B, B) block shared by all blocks
        else:
            wf = t.fold_weight(torch.cat(weights, 0))  # smoothing/permutation first, as applied
            t.rotation = svd_rotation(wf, b).to(torch.float32)
    return t


# ---- folding the activation side into neighbouring modules ------------------------------------


def fold_smoothing_into_norm(norm: nn.Module, inv_smooth: torch.Tensor, offset: float | None = None) -> None:
    """Make a norm emit x / s: RMSNorm (weight with optional `offset`) or AdaRMSNorm (`dense`).

    RMSNorm y = n(x) * (offset + w) -> w' = (offset + w) / s - offset.
    AdaRMSNorm y = n(x) * (1 + scale) + shift with (scale, shift, gate) = dense(c): the scale
    and shift rows of dense are rescaled (scale' = (1 + scale)/s - 1, shift' = shift / s).
    ``offset`` overrides the module's own ``offset`` attribute (HF Gemma norms use 1 + w and
    carry no such attribute: tracing.verify_norm_fold finds the one that is exact).
    """
    with torch.no_grad():
        if hasattr(norm, "dense") and isinstance(norm.dense, nn.Linear):
            dense = norm.dense
            inv = inv_smooth.detach().to(device=dense.weight.device, dtype=torch.float64)
            d = inv.numel()
            if dense.out_features != 3 * d:
                raise ValueError(f"adaRMS dense has {dense.out_features} outputs, expected 3*{d}")
            w = dense.weight.data.to(torch.float64)
            b = (
                dense.bias.data.to(torch.float64)
                if dense.bias is not None
                else torch.zeros(3 * d, dtype=torch.float64, device=w.device)
            )
            w[:d] *= inv[:, None]
            b[:d] = (1 + b[:d]) * inv - 1
            w[d : 2 * d] *= inv[:, None]
            b[d : 2 * d] *= inv
            dense.weight.copy_(w.to(dense.weight.dtype))
            if dense.bias is None:
                dense.bias = nn.Parameter(b.to(dense.weight.dtype))
            else:
                dense.bias.copy_(b.to(dense.bias.dtype))
            return
        if not hasattr(norm, "weight") or norm.weight is None:
            raise ValueError(f"cannot fold smoothing into {type(norm).__name__}: it has no weight")
        offset = float(getattr(norm, "offset", 0.0)) if offset is None else float(offset)
        w = norm.weight.data.to(torch.float64)
        inv = inv_smooth.detach().to(device=w.device, dtype=torch.float64)
        norm.weight.copy_(((offset + w) * inv - offset).to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:  # LayerNorm
            norm.bias.copy_((norm.bias.data.to(torch.float64) * inv).to(norm.bias.dtype))
