"""One call: ``quantize(policy_or_model, QuantConfig(...), calib)`` -> a quantized student + report.

Order (method.md section 6): teacher statistics in one pass over the calibration buffer
(activation ranges, ATM logit std, OHB output RMS; every denoising step, fixed noise) ->
outlier transforms (smoothing folded into norms / producer linears where possible) ->
integer layers (QuantLinear) per the layout -> ATM block by block from the first -> OHB block
by block -> report on a held-out buffer (same noise for teacher and student).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import layout as L
from .calibration import CalibrationRun, load_observations, split_buffer
from .config import ORDERS, SCHEMES, QuantConfig  # noqa: F401 - ORDERS, SCHEMES re-exported (their old home)
from .qlinear import QuantLinear, quant_backend
from .report import check_targets, fidelity, memory_report, summarize


@dataclass
class QuantResult:
    """The student, what the artifact records about it, and the report."""

    policy: Any
    meta: dict[str, Any]
    report: dict[str, Any]
    teacher: nn.Module | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.policy.model

    def save(self, directory: str | Path) -> Path:
        from .artifact import save_quantized

        return save_quantized(directory, self)


# ---- teacher statistics ----------------------------------------------------------------------


class _InputStats:
    """Per-linear channel absmax of the input and a bounded random sample of input tokens."""

    def __init__(self, names: list[str], cap: int, seed: int):
        self.names = names
        self.absmax: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)

    def hook(self, name: str):
        def pre_hook(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            a = x.abs().amax(0).cpu()
            self.absmax[name] = a if name not in self.absmax else torch.maximum(self.absmax[name], a)
            take = x[torch.randperm(x.shape[0], generator=self.gen)[: self.cap].to(x.device)].cpu()
            pool = take if name not in self.tokens else torch.cat([self.tokens[name], take])
            if pool.shape[0] > self.cap:
                pool = pool[torch.randperm(pool.shape[0], generator=self.gen)[: self.cap]]
            self.tokens[name] = pool

        return pre_hook


# ---- the pipeline -------------------------------------------------------------------------------


def _as_policy(model):
    from ..policy import Policy

    if isinstance(model, Policy):
        return model
    if isinstance(model, nn.Module) and hasattr(model, "cfg"):
        # keep the caller's dtype and device (Policy would otherwise cast the model in place)
        was = {n: m.training for n, m in model.named_modules()}
        p = next((p for p in model.parameters()), None)
        pol = Policy(
            model,
            model.cfg,
            name=getattr(model.cfg, "name", "custom"),
            device=p.device if p is not None else "cpu",
            dtype=_model_dtype_name(model),
        )
        for n, m in model.named_modules():
            m.training = was.get(n, m.training)
        return pol
    raise TypeError(
        f"quantize() needs a quantvla_core.Policy or a reference model with .cfg; got {type(model).__name__}"
    )


def _calib_observations(calib, cfg, qc: QuantConfig, state_dim: int):
    if isinstance(calib, (str, Path)):
        held = qc.calib_samples * qc.heldout_fraction / (1 - qc.heldout_fraction)
        total = qc.calib_samples + (max(1, int(round(held))) if qc.heldout_fraction > 0 else 0)
        obs = load_observations(calib, cfg, n=total, seed=qc.seed, state_dim=state_dim)
        return split_buffer(obs, qc.heldout_fraction)
    if isinstance(calib, (list, tuple)):
        return split_buffer(list(calib), qc.heldout_fraction)
    raise TypeError("calib must be a source string (synthetic[:N], folder, .mcap) or a list of Observations")


def _model_dtype_name(model: nn.Module) -> str | None:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (
        {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(p.dtype) if p is not None else None
    )


def _policy_runner(run: CalibrationRun):
    """The core's runner: one output tensor per calibration batch (limit: the first batches)."""

    def runner(model, limit=None):
        n = len(run.batches) if limit is None else min(limit, len(run.batches))
        return [CalibrationRun([run.batches[i]], [run.noises[i]], run.num_steps).run(model) for i in range(n)]

    return runner


