"""Weight memory per component (vision, backbone, expert/action head, other) and whole model:
FP16 against each quantization scheme, with every scale, bias and stored transform counted.

Why from shapes: the full-size presets (pi05-3b, groot-n15) must be accounted for on a laptop,
so the model is built on the ``meta`` device and the deployed QuantLinears are created empty
from the layer plan (``quant/layer_plan.py``) the benchmark's quick quantizer deploys too. A
real (materialised) model gives the same numbers; the tests check that.

``memory_estimate`` answers the same question for any layout plan (``quantvla layout``: a preset,
a model directory or an artifact's recorded layout), with plain int4 groups and no stored
transforms; ``model_summary`` counts what a model holds as loaded (``quantvla info``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .models import COMPONENTS, build_model, component_of
from .quant.layer_plan import plan_layers, replace_module
from .quant.qlinear import QuantLinear

FP16_BYTES = 2


def _persistent(module: nn.Module):
    """(qualified name, owning module, tensor) for every parameter and persistent buffer."""
    for mod_name, mod in module.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                yield (f"{mod_name}.{pname}" if mod_name else pname), mod, p
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set:
                continue
            yield (f"{mod_name}.{bname}" if mod_name else bname), mod, b


def account(model: nn.Module) -> dict[str, Any]:
    """Deployed bytes per component: float tensors at FP16, quantized layers at their real
    storage (codes + fp32 scales + bias + stored transforms). ``scales`` counts the fp32 side
    tensors of quantized layers (scales, bias, smoothing, rotation), which stay in the total."""
    comps = {
        c: {"bytes": 0, "fp16_bytes": 0, "quantized_bytes": 0, "quantized_fp16_bytes": 0, "scale_bytes": 0, "params": 0}
        for c in COMPONENTS
    }
    for name, mod, t in _persistent(model):
        c = comps[component_of(name)]
        nbytes = t.numel() * t.element_size()
        if isinstance(mod, QuantLinear):
            c["bytes"] += nbytes
            c["quantized_bytes"] += nbytes
            if name.endswith(".qweight"):
                params = mod.in_features * mod.out_features
                c["params"] += params
                c["fp16_bytes"] += FP16_BYTES * params
                c["quantized_fp16_bytes"] += FP16_BYTES * params
            else:
                c["scale_bytes"] += nbytes
                if name.endswith(".bias"):  # a float bias is part of the FP16 layer too
                    c["fp16_bytes"] += FP16_BYTES * t.numel()
                    c["quantized_fp16_bytes"] += FP16_BYTES * t.numel()
                    c["params"] += t.numel()
            continue
        size = FP16_BYTES * t.numel() if t.is_floating_point() else nbytes
        c["bytes"] += size
        c["fp16_bytes"] += size
        c["params"] += t.numel()
    total = {k: sum(c[k] for c in comps.values()) for k in comps["other"]}
    return {"components": comps, "total": total}


def meta_model(cfg: ModelConfig, scheme: str, layout: str = "quantvla") -> nn.Module:
    """The deployed model on the meta device: the FP model, or the layer plan's QuantLinears."""
    arch = cfg.arch
    model = build_model(cfg, seed=None, device="meta")
    if scheme == "fp":
        return model
    for p in plan_layers(model, arch, scheme, layout):
        with torch.device("meta"):
            ql = QuantLinear(**p.spec)
        replace_module(model, p.name, ql)
    return model


def memory_estimate(model: nn.Module, entries, scheme: str, group_size: int | None = 128) -> dict[str, dict[str, int]]:
    """FP16 vs quantized bytes per component for the layout plan ``entries`` (quant.layout
    LayoutEntry list) at ``scheme``: each integer linear as a QuantLinear on the meta device
    (codes + fp32 scales + bias; int4 groups of ``group_size`` where K allows, with integer
    group scales (one byte per group, fp32 per channel), else per channel; no smoothing or
    rotation stored), everything else at FP16. ``model`` is not
    changed; it may be on the meta device."""
    from .quant.config import SCHEMES

    w_bits, a_bits = SCHEMES[scheme]
    deployed = copy.deepcopy(model)
    for e in entries:
        if not e.integer:
            continue
        linear = deployed.get_submodule(e.name)
        gs = group_size if (w_bits == 4 and group_size and e.in_features % group_size == 0) else None
        with torch.device("meta"):
            ql = QuantLinear(
                e.in_features,
                e.out_features,
                w_bits=w_bits,
                a_bits=a_bits,
                group_size=gs,
                bias=getattr(linear, "bias", None) is not None,
                int_group_scales=gs is not None,
            )
        replace_module(deployed, e.name, ql)
    comps = account(deployed)["components"]
    return {c: {"fp16": r["fp16_bytes"], "quantized": r["bytes"]} for c, r in comps.items() if r["fp16_bytes"]}


