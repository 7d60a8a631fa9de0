"""Attention temperature matching (ATM): one alpha per attention head (method.md section 4).

sigma(l, h) is the std of the pre-softmax logits Q K^T * scale of head h of attention module l,
masked entries excluded, in fp32, computed per sample and averaged over every call (buffer
samples x denoising steps). alpha = clamp(sigma_T / (sigma_Q + 1e-6), 0.7, 1.4), and 1 inside
the dead zone |alpha - 1| < 0.02. The student's queries are MULTIPLIED by alpha (the released
code's choice, which matches the teacher), folded into the q projection's rows (or dequant
scales): RoPE is linear, so this costs nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .qlinear import scale_output_channels

Runner = Callable[[nn.Module], None]
ALPHA_CLAMP = (0.7, 1.4)
ALPHA_DEAD_ZONE = 0.02
SIGMA_EPS = 1e-6


def per_head_std(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Std over (Tq, Tk) of each (sample, head) of (B, H, Tq, Tk) logits, masked out excluded."""
    lf = logits.detach().float()
    if mask is None:
        return lf.std(dim=(-1, -2), unbiased=False)
    m = torch.broadcast_to(mask, lf.shape).to(lf.dtype)
    cnt = m.sum(dim=(-1, -2)).clamp_min(1.0)
    mean = (lf * m).sum(dim=(-1, -2)) / cnt
    var = (((lf - mean[..., None, None]) ** 2) * m).sum(dim=(-1, -2)) / cnt
    return var.sqrt()


@dataclass
class LogitStats:
    """Running mean of per-sample, per-head logit std, keyed by attention module name."""

    names: set[str] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str, logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.names is not None and name not in self.names:
            return
        s = per_head_std(logits, mask).to(torch.float64).cpu()  # (B, H)
        self.sums[name] = self.sums.get(name, 0) + s.sum(0)
        self.counts[name] = self.counts.get(name, 0) + s.shape[0]

    def sigma(self) -> dict[str, torch.Tensor]:
        return {n: self.sums[n] / self.counts[n] for n in self.sums}


def collect_logit_std(model: nn.Module, run: Runner, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Run the calibration buffer through ``model`` and return sigma per head per module."""
    from ..models.attention import logit_observer
    from .tracing import attention_logit_scope

    stats = LogitStats(set(names) if names is not None else None)
    # the project's attention() reports through logit_observer; any other module that calls
    # F.scaled_dot_product_attention (HF sdpa attention) through attention_logit_scope
    with logit_observer(stats), attention_logit_scope(model, names or [], stats), torch.no_grad():
        run(model)
    return stats.sigma()


def atm_alpha(
    sigma_t: torch.Tensor,
    sigma_q: torch.Tensor,
    clamp: tuple[float, float] = ALPHA_CLAMP,
    dead_zone: float = ALPHA_DEAD_ZONE,
) -> torch.Tensor:
    """alpha = clamp(sigma_T / (sigma_Q + eps)); alpha := 1 where |alpha - 1| < dead_zone."""
    if sigma_t.shape != sigma_q.shape:
        raise ValueError(f"teacher/student sigma shapes differ: {tuple(sigma_t.shape)} vs {tuple(sigma_q.shape)}")
    a = (sigma_t.double() / (sigma_q.double() + SIGMA_EPS)).clamp(clamp[0], clamp[1])
    return torch.where((a - 1).abs() < dead_zone, torch.ones_like(a), a)


def apply_alpha(q_proj: nn.Module, alpha: torch.Tensor) -> None:
    """Multiply head h's query rows of ``q_proj`` by alpha[h] (folded into weights or scales)."""
    heads = alpha.numel()
    if q_proj.out_features % heads:
        raise ValueError(f"q projection with {q_proj.out_features} outputs cannot hold {heads} heads")
    scale_output_channels(q_proj, alpha.double().repeat_interleave(q_proj.out_features // heads))


@dataclass
class AttentionTarget:
    """An attention module (logit-statistics key) and the q projection that alpha folds into."""

    name: str
    q_proj: str


def calibrate_atm(
    student: nn.Module,
    run: Runner,
    targets: list[AttentionTarget],
    sigma_teacher: dict[str, torch.Tensor],
    order: str = "sequential",
    clamp: tuple[float, float] = ALPHA_CLAMP,
    dead_zone: float = ALPHA_DEAD_ZONE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Fit and fold alphas into ``student``; returns alpha per module (list over heads).

    ``sequential`` (default, method.md section 6): block by block from the first, each block's
    sigma_Q measured with the earlier blocks already corrected (one buffer pass per block).
    ``joint``: one pass, all blocks at once (cheaper, ignores the interaction).
    """
    if order not in ("sequential", "joint"):
        raise ValueError(f"ATM order must be 'sequential' or 'joint', got {order!r}")
    modules = dict(student.named_modules())
    missing = [t.name for t in targets if t.name not in sigma_teacher]
    if missing:
        raise ValueError(
            f"no teacher logit statistics for {missing[:3]}...: the calibration run never "
            "called these attention modules (are their attn_name set?)"
        )
    alphas: dict[str, list[float]] = {}
    groups = [[t] for t in targets] if order == "sequential" else [targets]
    for group in groups:
        sig_q = collect_logit_std(student, run, [t.name for t in group])
        for t in group:
            if t.name not in sig_q:
                raise ValueError(f"student never called attention module {t.name!r}")
            a = atm_alpha(sigma_teacher[t.name], sig_q[t.name], clamp, dead_zone)
            apply_alpha(modules[t.q_proj], a)
            alphas[t.name] = [float(v) for v in a]
        if progress:
            progress(group[-1].name)
    return alphas