def quantize(
    model,
    config: QuantConfig | None = None,
    calib="synthetic",
    *,
    heldout=None,
    progress: bool = True,
    report: bool = True,
    keep_teacher: bool = False,
    spec=None,
) -> QuantResult:
    """Quantize a Policy (or reference model) into a new student Policy; the input is unchanged
    (weights, dtype and device). A thin wrapper over ``api.quantize_core`` with the built-in
    ArchSpec of the policy's architecture and its observation / flow-matching calibration."""
    from ..policy import Policy
    from .api import plan_linears, quantize_core
    from .spec import ArchSpec

    qc = config or QuantConfig()
    policy = _as_policy(model)
    if any(isinstance(m, QuantLinear) for m in policy.model.modules()):
        raise ValueError(f"{policy.name} is already quantized ({policy.scheme}); quantize the float model instead")
    cfg = policy.config
    arch = L.check_arch(L.detect_arch(policy.model) if not hasattr(cfg, "arch") else cfg.arch)
    spec = spec or ArchSpec.builtin(policy.model, arch)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    calib_obs, held_obs = _calib_observations(calib, cfg, qc, policy.state_dim)
    if heldout is not None:
        held_obs = (
            heldout
            if isinstance(heldout, list)
            else load_observations(heldout, cfg, seed=qc.seed + 1, state_dim=policy.state_dim)
        )
    teacher = policy.model
    run = CalibrationRun.build(policy, calib_obs, qc.batch_size, seed=qc.seed + 1000)
    held = CalibrationRun.build(policy, held_obs, qc.batch_size, seed=qc.seed + 2000) if report else None

    _, int_names = plan_linears(teacher, spec, qc)
    n_attn = sum(1 for a in spec.attention if a.part == "action" or qc.atm_backbone)
    bar = tqdm(
        total=2 + len(int_names) + 2 * n_attn + (2 if report else 0),
        disable=not progress,
        desc=f"quantize {qc.scheme}",
        unit="step",
        dynamic_ncols=True,
    )

    def step(desc: str) -> None:
        bar.set_postfix_str(desc[-48:], refresh=False)
        bar.update(1)

    with quant_backend("auto"):
        student = copy.deepcopy(teacher)
        core = quantize_core(student, teacher, qc, spec, _policy_runner(run), progress=step)
        timings.update(core["timings_s"])
        groups = [{k: v for k, v in g.items() if k != "search"} for g in core["groups"]]
        meta = {
            "format": "quantvla-quantization",
            "version": 1,
            "scheme": qc.scheme,
            "arch": arch,
            "config": qc.to_dict(),
            "layout": core["layout"],
            "modules": core["modules"],
            "alpha": core["alpha"],
            "beta": core["beta"],
            "atm_skipped_qk_norm": [n for n, why in core["atm_skipped"].items() if "q_norm" in why],
            "atm_skipped": core["atm_skipped"],
            "fold_groups": groups,
            "float_check": core["float_check"],
            "calibration": {
                "source": str(calib) if isinstance(calib, (str, Path)) else "observations",
                "samples": len(run),
                "heldout": len(held) if held is not None else 0,
            },
        }
        # the student keeps the teacher's IO (a real checkpoint's tokenizer / normalisation too)
        student_policy = Policy(
            student,
            cfg,
            name=f"{policy.name}-{qc.scheme}",
            device=policy.device,
            dtype=_model_dtype_name(teacher),
            scheme=qc.scheme,
            quant_meta=meta,
            io=policy.io,
        )
        rep: dict[str, Any] = {}
        if report:
            t4 = time.perf_counter()
            rep = build_report(teacher, student, held, core["layer_errors"], meta, policy.name)
            rep["fold_groups"] = core["groups"]
            rep["float_check"] = core["float_check"]
            rep["atm_skipped"] = core["atm_skipped"]
            step("report: teacher")
            step("report: student")
            timings["report"] = time.perf_counter() - t4
    bar.close()
    timings["total"] = time.perf_counter() - t0
    rep["timings_s"] = timings
    return QuantResult(student_policy, meta, rep, teacher if keep_teacher else None, timings)