def format_estimate(est: dict[str, dict[str, int]], scheme: str) -> str:
    """memory_estimate as a table: one row per component and the total, FP16 / scheme / ratio."""
    from .quant.report import format_bytes

    total = {"fp16": sum(v["fp16"] for v in est.values()), "quantized": sum(v["quantized"] for v in est.values())}
    lines = [
        f"memory estimate ({scheme}, floats at FP16, int4 groups of 128 with uint8 group scales, fp32 channel scales):",
        f"{'component':<12}{'FP16':>12}{scheme:>12}{'ratio':>8}",
    ]
    for comp, r in list(est.items()) + [("total", total)]:
        lines.append(
            f"{comp:<12}{format_bytes(r['fp16']):>12}{format_bytes(r['quantized']):>12}"
            f"{r['quantized'] / max(r['fp16'], 1):>8.1%}"
        )
    return "\n".join(lines)


def model_summary(source: str) -> dict[str, Any]:
    """Parameters and bytes per component as held when loaded (each tensor at its own dtype);
    presets are built on the meta device (no memory, random init, fp32); anything else is
    loaded with Policy.load (parameters and buffers)."""
    from .config import PRESETS, preset
    from .policy import Policy

    if source in PRESETS:
        model, name = build_model(preset(source), device="meta"), source
        tensors = list(model.named_parameters())
        scheme = "fp32 (random init)"
    else:
        pol = Policy.load(source)
        model, name, scheme = pol.model, pol.name, pol.scheme
        tensors = list(model.named_parameters()) + list(model.named_buffers())
    rows = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    for n, t in tensors:
        c = component_of(n)
        rows[c]["params"] += t.numel()
        rows[c]["bytes"] += t.numel() * t.element_size()
    return {
        "model": name,
        "arch": model.cfg.arch,
        "scheme": scheme,
        "components": rows,
        "total_params": sum(r["params"] for r in rows.values()),
        "total_bytes": sum(r["bytes"] for r in rows.values()),
    }


def memory_table(cfg: ModelConfig, schemes: list[str], layout: str = "quantvla") -> dict[str, Any]:
    """{scheme: account(...)} for the FP16 baseline ("fp") and each integer scheme."""
    out = {}
    for s in ["fp"] + [s for s in schemes if s != "fp"]:
        out[s] = account(meta_model(cfg, s, layout))
    return out


def format_memory(table: dict[str, Any], title: str = "") -> str:
    """One row per component + the quantized layers + whole model; one column per scheme."""
    schemes = list(table)
    mib = 1024**2
    head = f"{'component':<22}" + "".join(f"{('FP16' if s == 'fp' else s.upper()):>22}" for s in schemes)
    lines = [title, head] if title else [head]

    def cell(b: int, ref: int) -> str:
        return f"{b / mib:10.1f} MiB" + (f" {b / ref:6.1%}" if ref else " " * 7)

    fp = table["fp"]
    for comp in COMPONENTS:
        ref = fp["components"][comp]["bytes"]
        if not ref:
            continue
        lines.append(
            f"{comp:<22}" + "".join(f"{cell(table[s]['components'][comp]['bytes'], ref):>22}" for s in schemes)
        )
    qrow = f"{'quantized layers':<22}"
    srow = f"{'  of which scales':<22}"
    for s in schemes:
        t = table[s]["total"]
        if s == "fp":
            qrow += f"{'-':>22}"
            srow += f"{'-':>22}"
        else:
            qrow += f"{cell(t['quantized_bytes'], t['quantized_fp16_bytes']):>22}"
            srow += f"{cell(t['scale_bytes'], t['quantized_fp16_bytes']):>22}"
    lines += [qrow, srow]
    ref = fp["total"]["bytes"]
    lines.append(f"{'whole model':<22}" + "".join(f"{cell(table[s]['total']['bytes'], ref):>22}" for s in schemes))
    return "\n".join(lines)
