"""``quantize_(model, config, calib=..., spec=None)``: QuantVLA on any ``nn.Module``.

Like torchao's ``quantize_``, it swaps the chosen ``nn.Linear`` modules of ``model`` for
``QuantLinear`` in place and keeps the model's dtype and device; it returns a report (a dict).
The steps (shared with ``quantize()``, the Policy API, which calls ``quantize_core``):

1. one traced teacher forward over the calibration inputs: per-linear input statistics, the
   fold proofs (tracing.py), attention-logit std per head (ATM), o_proj output RMS (OHB);
2. per layer group (linears reading one tensor): the smoothing strength (0 = none) and whether to
   rotate, searched on the group's sampled input tokens by output error (``smooth_search``);
3. smoothing folded where the trace proved the target, else kept inside the quantization op;
   the float function of the folded model is checked against the teacher on one batch (a fold
   that changes it is undone);
4. integer layers; ATM then OHB on the attention modules the spec names; report.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from .atm import AttentionTarget, LogitStats, calibrate_atm
from .config import QuantConfig
from .ohb import OutputRMS, calibrate_ohb
from .qlinear import QuantLinear, quant_backend, scale_output_channels
from .quantizers import qmax
from .spec import ArchSpec
from .tracing import attention_logit_scope, trace_forward, verify_norm_fold
from .transforms import InputTransform, build_transform, fold_smoothing_into_norm

Runner = Callable[..., list]  # runner(model, limit=None) -> list of output tensors (one per batch)


# ---- calibration inputs ----------------------------------------------------------------------------


def first_tensor(out) -> torch.Tensor | None:
    """The first floating tensor of a model output (tensor, tuple/list, dict / HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def make_runner(calib) -> Runner:
    """A runner from: a callable ``calib(model) -> output(s)``, or an iterable of batches, each a
    tensor (``model(x)``), a tuple/list (``model(*b)``) or a dict (``model(**b)``)."""
    if calib is None:
        raise ValueError("quantize_ needs calibration inputs: calib=[batch, ...] or calib=callable(model)")
    if callable(calib) and not isinstance(calib, (nn.Module, torch.Tensor)):

        def run_fn(model, limit=None):
            with torch.no_grad():
                out = calib(model)
            outs = out if isinstance(out, list) else [out]
            return [first_tensor(o) for o in outs][:limit]

        return run_fn
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    batches = list(calib)
    if not batches:
        raise ValueError("calib holds no batches")

    def run_batches(model, limit=None):
        outs = []
        with torch.no_grad():
            for b in batches[:limit]:
                if isinstance(b, dict):
                    o = model(**b)
                elif isinstance(b, (tuple, list)):
                    o = model(*b)
                else:
                    o = model(b)
                t = first_tensor(o)
                outs.append(t.detach() if t is not None else None)
        return outs

    run_batches.batches = batches
    return run_batches


def _outputs_error(a: list, b: list) -> float:
    num = den = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        num += float((x.double() - y.double()).pow(2).sum())
        den += float(y.double().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


# ---- teacher statistics ----------------------------------------------------------------------------


class InputStats:
    """Per-linear channel absmax and a bounded token sample of the input. Linears that read the
    same tensor object in a call get the same sampled rows (a sibling group shares one sample)."""

    def __init__(self, cap: int, seed: int):
        self.absmax: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)
        self._last: tuple | None = None  # (weakref to the input, absmax, rows)

    def hook(self, name: str):
        def pre_hook(_mod, args):
            with torch._C.DisableTorchFunction():  # the tracer must not see our own reads
                self._record(name, args[0])

        return pre_hook

    def _record(self, name: str, x0: torch.Tensor) -> None:
        import weakref

        last = self._last
        if last is not None and last[0]() is x0:  # a sibling of the previous reader: same rows
            a, take = last[1], last[2]
        else:
            x = x0.detach().float().reshape(-1, x0.shape[-1])
            a = x.abs().amax(0).cpu()
            take = x[torch.randperm(x.shape[0], generator=self.gen)[: self.cap].to(x.device)].cpu()
            try:
                self._last = (weakref.ref(x0), a, take)
            except TypeError:
                self._last = None
        self.absmax[name] = a if name not in self.absmax else torch.maximum(self.absmax[name], a)
        pool = take if name not in self.tokens else torch.cat([self.tokens[name], take])
        if pool.shape[0] > self.cap:
            g = torch.Generator().manual_seed(pool.shape[0] * 7919 + self.cap)  # same for siblings
            pool = pool[torch.randperm(pool.shape[0], generator=g)[: self.cap]]
        self.tokens[name] = pool


def teacher_pass(
    teacher: nn.Module,
    run: Runner,
    int_names: list[str],
    atm_names: list[str],
    ohb_names: list[str],
    cap: int,
    seed: int,
):
    """One traced pass: (trace, input stats, sigma per attention, o_proj RMS, outputs)."""
    from ..models.attention import logit_observer

    mods = dict(teacher.named_modules())
    stats = InputStats(cap, seed)
    logits = LogitStats(set(atm_names))
    rms = OutputRMS()

    handles = [mods[n].register_forward_pre_hook(stats.hook(n)) for n in int_names]
    handles += [mods[n].register_forward_hook(rms.hook(n)) for n in ohb_names]
    outputs: list = []
    try:
        with logit_observer(logits), attention_logit_scope(teacher, atm_names, logits):
            tr = trace_forward(teacher, lambda m: outputs.extend(run(m)), int_names)
    finally:
        for h in handles:
            h.remove()
    return tr, stats, logits.sigma(), rms.means(), outputs


# ---- per-group search ------------------------------------------------------------------------------


def static_act_scale(xt: torch.Tensor, percentile: float, a_bits: int) -> float:
    """Per-tensor static scale from a percentile of per-token absmax; never 0 (an all-zero or
    mostly-zero input falls back to the max, then to 1)."""
    rows = xt.abs().amax(-1).float()
    v = float(torch.quantile(rows, percentile / 100.0)) if rows.numel() else 0.0
    if not v > 0:
        v = float(rows.max()) if rows.numel() else 0.0
    if not v > 0:
        v = 1.0
    return v / qmax(a_bits)


def _options(qc, a_bits) -> list[tuple[float, bool]]:
    can_smooth = "smooth" in qc.transforms and a_bits is not None
    rot = "rotate" in qc.transforms
    if not qc.smooth_search:
        return [(qc.smooth_strength if can_smooth else 0.0, rot)]
    strengths = sorted(set(qc.smooth_grid) | {float(qc.smooth_strength)}) if can_smooth else [0.0]
    rots = [False, True] if (rot and qc.search_rotation) else [rot]
    return [(s, r) for s in strengths for r in rots]


def _transform(qc, option, weights, absmax) -> InputTransform:
    strength, rotate = option
    names = tuple(
        n for n in qc.transforms if n == "permute" or (n == "smooth" and strength > 0) or (n == "rotate" and rotate)
    )
    return build_transform(names, weights, absmax, strength if strength > 0 else 0.5, qc.rotation, qc.rotation_block)


def quantized_linear(lin: nn.Linear, qc, w_bits: int, a_bits: int | None, t: InputTransform | None, act_scale=None):
    """``lin`` as the QuantLinear ``qc`` deploys: int4 groups of ``qc.group_size`` where K
    allows (else per channel), with integer group scales when ``qc.int_group_scales``."""
    gs = qc.group_size if (w_bits == 4 and qc.group_size and lin.in_features % qc.group_size == 0) else None
    return QuantLinear.from_linear(
        lin,
        w_bits=w_bits,
        a_bits=a_bits,
        group_size=gs,
        transform=t,
        clip_grid=qc.clip_grid,
        act_scale=act_scale,
        int_group_scales=bool(gs and qc.int_group_scales),
    )


def group_error(linears: list[nn.Linear], x: torch.Tensor, t: InputTransform, qc, w_bits, a_bits) -> float:
    """Relative output error of the group (float64 reference integer math) on tokens x."""
    num = den = 0.0
    xd = x.double()
    for lin in linears:
        act = None
        if qc.activation == "static" and a_bits is not None:
            act = static_act_scale(t.apply(xd), qc.percentile, a_bits)
        ql = quantized_linear(_cpu_float_copy(lin), qc, w_bits, a_bits, t, act)
        y = xd @ lin.weight.detach().double().cpu().T
        if lin.bias is not None:
            y = y + lin.bias.detach().double().cpu()
        yq = ql.forward_reference(xd)
        num += float((yq - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def _cpu_float_copy(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight.detach().float().cpu())
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach().float().cpu())
    return out


SEARCH_ROWS = 512


def _row_subset(lin: nn.Linear, n: int, seed: int) -> nn.Linear:
    if lin.out_features <= n:
        return lin
    idx = torch.randperm(lin.out_features, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    out = nn.Linear(lin.in_features, n, bias=lin.bias is not None)
    with torch.no_grad():
        out.weight.copy_(lin.weight.detach()[idx.to(lin.weight.device)].float().cpu())
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach()[idx.to(lin.bias.device)].float().cpu())
    return out


def search_group(linears, x, absmax, qc, w_bits, a_bits) -> tuple[InputTransform, dict, list[dict]]:
    """(transform, chosen option, every option's error). Ties keep the earlier (simpler) option."""
    opts = _options(qc, a_bits)
    weights = [lin.weight.detach() for lin in linears]
    if len(opts) == 1:
        return _transform(qc, opts[0], weights, absmax), {"strength": opts[0][0], "rotate": opts[0][1]}, []
    # the transform comes from the full weights; the error is measured on a fixed random subset
    # of output rows (rows quantize independently, so the estimate is unbiased and the search
    # costs O(rows x K x tokens) per option instead of O(N x K x tokens))
    probe = [_row_subset(lin, SEARCH_ROWS, i) for i, lin in enumerate(linears)]
    rows, best = [], None
    for o in opts:
        t = _transform(qc, o, weights, absmax)
        err = group_error(probe, x, t, qc, w_bits, a_bits)
        rows.append({"strength": o[0], "rotate": o[1], "error": err})
        if best is None or err < best[0] * (1 - 1e-9):
            best = (err, o, t)
    return best[2], {"strength": best[1][0], "rotate": best[1][1], "error": best[0]}, rows


# ---- the core --------------------------------------------------------------------------------------


def plan_linears(model: nn.Module, spec: ArchSpec, qc, filter_fn=None) -> tuple[list[dict], list[str]]:
    """(layout rows {name, role, integer}, integer linear names), one pass over the modules."""
    from . import layout as L

    roles = L.layout_roles(qc.layout)
    rows, ints = [], []
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, QuantLinear)):
            continue
        role = spec.role(n)
        integer = role in roles and isinstance(m, nn.Linear)
        if integer and filter_fn is not None and not filter_fn(m, n):
            integer = False
        rows.append({"name": n, "role": role, "integer": integer})
        if integer:
            ints.append(n)
    return rows, ints


