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
        cells = [_pct(variants[n]["tasks"][t]["rate"], variants[n]["tasks"][t]["ci95"]) for n in names]
        lines.append(f"{t:<26}" + "".join(f"{c:>{width + 2}}" for c in cells))
    rows = {
        "MEAN success %": [_pct(v["mean_success"], v["mean_ci95"]) for v in variants.values()],
        "episodes": [f"{v['successes']}/{v['episodes']}" for v in variants.values()],
        "mean steps": [f"{v['mean_steps']:.1f}" for v in variants.values()],
        "latency ms mean/p95": [
            f"{v['latency_ms']['mean']:.1f}/{v['latency_ms']['p95']:.1f}" for v in variants.values()
        ],
    }
    lines.append("-" * len(lines[0]))
    for label, cells in rows.items():
        lines.append(f"{label:<26}" + "".join(f"{c:>{width + 2}}" for c in cells))
    stages = _failure_lines(report, names, tasks, width)
    if stages:
        lines.append("failed episodes: object never moved / failed (reach: failed @ median closest fingers-goal)")
        lines += stages
    for p in report["paired"]:
        lines.append(
            f"McNemar {p['a']} vs {p['b']}: {p['a']} only {p['a_only']}, "
            f"{p['b']} only {p['b_only']}, both {p['both']}, neither {p['neither']}, "
            f"exact p = {p['p_value']:.4g}"
        )
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


# Up to this many variants get per-task grouped bars; more (an ablation) get one bar each for
# the mean, since a dozen bars per task cannot be told apart.
MAX_GROUPED_VARIANTS = 6


def starts_label(report: dict) -> str:
    """Which starts were run, in words: the plot title must not call validation 'held-out'."""
    from quantvla_core.sim.env import EVAL_SEEDS, VALIDATION_SEEDS

    seeds = set(report["config"].get("eval_seeds", EVAL_SEEDS))
    if seeds <= set(EVAL_SEEDS):
        return "held-out"
    if seeds <= set(VALIDATION_SEEDS):
        return "validation"
    return "seed " + ",".join(str(s) for s in sorted(seeds))


def plot(report: dict, path) -> Path:
    """Success per task (+ mean) per variant as grouped bars, or, past MAX_GROUPED_VARIANTS,
    mean success per variant as horizontal bars; Wilson 95% error bars either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["config"]["episodes_per_task"]
    title = f"Meta-World MT10 closed loop, {n} {starts_label(report)} episodes per task"
    if len(report["variants"]) > MAX_GROUPED_VARIANTS:
        fig = _mean_bars(plt, report, title)
    else:
        fig = _task_bars(plt, report, title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _error(rates, cis):
    import numpy as np

    return 100 * np.array([[max(0.0, r - lo), max(0.0, hi - r)] for r, (lo, hi) in zip(rates, cis)]).T


def _task_bars(plt, report: dict, title: str):
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
        ax.bar(
            x + (i - (len(variants) - 1) / 2) * width,
            np.array(rates) * 100,
            width,
            yerr=_error(rates, cis),
            capsize=2,
            label=name,
        )
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("success rate % (95% Wilson CI)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _mean_bars(plt, report: dict, title: str):
    import numpy as np

    variants = report["variants"]
    names = list(variants)
    rates = [variants[k]["mean_success"] for k in names]
    y = np.arange(len(names))[::-1]  # first variant on top
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * len(names)))
    ax.barh(
        y,
        np.array(rates) * 100,
        xerr=_error(rates, [variants[k]["mean_ci95"] for k in names]),
        capsize=2,
        color="tab:blue",
    )
    ax.axvline(100 * rates[0], color="tab:red", linestyle="--", linewidth=1, label=f"{names[0]} {100 * rates[0]:.1f}%")
    for yi, r in zip(y, rates):
        ax.text(1, yi, f"{100 * r:.1f}%", va="center", color="white" if r >= 0.1 else "black", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("mean success rate % over all tasks (95% Wilson CI)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def save_report(report: dict, out_dir, stem: str = "eval") -> list[Path]:
    """Write <stem>.json, <stem>.txt (the table) and <stem>.png atomically into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_text(out / f"{stem}.json", json.dumps(report, indent=1)),
        _write_text(out / f"{stem}.txt", format_table(report) + "\n"),
        plot(report, out / f"{stem}.png"),
    ]
    return paths


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
