"""What a quantization did, in numbers people compare: memory, per-layer error, ATM/OHB factors,
and action fidelity against the teacher (same observations, same noise).

Memory is counted as deployed: every floating tensor at 2 bytes (FP16), every quantized layer
at its real storage (packed codes + fp32 scales + bias + stored transforms).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .qlinear import QuantLinear

FP16_BYTES = 2


def _persistent_tensors(module: nn.Module):
    for name, p in module.named_parameters():
        yield name, p
    for mod_name, mod in module.named_modules():
        for bname, b in mod._buffers.items():
            if b is None or bname in mod._non_persistent_buffers_set:
                continue
            yield (f"{mod_name}.{bname}" if mod_name else bname), b


def memory_report(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Bytes of the quantized components (and of the whole model) vs the same at FP16."""
    q_layers = {n: m for n, m in student.named_modules() if isinstance(m, QuantLinear)}
    teacher_mods = dict(teacher.named_modules())
    comp_fp16 = 0
    comp_q = 0
    for n, m in q_layers.items():
        t = teacher_mods[n]
        comp_fp16 += FP16_BYTES * (t.weight.numel() + (t.bias.numel() if t.bias is not None else 0))
        comp_q += m.storage_bytes()
    model_fp16 = sum(FP16_BYTES * t.numel() for _, t in _persistent_tensors(teacher) if t.is_floating_point())
    quant_prefixes = tuple(n + "." for n in q_layers)
    model_q = comp_q + sum(
        FP16_BYTES * t.numel()
        for n, t in _persistent_tensors(student)
        if t.is_floating_point() and not n.startswith(quant_prefixes)
    )
    return {
        "quantized_layers": len(q_layers),
        "quantized_components_fp16_bytes": comp_fp16,
        "quantized_components_bytes": comp_q,
        "quantized_components_ratio": comp_q / comp_fp16 if comp_fp16 else 1.0,
        "model_fp16_bytes": model_fp16,
        "model_bytes": model_q,
        "model_ratio": model_q / model_fp16 if model_fp16 else 1.0,
    }


def fidelity(teacher_actions: torch.Tensor, student_actions: torch.Tensor) -> dict[str, float]:
    """Relative L2 and cosine of each sample's whole chunk, summarised over the buffer."""
    t = teacher_actions.double().reshape(teacher_actions.shape[0], -1)
    s = student_actions.double().reshape(student_actions.shape[0], -1)
    rel = (s - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=1, eps=1e-12)
    return {
        "samples": int(t.shape[0]),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "rel_l2_mean": float(rel.mean()),
        "rel_l2_max": float(rel.max()),
    }


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    v = torch.tensor(values, dtype=torch.float64)
    return {
        "count": len(values),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "changed": int(((v - 1).abs() > 1e-12).sum()),
    }


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def render_table(report: dict[str, Any]) -> str:
    """A terminal summary: memory, fidelity, ATM/OHB and the worst layers."""
    m, f = report["memory"], report.get("fidelity", {})
    lines = [
        f"quantvla report: {report.get('model', '?')}  scheme={report['scheme']}  layout={report['layout']}",
        "",
        f"{'':32}{'quantized':>14}{'FP16':>14}{'ratio':>9}",
        f"{'quantized components':32}{format_bytes(m['quantized_components_bytes']):>14}"
        f"{format_bytes(m['quantized_components_fp16_bytes']):>14}{m['quantized_components_ratio']:>9.1%}",
        f"{'whole model':32}{format_bytes(m['model_bytes']):>14}{format_bytes(m['model_fp16_bytes']):>14}"
        f"{m['model_ratio']:>9.1%}",
    ]
    if f:
        lines += [
            "",
            f"action fidelity vs teacher ({f['samples']} held-out samples, same noise): "
            f"cosine mean {f['cosine_mean']:.5f} min {f['cosine_min']:.5f} | "
            f"rel L2 mean {f['rel_l2_mean']:.4f} max {f['rel_l2_max']:.4f}",
        ]
    for key, label in (("alpha", "ATM alpha (per head)"), ("beta", "OHB beta (per layer)")):
        s = report.get(key + "_summary", {})
        if s.get("count"):
            lines.append(
                f"{label:32}n={s['count']} changed={s['changed']} min={s['min']:.3f} "
                f"mean={s['mean']:.3f} max={s['max']:.3f}"
            )
        else:
            lines.append(f"{label:32}off")
    errs = report.get("layer_errors", {})
    if errs:
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
        lines += ["", "largest per-layer output errors (relative L2 on teacher inputs):"]
        lines += [f"  {v:8.4f}  {n}" for n, v in worst]
    targets = report.get("targets")
    if targets:
        lines += ["", "targets:"]
        lines += [
            f"  [{'PASS' if t['ok'] else 'MISS'}] {t['what']}: {t['value']:.4f} (target {t['op']} {t['target']})"
            for t in targets
        ]
    return "\n".join(lines)


TARGETS = {  # issue 3: memory ratio of the quantized components and cosine fidelity on `small`
    "w8a8": {"memory": 0.52, "cosine": 0.999},
    "w4a8": {"memory": 0.30, "cosine": 0.99},
}


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    t = TARGETS.get(report["scheme"])
    if not t:
        return []
    out = [
        {
            "what": "quantized-component memory / FP16",
            "value": report["memory"]["quantized_components_ratio"],
            "op": "<=",
            "target": t["memory"],
            "ok": report["memory"]["quantized_components_ratio"] <= t["memory"],
        }
    ]
    if report.get("fidelity"):
        c = report["fidelity"]["cosine_mean"]
        out.append(
            {
                "what": "action cosine (mean over held-out)",
                "value": c,
                "op": ">=",
                "target": t["cosine"],
                "ok": c >= t["cosine"],
            }
        )
    return out


def save_png(report: dict[str, Any], path: Path) -> None:
    """Alpha histogram, beta per layer, per-layer error: one PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    alphas = [a for v in report.get("alpha", {}).values() for a in v]
    ax[0].hist(alphas or [1.0], bins=20, color="tab:blue")
    ax[0].set_title(f"ATM alpha per head (n={len(alphas)})")
    betas = report.get("beta", {})
    ax[1].bar(range(len(betas)), list(betas.values()) or [], color="tab:orange")
    ax[1].axhline(1.0, color="k", lw=0.5)
    ax[1].set_title("OHB beta per block")
    errs = report.get("layer_errors", {})
    ax[2].plot(list(errs.values()), ".", color="tab:red")
    ax[2].set_yscale("log" if errs and min(errs.values()) > 0 else "linear")
    ax[2].set_title("per-layer relative output error")
    ax[2].set_xlabel("layer (model order)")
    fig.suptitle(
        f"{report.get('model', '')} {report['scheme']} {report['layout']}: "
        f"cosine {report.get('fidelity', {}).get('cosine_mean', math.nan):.5f}, "
        f"memory {report['memory']['quantized_components_ratio']:.1%} of FP16"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