def _float_tol(model: nn.Module) -> float:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    # a wrong fold moves the output by O(1e-2 .. 1); a right one only by rounding (norms that
    # compute in fp32 internally cap even a float64 model near 1e-7; bf16 weights round at 2^-9)
    return {torch.float64: 1e-5, torch.float32: 1e-3}.get(p.dtype if p is not None else torch.float32, 5e-2)


def _fold_rounding_error(norm: nn.Module, inv: torch.Tensor, offset: float) -> float:
    """Max relative error of (offset + w') against (offset + w) * inv once w' is stored in the
    norm's dtype. Why: with Gemma's 1 + w form, w' = (1 + w) / s - 1 loses (1 + w) / s to
    bf16 rounding when it is small next to 1."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(getattr(norm, "dense", None), nn.Linear):
        return 0.0
    want = (offset + w.detach().double()) * inv.double().to(w.device)
    stored = (want - offset).to(w.dtype).double() + offset
    return float(((stored - want).abs() / want.abs().clamp_min(1e-30)).max())


def search_and_fold(
    student: nn.Module, teacher: nn.Module, qc, spec: ArchSpec, tr, stats: "InputStats", t_outputs: list, run: Runner
):
    """Per group: search the transform, fold its smoothing where proven, scale the members' weight
    columns; then check the float function on one batch (undoing every fold if it changed).
    -> (transforms, input_fold, output_fold, groups report, float check)."""
    w_bits, a_bits = qc.bits
    mods_t = dict(teacher.named_modules())
    mods_s = dict(student.named_modules())
    declared = None if spec.fold_groups is None else {frozenset(m): n for n, m in spec.fold_groups}
    transforms: dict[str, InputTransform] = {}
    input_fold: dict[str, torch.Tensor] = {}
    output_fold: dict[str, torch.Tensor] = {}
    groups_rep: list[dict] = []
    for members in tr.groups():
        members = [m for m in members if m in stats.tokens]
        if not members:
            continue
        kind, target, why, idx = tr.fold_target(members)
        if declared is not None and kind != "none" and declared.get(frozenset(members)) != target:
            kind, why = "none", f"proven fold into {target} is not among the spec's fold_groups"
        lins = [mods_t[n] for n in members]
        t, choice, table = search_group(lins, stats.tokens[members[0]], stats.absmax[members[0]], qc, w_bits, a_bits)
        entry = {"members": members, "fold": "none", "target": target, "proof": why, "choice": choice, "search": table}
        folded = False
        if t.inv_smooth is not None and qc.fold_smoothing and kind == "norm":
            offset, err = verify_norm_fold(
                mods_s[target], tr.module_arg_shapes.get(target, []), idx, t.inv_smooth, fold_smoothing_into_norm
            )
            if offset is None:
                entry["proof"] = (
                    f"{why}; but folding into {type(mods_s[target]).__name__} is not exact (rel err {err:.2e})"
                )
            else:
                lossy = _fold_rounding_error(mods_s[target], t.inv_smooth, offset)
                if lossy > 1e-2:
                    entry["proof"] = (
                        f"{why}; but the folded norm weight does not survive "
                        f"{mods_s[target].weight.dtype} rounding (max rel err {lossy:.1e})"
                    )
                else:
                    fold_smoothing_into_norm(mods_s[target], t.inv_smooth, offset)
                    entry.update(fold="norm", offset=offset)
                    folded = True
        elif t.inv_smooth is not None and qc.fold_smoothing and kind == "producer":
            if isinstance(mods_s.get(target), nn.Linear):
                scale_output_channels(mods_s[target], t.inv_smooth)
                output_fold[target] = t.inv_smooth
                entry["fold"] = "producer"
                folded = True
        if folded:
            for n in members:
                input_fold[n] = t.inv_smooth
                transforms[n] = InputTransform(None, t.perm, t.rotation, t.rotation_kind)
        else:
            if t.inv_smooth is not None:
                entry["fold"] = "exact"  # inverse smoothing inside the activation quantization
                entry["why_exact"] = entry["proof"]
            for n in members:
                transforms[n] = t
        groups_rep.append(entry)

    # weight side of every folded smoothing, then the float check on one batch
    with torch.no_grad():
        for n, inv in input_fold.items():
            lin = mods_s[n]
            lin.weight.copy_(lin.weight.double().div(inv.double().to(lin.weight.device)).to(lin.weight.dtype))
    float_err = _outputs_error(run(student, limit=1), t_outputs[:1]) if input_fold else 0.0
    tol = _float_tol(teacher)
    float_check = {"rel_error": float_err, "tolerance": tol, "ok": float_err <= tol, "folds": len(input_fold)}
    if input_fold and not float_check["ok"]:
        # a fold changed the float function: undo every fold, keep smoothing inside the op
        student.load_state_dict(teacher.state_dict())
        for g in groups_rep:
            if g["fold"] in ("norm", "producer"):
                g["fold"], g["why_exact"] = "exact", f"float check failed ({float_err:.2e} > {tol:.0e})"
        for n in input_fold:
            t = transforms[n]
            transforms[n] = InputTransform(input_fold[n], t.perm, t.rotation, t.rotation_kind)
        input_fold, output_fold = {}, {}
        float_check["undone"] = True
    return transforms, input_fold, output_fold, groups_rep, float_check


def quantize_core(
    student: nn.Module,
    teacher: nn.Module,
    qc,
    spec: ArchSpec,
    run: Runner,
    *,
    filter_fn=None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize ``student`` (a same-structure copy of the float ``teacher``) in place.

    Returns the parts the callers record: layout, per-module specs, alpha/beta, the fold
    groups (with proofs and the strength search), the float check, layer errors, timings."""
    step = progress or (lambda _d: None)
    w_bits, a_bits = qc.bits
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    layout_rows, int_names = plan_linears(teacher, spec, qc, filter_fn)
    atm_skipped: dict[str, str] = {}
    attn = [a for a in spec.attention if a.part == "action" or (qc.atm_backbone and a.part == "backbone")]
    atm_specs = []
    if qc.atm:
        for a in attn:
            if a.q_norm:
                atm_skipped[a.name] = "per-head query norm (q_norm) would undo a scale folded into q_proj"
            else:
                atm_specs.append(a)
    ohb_targets = [a.o_proj for a in spec.attention if a.part == "action"] if qc.ohb else []
    if qc.ohb and qc.ohb_mlp:
        ohb_targets += list(spec.mlp_out)

    tr, stats, sigma_t, rms_t, t_outputs = teacher_pass(
        teacher, run, int_names, [a.name for a in atm_specs], ohb_targets, qc.token_samples, qc.seed
    )
    step("teacher statistics")
    timings["teacher_pass"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    transforms, input_fold, output_fold, groups_rep, float_check = search_and_fold(
        student, teacher, qc, spec, tr, stats, t_outputs, run
    )
    mods_s = dict(student.named_modules())
    step("transforms")

    # -- integer layers --
    specs: dict[str, dict] = {}
    for n in int_names:
        lin = mods_s[n]
        t = transforms.get(n)
        act_scale = None
        if qc.activation == "static" and a_bits is not None and n in stats.tokens:
            xs = stats.tokens[n].double()
            if n in input_fold:
                xs = xs * input_fold[n].double()
            act_scale = static_act_scale(t.apply(xs) if t is not None else xs, qc.percentile, a_bits)
        ql = quantized_linear(lin, qc, w_bits, a_bits, t, act_scale)
        parent, _, child = n.rpartition(".")
        setattr(mods_s[parent] if parent else student, child, ql)
        specs[n] = ql.spec()
        step(n)
    timings["quantize_layers"] = time.perf_counter() - t1
    errors = _layer_errors(teacher, student, stats, input_fold, output_fold)

    # -- ATM, OHB --
    t2 = time.perf_counter()
    targets = []
    for a in atm_specs:
        sig = sigma_t.get(a.name)
        if sig is None:
            atm_skipped[a.name] = (
                "no attention logits observed (the module calls neither the project's "
                "attention() nor F.scaled_dot_product_attention)"
            )
        elif a.heads is not None and sig.numel() != a.heads:
            atm_skipped[a.name] = f"observed {sig.numel()} heads, spec says {a.heads}"
        else:
            targets.append(AttentionTarget(a.name, a.q_proj))
    ohb_ok = [o for o in ohb_targets if o in rms_t]
    plain_run = lambda m: run(m)
    alphas = (
        calibrate_atm(student, plain_run, targets, sigma_t, qc.order, qc.atm_clamp, qc.atm_dead_zone, progress=step)
        if targets
        else {}
    )
    timings["atm"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    betas = (
        calibrate_ohb(student, plain_run, ohb_ok, rms_t, qc.order, qc.ohb_log_clamp, qc.ohb_dead_zone, progress=step)
        if ohb_ok
        else {}
    )
    timings["ohb"] = time.perf_counter() - t3
    return {
        "layout": layout_rows,
        "modules": specs,
        "alpha": alphas,
        "beta": betas,
        "atm_skipped": atm_skipped,
        "groups": groups_rep,
        "float_check": float_check,
        "layer_errors": errors,
        "timings_s": timings,
        "teacher_outputs": t_outputs,
    }


def _layer_errors(teacher, student, stats: InputStats, input_fold, output_fold) -> dict[str, float]:
    mt, ms = dict(teacher.named_modules()), dict(student.named_modules())
    out = {}
    with torch.no_grad():
        for n, toks in stats.tokens.items():
            if not isinstance(ms.get(n), QuantLinear):
                continue
            w = mt[n].weight
            x = toks.to(w.device)
            y_f = mt[n](x.to(w.dtype)).double()
            if n in output_fold:
                y_f = y_f * output_fold[n].double().to(y_f.device)
            xs = x * input_fold[n].to(x.device) if n in input_fold else x
            y_q = ms[n](xs.to(w.dtype)).double()
            out[n] = float((y_q - y_f).norm() / y_f.norm().clamp_min(1e-12))
    return out


def summarize_groups(groups: list[dict]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g["fold"]] = kinds.get(g["fold"], 0) + 1
    chosen: dict[str, int] = {}
    for g in groups:
        c = g["choice"]
        key = f"s={c['strength']:g}{'+rot' if c['rotate'] else ''}"
        chosen[key] = chosen.get(key, 0) + 1
    return {"groups": len(groups), "folds": kinds, "chosen": chosen}


# ---- the public entry point -------------------------------------------------------------------------


def quantize_(
    model: nn.Module,
    config=None,
    calib=None,
    spec: ArchSpec | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    heldout=None,
    report: bool = True,
    keep_teacher: bool = False,
    backend: str = "auto",
) -> dict[str, Any]:
    """Quantize ``model`` in place (its linears become QuantLinear; dtype, device, training flag
    and every non-chosen module are left as they were) and return a report.

    config: a QuantConfig (scheme, layout = a named layout or a tuple of roles, transforms, ATM/OHB
    switches, strengths, search grid). calib: a list of batches (tensor / tuple / dict) or a
    callable ``calib(model)``. spec: an ArchSpec; default: the built-in spec of a known VLA, else
    the generic one for HF-style decoder blocks. filter_fn(module, name) -> bool further restricts
    which linears become integer (as in torchao). heldout: batches for the fidelity figure
    (default: the calibration batches)."""
    from .report import fidelity, memory_report, summarize

    qc = config or QuantConfig()
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized; quantize the float model instead")
    spec = spec or ArchSpec.for_model(model)
    run = make_runner(calib)
    held = make_runner(heldout) if heldout is not None else run
    was_training = {n: m.training for n, m in model.named_modules()}
    model.eval()
    teacher = copy.deepcopy(model)
    try:
        with quant_backend(backend):
            core = quantize_core(model, teacher, qc, spec, run, filter_fn=filter_fn)
            rep: dict[str, Any] = {
                "scheme": qc.scheme,
                "layout": qc.layout,
                "spec": spec.to_dict(),
                "config": qc.to_dict(),
                "integer_layers": sorted(core["modules"]),
                "groups": core["groups"],
                "groups_summary": summarize_groups(core["groups"]),
                "float_check": core["float_check"],
                "layer_errors": core["layer_errors"],
                "alpha": core["alpha"],
                "beta": core["beta"],
                "atm_skipped": core["atm_skipped"],
                "alpha_summary": summarize([a for v in core["alpha"].values() for a in v]),
                "beta_summary": summarize(list(core["beta"].values())),
                "layout_rows": core["layout"],
                "modules": core["modules"],
                "timings_s": core["timings_s"],
            }
            if report:
                t_out = core["teacher_outputs"] if held is run else held(teacher)
                s_out = held(model)
                pairs = [(a, b) for a, b in zip(t_out, s_out) if a is not None and b is not None]
                if pairs:
                    rep["fidelity"] = fidelity(
                        torch.cat([a.reshape(a.shape[0], -1).float().cpu() for a, _ in pairs]),
                        torch.cat([b.reshape(b.shape[0], -1).float().cpu() for _, b in pairs]),
                    )
                rep["memory"] = memory_report(model, teacher)
    finally:
        for n, m in model.named_modules():
            if n in was_training:
                m.training = was_training[n]
    if keep_teacher:
        rep["teacher"] = teacher
    return rep


def quantized_copy(model: nn.Module, config=None, calib=None, spec: ArchSpec | None = None, **kw):
    """(a quantized deep copy, report); ``model`` itself is left untouched."""
    m = copy.deepcopy(model)
    return m, quantize_(m, config, calib, spec, **kw)


def fold_smoothing_(
    model: nn.Module,
    config=None,
    calib=None,
    spec: ArchSpec | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, Any]:
    """Only the float part of quantize_: per group the searched smoothing is folded into the
    proven norm / producer and the members' weight columns, in place; groups whose fold cannot be
    proven are left as they are. The float function is unchanged (checked; undone otherwise).
    -> {"groups", "float_check", "folded"}."""
    qc = config or QuantConfig()
    spec = spec or ArchSpec.for_model(model)
    run = make_runner(calib)
    was_training = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        teacher = copy.deepcopy(model)
        _, int_names = plan_linears(model, spec, qc, filter_fn)
        tr, stats, _, _, outs = teacher_pass(teacher, run, int_names, [], [], qc.token_samples, qc.seed)
        _, input_fold, _, groups, check = search_and_fold(model, teacher, qc, spec, tr, stats, outs, run)
    finally:
        for n, m in model.named_modules():
            m.training = was_training.get(n, m.training)
    return {"groups": groups, "float_check": check, "folded": sorted(input_fold)}


__all__ = [
    "quantize_",
    "quantized_copy",
    "fold_smoothing_",
    "quantize_core",
    "make_runner",
    "ArchSpec",
    "search_group",
    "static_act_scale",
]
