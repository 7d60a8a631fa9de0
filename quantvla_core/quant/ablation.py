"""The ablation study: which components are integer (paper Table 1) and what ATM / OHB add on
the selective layout (Table 2), as action fidelity against the float teacher and, optionally,
as closed-loop MT10 success of every variant paired with the float policy.

Plain functions so that a study can be scripted from Python; `quantvla ablate` parses its flags
into these arguments and prints what they return.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

# ATM / OHB variant name -> (atm, ohb) as QuantConfig flags.
VARIANTS = {"none": (False, False), "atm": (True, False), "ohb": (False, True), "atm+ohb": (True, True)}
# The layouts of the paper's Table 1; Table 2 runs on the selective one, llm+dit-mlp.
TABLE1_LAYOUTS = ("llm", "dit-all", "dit-mlp", "llm+dit-all", "llm+dit-mlp")
SELECTIVE_LAYOUT = "llm+dit-mlp"


def ablation_combos(schemes, layouts, variants, full: bool = False) -> list[tuple[str, str, str]]:
    """(scheme, layout, variant) to run: the paper's two tables, or the full product.

    Table 1: every layout without ATM/OHB. Table 2: every variant on the selective layout.
    """
    if full:
        return list(itertools.product(schemes, layouts, variants))
    combos = [(s, lay, "none") for s in schemes for lay in layouts]
    combos += [(s, SELECTIVE_LAYOUT, v) for s in schemes for v in variants if (s, SELECTIVE_LAYOUT, v) not in combos]
    return combos


def variant_name(scheme: str, layout: str, variant: str) -> str:
    """The folder (and eval display) name of one saved variant: w8a8_llm-dit-mlp_atm-ohb."""
    return f"{scheme}_{layout}_{variant}".replace("+", "-")


def run_ablation(
    policy, calib, combos, base_over=None, progress=True, save_dir: str | Path | None = None
) -> list[dict]:
    """Fidelity (and memory) of each (scheme, layout, ATM/OHB variant) on one buffer; with
    ``save_dir`` every variant is also written as an artifact (for closed-loop evaluation).

    ``base_over``: QuantConfig fields shared by every variant (scheme, layout, atm and ohb come
    from the combo)."""
    from tqdm import tqdm

    from .quantize import QuantConfig, quantize

    rows = []
    for scheme, lay, var in tqdm(combos, desc="ablate", disable=not progress, unit="config"):
        atm, ohb = VARIANTS[var]
        qc = QuantConfig(**{**(base_over or {}), "scheme": scheme, "layout": lay, "atm": atm, "ohb": ohb})
        r = quantize(policy, qc, calib, progress=False)
        artifact = None
        if save_dir is not None:
            artifact = str(Path(save_dir) / variant_name(scheme, lay, var))
            r.save(artifact)
        rows.append(
            {
                "scheme": scheme,
                "layout": lay,
                "variant": var,
                **r.report["fidelity"],
                "artifact": artifact,
                "memory_ratio": r.report["memory"]["quantized_components_ratio"],
                "model_memory_ratio": r.report["memory"]["model_ratio"],
                "alpha_changed": r.report["alpha_summary"].get("changed", 0),
                "beta_changed": r.report["beta_summary"].get("changed", 0),
            }
        )
    return rows


def render_ablation(rows: list[dict]) -> str:
    """Paper Table 1 (layouts, no ATM/OHB) and Table 2 (ATM/OHB on the selective layout)."""
    out = []
    schemes = sorted({r["scheme"] for r in rows})
    t1 = [r for r in rows if r["variant"] == "none"]
    if t1:
        out.append("Table 1 shape: which components are integer (no ATM/OHB); action fidelity vs FP teacher")
        out.append(f"{'layout':<14}" + "".join(f"{s + ' cos':>14}{s + ' relL2':>14}{s + ' mem':>10}" for s in schemes))
        for lay in dict.fromkeys(r["layout"] for r in t1):
            cells = ""
            for s in schemes:
                r = next((x for x in t1 if x["layout"] == lay and x["scheme"] == s), None)
                cells += (
                    f"{r['cosine_mean']:>14.5f}{r['rel_l2_mean']:>14.4f}{r['memory_ratio']:>10.1%}"
                    if r
                    else f"{'-':>14}{'-':>14}{'-':>10}"
                )
            out.append(f"{lay:<14}{cells}")
    t2 = [r for r in rows if r["layout"] in (SELECTIVE_LAYOUT, "quantvla")]
    if {r["variant"] for r in t2} - {"none"}:
        out.append("")
        out.append("Table 2 shape: ATM / OHB on the selective layout (LLM + DiT MLP)")
        out.append(
            f"{'variant':<14}" + "".join(f"{s + ' cos':>14}{s + ' relL2':>14}{s + ' a/b!=1':>14}" for s in schemes)
        )
        for var in dict.fromkeys(r["variant"] for r in t2):
            cells = ""
            for s in schemes:
                r = next((x for x in t2 if x["variant"] == var and x["scheme"] == s), None)
                cells += (
                    f"{r['cosine_mean']:>14.5f}{r['rel_l2_mean']:>14.4f}"
                    f"{str(r['alpha_changed']) + '/' + str(r['beta_changed']):>14}"
                    if r
                    else f"{'-':>14}{'-':>14}{'-':>14}"
                )
            out.append(f"{var:<14}{cells}")
    out.append("")
    out.append(
        "(fidelity = mean over held-out observations of the cosine / relative L2 of the whole action "
        "chunk vs the FP teacher with identical noise; success rates need the closed-loop evaluation)"
    )
    return "\n".join(out)


def closed_loop_ablation(
    model: str,
    rows: list[dict],
    out_dir: str | Path,
    *,
    episodes: int = 10,
    replan_steps: int = 16,
    workers: int = 2,
    tasks=None,
    max_steps: int = 0,
    progress: bool = True,
) -> dict:
    """Run the float ``model`` and every saved variant of ``rows`` (run_ablation with a
    save_dir) on the same held-out MT10 starts (paired); adds each row's success rate, its 95%
    interval and the McNemar p-value against FP to the rows, writes the eval report to
    ``out_dir`` and returns it. ``tasks``: MT10 task names (default all ten); ``max_steps``: the
    episode step limit (0: the environment's)."""
    from ..sim.env import TASKS
    from ..sim.evaluate import EvalConfig, evaluate
    from ..sim.report import save_report

    missing = [variant_name(r["scheme"], r["layout"], r["variant"]) for r in rows if not r.get("artifact")]
    if missing:
        raise ValueError(f"closed-loop ablation runs saved variants; not saved: {', '.join(missing)} (give save_dir)")
    specs = [("fp", model)] + [(Path(r["artifact"]).name, r["artifact"]) for r in rows]
    cfg = EvalConfig(
        episodes_per_task=episodes,
        replan_steps=replan_steps,
        workers=workers,
        tasks=tuple(tasks) if tasks else TASKS,
    )
    if max_steps:
        cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, max_steps=max_steps))
    report = evaluate(specs, cfg, progress=progress)
    save_report(report, Path(out_dir))
    for r in rows:
        name = Path(r["artifact"]).name
        v = report["variants"][name]
        r["success"] = v["mean_success"]
        r["success_ci95"] = v["mean_ci95"]
        pair = next(p for p in report["paired"] if p["a"] == "fp" and p["b"] == name)
        r["mcnemar_p_vs_fp"] = pair.get("p_value")
    return report


def render_closed_loop(rows: list[dict], report: dict) -> str:
    """Tables 1-2 in success %: each variant's success, its difference to FP and McNemar p."""
    fp = report["variants"]["fp"]
    episodes = report["config"]["episodes_per_task"]
    lines = [
        f"closed loop, MT10 held-out starts, {episodes} episodes per task "
        f"(FP {fp['mean_success']:.1%}, 95% CI {fp['mean_ci95'][0]:.1%}-{fp['mean_ci95'][1]:.1%})",
        f"{'scheme':<8}{'layout':<14}{'variant':<10}{'success':>9}{'vs FP':>8}{'McNemar p':>11}{'cosine':>10}{'mem':>8}",
    ]
    for r in rows:
        p = r["mcnemar_p_vs_fp"]
        lines.append(
            f"{r['scheme']:<8}{r['layout']:<14}{r['variant']:<10}{r['success']:>9.1%}"
            f"{100 * (r['success'] - fp['mean_success']):>+7.1f}p{p if p is not None else float('nan'):>11.3f}"
            f"{r['cosine_mean']:>10.5f}{r['memory_ratio']:>8.1%}"
        )
    return "\n".join(lines)