SMOOTH_GRID = (0.15, 0.3, 0.5)  # the method's range for the smoothing strength (method.md 3)


def sweep_smooth_strength(
    model,
    config: QuantConfig | None = None,
    calib="synthetic",
    *,
    grid: tuple[float, ...] = SMOOTH_GRID,
    heldout=None,
    progress: bool = True,
) -> tuple[QuantResult, list[dict[str, float]]]:
    """Quantize once per smoothing strength and keep the one whose held-out actions are closest
    to the float model's (mean cosine; ties: the smaller worst case). -> (best, one row per try).

    Why: the best strength depends on the model's activation outliers (on the MT10 default
    policy W4A8 held-out cosine went 0.9971 / 0.9997 / 0.9980 at 0.15 / 0.3 / 0.5). The choice
    uses only calibration and held-out frames, never closed-loop results. Costs len(grid)
    quantizations; the sweep is recorded in the winner's report."""
    qc = config or QuantConfig()
    if "smooth" not in qc.transforms:
        raise ValueError(
            f"a smoothing-strength sweep needs the 'smooth' transform; transforms are {list(qc.transforms)}"
        )
    if not grid or any(not 0 < g <= 1 for g in grid):
        raise ValueError(f"smoothing strengths must lie in (0, 1], got {list(grid)}")
    rows, best, best_key = [], None, None
    for strength in grid:
        res = quantize(
            model,
            dataclasses.replace(qc, smooth_strength=float(strength), smooth_search=False),
            calib,
            heldout=heldout,
            progress=progress,
            report=True,
        )
        fid = res.report["fidelity"]
        rows.append(
            {
                "smooth_strength": float(strength),
                "cosine_mean": float(fid["cosine_mean"]),
                "cosine_min": float(fid["cosine_min"]),
            }
        )
        key = (rows[-1]["cosine_mean"], rows[-1]["cosine_min"])
        if best_key is None or key > best_key:
            best, best_key = res, key
    best.report["smooth_strength_sweep"] = rows
    best.meta["smooth_strength_sweep"] = rows
    return best, rows


def layer_errors(
    teacher: nn.Module,
    student: nn.Module,
    inputs: _InputStats,
    input_fold: dict[str, torch.Tensor],
    output_fold: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Relative L2 error of every integer layer on sampled teacher inputs (layer in isolation,
    before ATM/OHB; smoothing folded into neighbours is accounted for on both sides)."""
    mt, ms = dict(teacher.named_modules()), dict(student.named_modules())
    out = {}
    with torch.no_grad():
        for n, toks in inputs.tokens.items():
            if not isinstance(ms.get(n), QuantLinear):
                continue
            x = toks.to(next(mt[n].parameters()).device)
            y_f = mt[n](x.to(mt[n].weight.dtype)).double()
            if n in output_fold:
                y_f = y_f * output_fold[n].double().to(y_f.device)
            xs = x * input_fold[n].to(x.device) if n in input_fold else x
            y_q = ms[n](xs).double()
            out[n] = float((y_q - y_f).norm() / y_f.norm().clamp_min(1e-12))
    return out


def build_report(teacher, student, held: CalibrationRun, errors: dict[str, float], meta, model_name) -> dict[str, Any]:
    """Fidelity on the held-out buffer, memory, per-layer errors and the ATM/OHB factors."""
    t_actions = held.run(teacher)
    s_actions = held.run(student)
    rep = {
        "model": model_name,
        "scheme": meta["scheme"],
        "layout": meta["config"]["layout"],
        "memory": memory_report(student, teacher),
        "fidelity": fidelity(t_actions, s_actions),
        "layer_errors": errors,
        "alpha": meta["alpha"],
        "beta": meta["beta"],
        "alpha_summary": summarize([a for v in meta["alpha"].values() for a in v]),
        "beta_summary": summarize(list(meta["beta"].values())),
        "config": meta["config"],
    }
    rep["targets"] = check_targets(rep)
    return rep
