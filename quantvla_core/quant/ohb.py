"""Output head balancing (OHB): one beta per action-head attention block (method.md section 5).

beta = RMS(teacher o_proj output) / RMS(student o_proj output), each RMS taken per sample over
the whole output (bias included) and averaged over the buffer and every denoising step;
log(beta) is clamped to +-0.30 and beta := 1 where |log beta| < 0.03. The student's o_proj
output is multiplied by beta, folded into its weight/bias (or dequant scales and bias).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from .qlinear import scale_output_channels

Runner = Callable[[nn.Module], None]
LOG_BETA_CLAMP = 0.30
LOG_BETA_DEAD_ZONE = 0.03


class OutputRMS:
    """Mean over calls and samples of RMS(output) per named module, from forward hooks (the
    statistic OHB balances; the teacher pass and the student pass share it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def hook(self, name: str):
        def hook(_mod, _inp, out):
            with torch._C.DisableTorchFunction():  # invisible to a tracing function mode
                y = out.detach().float()
                y = y if y.dim() > 1 else y[None]
                per_sample = y.reshape(y.shape[0], -1).pow(2).mean(-1).sqrt()
            self.sums[name] = self.sums.get(name, 0.0) + float(per_sample.sum())
            self.counts[name] = self.counts.get(name, 0) + per_sample.numel()

        return hook

    def means(self) -> dict[str, float]:
        return {n: self.sums[n] / self.counts[n] for n in self.sums}


def collect_output_rms(model: nn.Module, run: Runner, names: Iterable[str]) -> dict[str, float]:
    """Mean over calls and samples of RMS(output) of the named modules."""
    modules = dict(model.named_modules())
    rms = OutputRMS()
    handles = []
    for n in names:
        if n not in modules:
            raise ValueError(f"OHB target {n!r} is not a module of the model")
        handles.append(modules[n].register_forward_hook(rms.hook(n)))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return rms.means()


def ohb_beta(
    rms_t: float, rms_q: float, log_clamp: float = LOG_BETA_CLAMP, dead_zone: float = LOG_BETA_DEAD_ZONE
) -> float:
    """beta = rms_T / rms_Q with log-clamp and dead zone."""
    if rms_q <= 0 or rms_t <= 0:
        return 1.0
    lb = max(-log_clamp, min(log_clamp, math.log(rms_t / rms_q)))
    return 1.0 if abs(lb) < dead_zone else math.exp(lb)


def calibrate_ohb(
    student: nn.Module,
    run: Runner,
    targets: list[str],
    rms_teacher: dict[str, float],
    order: str = "sequential",
    log_clamp: float = LOG_BETA_CLAMP,
    dead_zone: float = LOG_BETA_DEAD_ZONE,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Fit and fold betas into the student's o projections; returns beta per module."""
    if order not in ("sequential", "joint"):
        raise ValueError(f"OHB order must be 'sequential' or 'joint', got {order!r}")
    missing = [t for t in targets if t not in rms_teacher]
    if missing:
        raise ValueError(f"no teacher output statistics for {missing[:3]}")
    modules = dict(student.named_modules())
    betas: dict[str, float] = {}
    groups = [[t] for t in targets] if order == "sequential" else [targets]
    for group in groups:
        rms_q = collect_output_rms(student, run, group)
        for t in group:
            if t not in rms_q:
                raise ValueError(f"student never called {t!r}")
            b = ohb_beta(rms_teacher[t], rms_q[t], log_clamp, dead_zone)
            if b != 1.0:
                scale_output_channels(modules[t], b)
            betas[t] = b
        if progress:
            progress(group[-1])
    return betas
