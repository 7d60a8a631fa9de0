"""The integer layers a scheme deploys, decided from module names and shapes alone.

Why a second way to decide this next to the pipeline: the weight-memory accounting has to
answer for the full-size presets (pi05-3b, groot-n15) on a laptop, so it works on a model built
on the ``meta`` device, where nothing can be run or traced. The pipeline itself decides where
smoothing folds from a traced forward (``tracing.py``, ``api.search_and_fold``); this module
uses the name rules of the model families this repository builds (q/k/v read
``input_layernorm``, gate/up read ``post_attention_layernorm``, down_proj reads up_proj).
Integer layers, bit widths, int4 groups and rotations are the pipeline's (test/test_bench_e2e.py
compares them with ``quantize()``'s); where smoothing stays inside the kernel can differ, since
the pipeline keeps it there when its traced fold check fails on the calibration data. Names of
other families (Gemma-2/3 ``pre_feedforward_layernorm``) are not covered: there a layer's
smoothing is counted as kept inside the kernel (its ``inv_smooth`` vector, K floats).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import layout as L
from .transforms import rotation_block_size

QUANT_BITS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
GROUP_SIZE = 128  # int4 weight groups, where the input width allows

_NORM_GROUPS = (
    (r"^(.*)\.self_attn\.(q|k|v)_proj$", "{}.input_layernorm", ("q_proj", "k_proj", "v_proj"), "self_attn"),
    (r"^(.*)\.mlp\.(gate|up)_proj$", "{}.post_attention_layernorm", ("gate_proj", "up_proj"), "mlp"),
)
_PRODUCER = ((r"^(.*)\.mlp\.down_proj$", "{}.mlp.up_proj"),)


@dataclass
class LayerPlan:
    """How one integer linear is deployed: what QuantLinear(...) gets, and its input transform."""

    name: str
    spec: dict[str, Any]
    rotation_block: int
    smooth_in_kernel: bool


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _norm_width(norm: nn.Module) -> int | None:
    if isinstance(getattr(norm, "dense", None), nn.Linear):
        return norm.dense.out_features // 3
    w = getattr(norm, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def fold_groups(names: list[str], modules: dict[str, nn.Module]) -> list[tuple[list[str], str | None, str]]:
    """Integer linears grouped by the tensor they read, with where their smoothing folds, by name.

    Returns (members, fold_target, kind) with kind 'norm' (RMSNorm / adaRMS dense), 'producer'
    (the producing linear's output rows) or 'none' (``inv_smooth`` inside the activation
    quantization). A norm is changed only when none of its readers stays float, and only
    readers of the norm's width belong to its group.
    """
    name_set = set(names)
    out: list[tuple[list[str], str | None, str]] = []
    norm_groups: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for n in names:
        for pat, tmpl, siblings, parent in _NORM_GROUPS:
            m = re.match(pat, n)
            if m and tmpl.format(m.group(1)) in modules:
                norm_groups.setdefault((tmpl.format(m.group(1)), f"{m.group(1)}.{parent}", siblings), []).append(n)
                break
        else:
            target, kind = None, "none"
            for pat, tmpl in _PRODUCER:
                m = re.match(pat, n)
                if m and isinstance(modules.get(tmpl.format(m.group(1))), nn.Linear):
                    target, kind = tmpl.format(m.group(1)), "producer"
            out.append(([n], target, kind))
    for (norm_name, parent, siblings), members in norm_groups.items():
        width = _norm_width(modules[norm_name])
        readers = [n for n in members if modules[n].in_features == width]
        float_readers = [
            f"{parent}.{c}"
            for c in siblings
            if f"{parent}.{c}" in modules
            and f"{parent}.{c}" not in name_set
            and getattr(modules[f"{parent}.{c}"], "in_features", None) == width
        ]
        if readers:
            out.append((readers, None if float_readers else norm_name, "none" if float_readers else "norm"))
        out += [([n], None, "none") for n in members if n not in readers]
    return out


def smoothing_in_kernel(model: nn.Module, int_names: list[str]) -> set[str]:
    """Integer linears whose smoothing cannot be folded into a neighbour (the pipeline then
    applies ``inv_smooth`` inside the activation quantization: attention output before o_proj,
    GR00T's weightless norm3 and GELU)."""
    modules = dict(model.named_modules())
    return {n for members, _target, kind in fold_groups(int_names, modules) if kind == "none" for n in members}


def integer_linears(model: nn.Module, arch: str, layout: str = "quantvla") -> list[str]:
    """Names of the nn.Linear modules ``layout`` makes integer, in model order."""
    modules = dict(model.named_modules())
    return [
        e.name for e in L.plan_model(model, arch, layout) if e.integer and isinstance(modules.get(e.name), nn.Linear)
    ]


def plan_layers(
    model: nn.Module,
    arch: str,
    scheme: str,
    layout: str = "quantvla",
    rotation_block: int = 64,
    smooth: bool = True,
    rotate: bool = True,
) -> list[LayerPlan]:
    """The integer layers of ``model`` under ``layout`` at ``scheme``, as the PTQ defaults
    (smooth + Hadamard rotation, int4 groups of 128 with integer group scales where K allows)
    would deploy them."""
    if scheme not in QUANT_BITS:
        raise ValueError(f"plan_layers needs an integer scheme, got {scheme!r}; accepted: {', '.join(QUANT_BITS)}")
    w_bits, a_bits = QUANT_BITS[scheme]
    modules = dict(model.named_modules())
    names = integer_linears(model, arch, layout)
    in_kernel = smoothing_in_kernel(model, names) if smooth else set()
    plans = []
    for n in names:
        lin = modules[n]
        k = lin.in_features
        b = rotation_block_size(k, rotation_block) if rotate else 1
        gs = GROUP_SIZE if (w_bits == 4 and k % GROUP_SIZE == 0) else None
        spec = {
            "in_features": k,
            "out_features": lin.out_features,
            "w_bits": w_bits,
            "a_bits": a_bits,
            "group_size": gs,
            "bias": lin.bias is not None,
            "smooth": n in in_kernel,
            "permute": False,
            "rotation_kind": "hadamard" if b > 1 else None,
            "rotation_block": b if b > 1 else 0,
            "static_act": False,
            "int_group_scales": gs is not None,
        }
        plans.append(LayerPlan(n, spec, b, n in in_kernel))
    return plans
