"""Printed table, JSON and bar chart of an MT10 evaluation report (see evaluate.summarize)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from quantvla_core.fileio import atomic_write_bytes


def _pct(rate: float, ci) -> str:
    return f"{100 * rate:5.1f} [{100 * ci[0]:4.1f}-{100 * ci[1]:5.1f}]"


def format_table(report: dict) -> str:
    """Success per task and variant with Wilson 95% intervals, then lengths, latency, tests."""
    variants = report["variants"]
    names = list(variants)
    tasks = list(report["config"]["tasks"])
    width = max(20, *(len(n) for n in names))
    lines = [f"{'task':<26}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for t in tasks:
        cells = [_pct(variants[n]["tasks"][t]["rate"], variants[n]["tasks"][t]["ci95"])
                 for n in names]
        lines.append(f"{t:<26}" + "".join(f"{c:>{width + 2}}" for c in cells))
    rows = {
        "MEAN success %": [_pct(v["mean_success"], v["mean_ci95"]) for v in variants.values()],
        "episodes": [f"{v['successes']}/{v['episodes']}" for v in variants.values()],
        "mean steps": [f"{v['mean_steps']:.1f}" for v in variants.values()],
        "latency ms mean/p95": [f"{v['latency_ms']['mean']:.1f}/{v['latency_ms']['p95']:.1f}"
                                for v in variants.values()],
    }
    lines.append("-" * len(lines[0]))
    for label, cells in rows.items():
        lines.append(f"{label:<26}" + "".join(f"{c:>{width + 2}}" for c in cells))
    stages = _failure_lines(report, names, tasks, width)
    if stages:
        lines.append("failed episodes: object never moved / failed (reach: failed @ median closest fingers-goal)")
        lines += stages
    for p in report["paired"]:
        lines.append(f"McNemar {p['a']} vs {p['b']}: {p['a']} only {p['a_only']}, "
                     f"{p['b']} only {p['b_only']}, both {p['both']}, neither {p['neither']}, "
                     f"exact p = {p['p_value']:.4g}")
    return "\n".join(lines)


def _failure_lines(report: dict, names: list, tasks: list, width: int) -> list[str]:
    """Per task with failures: where they stopped (reports from before traces: nothing)."""
    lines = []
    for t in tasks:
        cells = []
        for n in names:
            f = report["variants"][n]["tasks"][t].get("failures", {})
            if not f.get("count"):
                cells.append("-")
            elif "object_not_moved" in f:
                cells.append(f"{f['object_not_moved']}/{f['count']}")
            elif "median_min_hand_target_m" in f:
                cells.append(f"{f['count']} @ {100 * f['median_min_hand_target_m']:.1f} cm")
            else:
                cells.append(f"{f['count']} failed")
        if any(c != "-" for c in cells):
            lines.append(f"  {t:<24}" + "".join(f"{c:>{width + 2}}" for c in cells))
    return lines


def plot(report: dict, path) -> Path:
    """Grouped bars: success per task (+ mean) per variant, Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = report["variants"]
    tasks = list(report["config"]["tasks"])
    labels = [t.removesuffix("-v3") for t in tasks] + ["MEAN"]
    x = np.arange(len(labels))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.5))
    for i, (name, v) in enumerate(variants.items()):
        rates = [v["tasks"][t]["rate"] for t in tasks] + [v["mean_success"]]
        cis = [v["tasks"][t]["ci95"] for t in tasks] + [v["mean_ci95"]]
        err = np.array([[max(0.0, r - lo), max(0.0, hi - r)] for r, (lo, hi) in zip(rates, cis)]).T
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, np.array(rates) * 100, width,
               yerr=err * 100, capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("success rate % (95% Wilson CI)")
    ax.set_ylim(0, 105)
    n = report["config"]["episodes_per_task"]
    ax.set_title(f"Meta-World MT10 closed loop, {n} held-out episodes per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_report(report: dict, out_dir, stem: str = "eval") -> list[Path]:
    """Write <stem>.json, <stem>.txt (the table) and <stem>.png atomically into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write_text(out / f"{stem}.json", json.dumps(report, indent=1)),
             _write_text(out / f"{stem}.txt", format_table(report) + "\n"),
             plot(report, out / f"{stem}.png")]
    return paths


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
