"""The one attention function every reference model calls.

Why one function: it is the hook point for attention-logit statistics (ATM needs the std of
Q K^T / sqrt(d) per head, masked entries excluded) and the single place to choose between an
eager path (logits materialised, softmax in fp32) and PyTorch SDPA. Both paths agree.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

MASK_VALUE = -2.3819763e38  # what openpi/LeRobot use; finite so fully masked rows stay finite

LogitObserver = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]

_state = threading.local()


def _observers() -> list[LogitObserver]:
    if not hasattr(_state, "observers"):
        _state.observers = []
    return _state.observers


_IMPL = {"impl": "sdpa"}


def set_attention_impl(impl: str) -> None:
    """Select the default path: 'sdpa' (fast) or 'eager' (logits materialised)."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention impl must be 'sdpa' or 'eager', got {impl!r}")
    _IMPL["impl"] = impl


def get_attention_impl() -> str:
    return _IMPL["impl"]


@contextlib.contextmanager
def attention_impl(impl: str) -> Iterator[None]:
    old = get_attention_impl()
    set_attention_impl(impl)
    try:
        yield
    finally:
        set_attention_impl(old)


@contextlib.contextmanager
def logit_observer(callback: LogitObserver) -> Iterator[None]:
    """Call `callback(name, logits_fp32 (B,H,Tq,Tk), mask|None)` for every attention call.

    While any observer is active the eager path is used, since SDPA never materialises logits
    (this is why GR00T's DiT needs an eager path for ATM calibration).
    """
    obs = _observers()
    obs.append(callback)
    try:
        yield
    finally:
        obs.remove(callback)


@dataclass(frozen=True)
class AttentionMask:
    """A boolean attention mask together with its additive form, built once and shared by every
    layer (and every denoising step) that uses it. SDPA otherwise turns a boolean mask into the
    additive one on every call (three kernels per attention call on the CPU)."""

    keep: torch.Tensor  # bool, True = attend
    bias: torch.Tensor  # 0 where keep, -inf elsewhere, in the attention's dtype

    @property
    def shape(self) -> torch.Size:
        return self.keep.shape


def attention_mask(mask: "torch.Tensor | AttentionMask | None", dtype: torch.dtype) -> "AttentionMask | None":
    """``mask`` (bool, True = attend) with its additive form in ``dtype``; an AttentionMask or
    None passes through. The bias is what SDPA builds from a boolean mask itself (0 / -inf), so
    results do not change."""
    if mask is None or isinstance(mask, AttentionMask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be a bool tensor (True = attend), got {mask.dtype}")
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return AttentionMask(keep=mask, bias=torch.where(mask, zero, torch.full_like(zero, float("-inf"))))


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of kv heads {kv_heads}")
    return x.repeat_interleave(heads // kv_heads, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: "torch.Tensor | AttentionMask | None" = None,
    scale: float | None = None,
    *,
    name: str = "",
) -> torch.Tensor:
    """Scaled dot-product attention with GQA.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); mask: bool broadcastable to (B, H, Tq, Tk), True =
    attend, or an AttentionMask holding it with its additive form (SDPA then skips the
    conversion). Returns (B, H, Tq, D) in q's dtype.
    """
    bias = None
    if isinstance(mask, AttentionMask):
        mask, bias = mask.keep, (mask.bias if mask.bias.dtype == q.dtype else None)
    heads = q.shape[1]
    if heads % k.shape[1]:
        raise ValueError(f"query heads {heads} not a multiple of kv heads {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    observers = _observers()
    if observers or _IMPL["impl"] == "eager":
        k = _expand_kv(k, heads)
        v = _expand_kv(v, heads)
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (or better)
        logits = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        for cb in observers:
            cb(name, logits, mask)
        if mask is not None:
            logits = logits.masked_fill(~mask, MASK_VALUE)
        probs = torch.softmax(logits, dim=-1)
        return torch.matmul(probs.to(v.dtype), v)
    # enable_gqa: SDPA reads the shared K/V heads directly instead of copies per query head.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask if bias is None else bias, scale=scale, enable_gqa=k.shape[1] != heads
    )


def name_attention_modules(model: nn.Module) -> None:
    """Give every module that calls `attention` its qualified name (the ATM key)."""
    for name, module in model.named_modules():
        if hasattr(module, "attn_name"):
            module.attn_name = name
