"""Int4 packing: two signed 4-bit values per byte, laid out so a GEMM K-tile unpacks cheaply.

Layout ("split-half in 128-wide K groups"), for each row independently:

* K is cut into consecutive groups of ``PACK_GROUP = 128`` columns; the last group may be
  shorter (any even width ``t``).
* A group starting at column ``k0`` with width ``t`` occupies bytes ``k0/2 .. k0/2 + t/2 - 1``.
  Byte ``k0/2 + j`` (``0 <= j < t/2``) holds column ``k0 + j`` in its LOW nibble and column
  ``k0 + t/2 + j`` in its HIGH nibble.
* Nibbles are two's complement: -8..7 map to 0x8..0x7.

Why: a Triton kernel with a 128-wide K tile loads 64 contiguous bytes per weight row and gets
two int8 operands with two shifts (``lo = (p << 4) >> 4``, ``hi = p >> 4`` on int8), each
matching a CONTIGUOUS 64-wide slice of the activations.  No interleave/shuffle is needed, so
both halves feed ``tl.dot`` directly.  The group boundary coincides with group-128 scales.
When both operands are packed the same way (W4A4), low nibbles pair with low nibbles and high
with high, so the positions never need to be reconstructed.
"""

from __future__ import annotations

import torch

PACK_GROUP = 128
"""Width in K of one packing group (the last group of a row may be shorter)."""

INT4_MIN, INT4_MAX = -8, 7


def _check_2d(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(t.shape)}")


def _split_groups(t: torch.Tensor, width: int):
    """Split the last axis into full groups (N, G, width) and the shorter tail (N, t) or None."""
    n, k = t.shape
    full = (k // width) * width
    body = t[:, :full].reshape(n, full // width, width)
    tail = t[:, full:] if full < k else None
    return body, tail


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape (N, K), K even, into uint8 (N, K // 2)."""
    _check_2d(q, "q")
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values in [-8, 7], got dtype {q.dtype}")
    n, k = q.shape
    if k % 2:
        raise ValueError(f"pack_int4 needs an even number of columns K, got K={k}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"pack_int4 values must lie in [-8, 7]; got min {int(q.min())}, max {int(q.max())}")
    if k == 0:
        return torch.empty((n, 0), dtype=torch.uint8, device=q.device)
    body, tail = _split_groups(q.to(torch.int16), PACK_GROUP)
    parts = [_pack_halves(body).reshape(n, -1)]
    if tail is not None:
        parts.append(_pack_halves(tail))
    return torch.cat(parts, dim=1).contiguous()


def _pack_halves(g: torch.Tensor) -> torch.Tensor:
    half = g.shape[-1] // 2
    return ((g[..., :half] & 0xF) | ((g[..., half:] & 0xF) << 4)).to(torch.uint8)


def _unpack_halves(b: torch.Tensor) -> torch.Tensor:
    s = b.view(torch.int8)
    return torch.cat([(s << 4) >> 4, s >> 4], dim=-1)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 (N, K // 2) -> int8 (N, K) in [-8, 7]."""
    _check_2d(p, "p")
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects packed uint8 bytes, got dtype {p.dtype}")
    n, kb = p.shape
    if kb == 0:
        return torch.empty((n, 0), dtype=torch.int8, device=p.device)
    body, tail = _split_groups(p.contiguous(), PACK_GROUP // 2)
    parts = [_unpack_halves(body).reshape(n, -1)]
    if tail is not None:
        parts.append(_unpack_halves(tail))
    return torch.cat(parts, dim=1)
