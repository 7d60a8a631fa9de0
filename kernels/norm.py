"""Float adaptive RMSNorm (pi0.5's adaRMS) as one op: one Triton kernel on the GPU, the eager
torch ops elsewhere.

Why: a denoising step of pi0.5 normalises every expert layer's input with an adaptive norm
whose own ops (casts, pow, mean, add, rsqrt, the scale and the shift) are ~9 kernel launches in
eager PyTorch, in every variant (the q/k/v it feeds are float by layout). On a GPU, where a
step is launch-bound, one kernel per norm is what counts; on the CPU the torch ops are cheap
and stay (bit-identical to the module's written-out formula).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import _triton_modules, log_fallback_once, resolve_backend, triton_build_errors, triton_next_pow2

_BROKEN = {"why": None}
MAX_K = 16384  # one row per program, the whole row in one tile


def adaptive_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, eps: float, *, backend: str | None = None
) -> torch.Tensor:
    """``(rms_norm(x.float()) * weight + shift).to(x.dtype)``, weight and shift broadcast
    against x (pi0.5: x (B, T, K), fp32 per-sample 1 + scale and shift (B, 1, K)). On Triton
    (CUDA, or the interpreter when asked) one kernel for exactly those shapes, with gradients
    off and outside torch.compile; the sum of squares runs in the kernel's order (a few fp32
    ulps from torch's). Any other case runs the torch ops."""
    name = resolve_backend(backend, x.device)
    if (
        name == "triton"
        and x.dim() == 3
        and tuple(weight.shape) == (x.shape[0], 1, x.shape[2])
        and tuple(shift.shape) == tuple(weight.shape)
        and _BROKEN["why"] is None
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.shape[-1] <= MAX_K
        and x.numel() > 0
    ):
        try:
            return _triton(x, weight, shift, eps)
        except triton_build_errors() as e:
            if x.device.type != "cuda":  # the interpreter builds nothing: a bug
                raise
            _BROKEN["why"] = str(e)
            log_fallback_once("building the adaptive RMSNorm kernel", e, "running the norm as torch ops from now on")
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * weight + shift).to(x.dtype)


def _triton(x, weight, shift, eps):
    _, tq = _triton_modules(x.device)
    b, t, k = x.shape
    x2 = x.reshape(b * t, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.to(torch.float32).reshape(b, k).contiguous()
    s = shift.to(torch.float32).reshape(b, k).contiguous()
    y = torch.empty((b * t, k), dtype=x.dtype, device=x.device)
    block = max(16, triton_next_pow2(k))
    tq.adaptive_rmsnorm_kernel[(b * t,)](
        x2,
        w,
        s,
        y,
        k,
        x2.stride(0),
        y.stride(0),
        k,
        t,
        float(eps),
        BLOCK_K=block,
        num_warps=4 if block <= 2048 else 8,
    )
    return y.view(b, t, k)
