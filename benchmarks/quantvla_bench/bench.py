"""End-to-end chunk latency per stage and weight memory, FP vs quantized schemes and peers.

FP vs W8A8 / W4A8 / W4A4 (and peers where installed), under the same execution for every
variant. Run from a checkout as ``python benchmarks/e2e.py``.

Why this shape: users choose a quantizer by latency per chunk and memory on their robot's
computer, so the comparison must be whole chunks (vision, prefix, every denoising step,
postprocess), batch 1, medians over interleaved repeats (a drifting clock or a busy neighbour
then hits every variant alike), and ratios taken only between variants timed the same way
(both CUDA graphs or both eager). Peers (``--peers``) put the claim against the best float path
a user could pick (torch.compile, bf16) and against PyTorch's own int8 (torch.ao dynamic int8 on
the CPU, torchao where installed), timed by the same runner. ``--census`` counts kernel launches
and bytes moved per stage instead of timing (census.py). Results: a printed table, JSON
(machine, date, versions, commit, exact command), a PNG, under ``./runs/bench`` (relative to
the current directory; ``--out`` elsewhere).

    python benchmarks/e2e.py --preset small --cameras 1,3            # CPU, fp32 vs integer path
    python benchmarks/e2e.py --preset small --cameras 1 --peers compile,bf16,ao-dynamic-int8
    python benchmarks/e2e.py --preset small --cameras 1 --census     # launches and bytes, no timing
    python benchmarks/e2e.py --preset pi05-3b --device cuda --cameras 3 --quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from quantvla_core.config import PRESETS, preset
from quantvla_core.fileio import atomic_write_bytes, atomic_write_json
from quantvla_core.memory_accounting import format_memory, memory_table
from quantvla_core.policy import resolve_device

from .chunk_timing import ChunkRunner, model_bytes, peak_memory_chunk
from .machine import device_tag, environment
from .runs import Variants as _Variants, observation as _observation
from .variants import PEER_SETS, PEERS, QUANTIZERS, SCHEMES, check_peers, check_schemes, peer_available

DEFAULT_OUT = Path("runs") / "bench"  # relative to the current directory; ./runs is git-ignored
COMPILE_MIN_WARMUP = 2  # torch.compile's first chunks compile (and recompile once on a guard): never timed
CENSUS_BACKENDS = ("auto", "triton")
TABLE_COLUMNS = (
    "preset",
    "cams",
    "steps",
    "variant",
    "exec",
    "total ms",
    "x FP",
    "preprocess",
    "vision",
    "prefix",
    "step",
    "denoise",
    "post",
    "cpu total",
    "x FP cpu",
    "peak MiB",
)


# ---- argument parsing ------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(t) for t in _csv(text)]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help=f"comma-separated presets ({', '.join(PRESETS)}); default small")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"subset of {','.join(SCHEMES)}")
    p.add_argument("--cameras", default="1,3", help="camera counts (the model is configured for each)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="FP dtype: fp32 (CPU default), bf16 (CUDA default), fp16")
    p.add_argument(
        "--exec",
        dest="exec_mode",
        default="auto",
        choices=("auto", "eager", "graph"),
        help="auto = CUDA graphs on CUDA (eager fallback per variant), eager on CPU",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed chunks per variant (default 15, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed chunks per variant (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument(
        "--quantizer",
        default="quick",
        choices=QUANTIZERS,
        help="quick: round-to-nearest, no calibration (same run-time structure); "
        "calib: the PTQ pipeline on synthetic data without ATM/OHB",
    )
    p.add_argument("--layout", default="quantvla", help="quantization layout (see quantvla layout)")
    p.add_argument(
        "--transforms",
        default="smooth,rotate",
        help="run-time transforms of the quick quantizer: smooth,rotate (the PTQ default), smooth, rotate or none",
    )
    p.add_argument(
        "--peers",
        default="none",
        help=f"comma-separated peers ({', '.join(PEERS)}), {', '.join(PEER_SETS)} or none (default); "
        "peers that cannot run on this device are skipped with a note",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; variants not started by then are skipped (partial results still written)",
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats (for CI and short device calls)")
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="only the weight-memory accounting (from shapes: any preset, any machine)",
    )
    p.add_argument(
        "--census",
        action="store_true",
        help="no timing: count kernel launches and activation / weight bytes per stage and "
        "variant (fp, bf16 and --schemes) for one chunk; runs on the CPU",
    )
    p.add_argument(
        "--census-backend",
        default="auto",
        choices=CENSUS_BACKENDS,
        help="kernels in the census: auto = the device's kernel backend (cpu on the "
        "CPU), triton = the Triton kernels for every row, as on a GPU (on the CPU needs "
        "TRITON_INTERPRET=1 set before start), one launch per kernel",
    )
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"results folder (JSON, TXT, PNG); default ./{DEFAULT_OUT.as_posix()} under the current directory",
    )
    p.add_argument("--tag", default=None, help="file name stem (default e2e-<card|cpu>-<date>-<presets>[-quick])")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--no-progress", action="store_true")


@dataclasses.dataclass
class BenchOptions:
    presets: list[str]
    schemes: list[str]
    cameras: list[int]
    steps: int | None
    device: torch.device
    dtype: str
    exec_mode: str
    repeats: int
    warmup: int
    threads: int
    quantizer: str
    layout: str
    peers: list[str]
    time_budget: float | None
    quick: bool
    memory_only: bool = False
    transforms: tuple[str, ...] = ("smooth", "rotate")
    census: bool = False
    census_backend: str = "auto"

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "BenchOptions":
        presets = _csv(a.preset)
        bad = [p for p in presets if p not in PRESETS]
        if bad or not presets:
            raise ValueError(f"unknown preset(s) {bad or presets}; accepted: {', '.join(PRESETS)}")
        schemes = check_schemes(_csv(a.schemes))
        if "fp" not in schemes:
            schemes = ["fp"] + schemes  # every ratio needs its FP row
        peers = [] if a.peers in ("none", "") else check_peers(_csv(a.peers))
        device = resolve_device(a.device)
        dtype = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
        exec_mode = a.exec_mode
        if exec_mode == "auto":
            exec_mode = "graph" if device.type == "cuda" else "eager"
        if exec_mode == "graph" and device.type != "cuda":
            raise ValueError("--exec graph needs a CUDA device; accepted on the CPU: eager, auto")
        repeats = a.repeats if a.repeats is not None else (5 if a.quick else 15)
        warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
        if repeats < 1 or warmup < 0:
            raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} / {warmup}")
        if a.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {a.threads}")
        if a.steps is not None and a.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {a.steps}")
        from quantvla_core.quant.layout import check_layout

        check_layout(a.layout)
        transforms = tuple(t for t in _csv(a.transforms) if t != "none")
        if any(t not in ("smooth", "rotate") for t in transforms):
            raise ValueError(f"--transforms must list smooth and/or rotate (or none), got {a.transforms!r}")
        if a.quantizer == "calib" and transforms != ("smooth", "rotate"):
            raise ValueError("--transforms applies to --quantizer quick; calib uses the PTQ defaults")
        census = bool(getattr(a, "census", False))
        census_backend = getattr(a, "census_backend", "auto")
        if census_backend not in CENSUS_BACKENDS:
            raise ValueError(f"--census-backend must be one of {', '.join(CENSUS_BACKENDS)}, got {census_backend!r}")
        if census_backend != "auto" and not census:
            raise ValueError("--census-backend needs --census (it picks the integer kernels the census counts)")
        if census and a.memory_only:
            raise ValueError("--census and --memory-only exclude each other; accepted: one of them")
        if census and peers:
            raise ValueError(
                "--peers applies to timing runs; --census counts fp, bf16 and --schemes "
                "(accepted with --census: --peers none)"
            )
        return cls(
            presets,
            schemes,
            _int_list(a.cameras, "--cameras"),
            a.steps,
            device,
            dtype,
            exec_mode,
            repeats,
            warmup,
            a.threads,
            a.quantizer,
            a.layout,
            peers,
            a.time_budget,
            a.quick,
            a.memory_only,
            transforms,
            census,
            census_backend,
        )


# ---- environment -------------------------------------------------------------------------------


# ---- measurement ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_peer_warnings():
    """Peers' own deprecation chatter (torch.ao quantization, inductor's jit imports) would bury
    the table; real errors still raise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=r".*(deprecated|torch\.ao\.quantization).*")
        yield


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _summarise(runs: list[dict[str, float]], num_steps: int) -> dict[str, float]:
    keys = runs[0].keys()
    med = {k: _median([r[k] for r in runs]) for k in keys}
    steps = [med[f"denoise_step_{i}"] for i in range(num_steps)]
    med["step"] = _median(steps)
    if "denoise_step_0@cpu" in med:
        med["step@cpu"] = _median([med[f"denoise_step_{i}@cpu"] for i in range(num_steps)])
    q1, q3 = np.percentile([r["total"] for r in runs], [25, 75])
    med["total_iqr"] = float(q3 - q1)
    return med


def _measure_one(
    variants: _Variants, names: list[str], cfg, cameras: int, opts: BenchOptions, t_start: float, notes: list[str], bar
) -> list[dict[str, Any]]:
    """Build, warm up (and capture) every variant, then time them interleaved."""
    obs = _observation(cfg, cameras)
    steps = opts.steps or cfg.num_steps
    runners: dict[str, ChunkRunner] = {}
    info: dict[str, dict[str, Any]] = {}
    slowest_build = 0.0  # build + warm-up (+ capture) of the slowest variant so far: the estimate
    for name in names:
        if opts.time_budget is not None:
            spent = time.perf_counter() - t_start
            if spent + slowest_build > opts.time_budget:
                notes.append(
                    f"{cfg.name} {cameras} cam: {name} skipped (time budget {opts.time_budget:.0f} s: "
                    f"{spent:.0f} s spent, the slowest variant so far took {slowest_build:.0f} s)"
                )
                continue
        t0 = time.perf_counter()
        try:
            with _quiet_peer_warnings():
                policy = variants.build(name)
        except Exception as e:  # a peer or scheme that cannot be built here is reported, not fatal
            notes.append(f"{cfg.name} {cameras} cam: {name} not built: {type(e).__name__}: {e}")
            continue
        build_s = time.perf_counter() - t0
        t_warm = time.perf_counter()
        mode = opts.exec_mode
        # torch.compile compiles in its first chunks: they are warm-up whatever --warmup says
        warmup = max(opts.warmup, COMPILE_MIN_WARMUP) if name == "compile" else opts.warmup
        runner = ChunkRunner(policy, obs, steps, mode)
        try:
            if mode == "graph":  # eager warm-up (kernels compile, tiles chosen) happens inside
                runner.capture(warmup=max(1, warmup))
                runner.run()
            else:
                with _quiet_peer_warnings():
                    for _ in range(warmup):
                        runner.run()
        except Exception as e:
            if mode != "graph":
                notes.append(f"{cfg.name} {cameras} cam: {name} failed: {type(e).__name__}: {e}")
                continue
            notes.append(
                f"{cfg.name} {cameras} cam: {name}: CUDA graph capture failed "
                f"({type(e).__name__}: {str(e)[:160]}); timed eagerly"
            )
            runner = ChunkRunner(policy, obs, steps, "eager")
            try:
                runner.run()
            except Exception as e2:
                notes.append(f"{cfg.name} {cameras} cam: {name} failed eagerly too: {type(e2).__name__}: {e2}")
                continue
        slowest_build = max(slowest_build, time.perf_counter() - t0)
        warmup_s = time.perf_counter() - t_warm
        key = f"{name}|{runner.exec_mode}"
        runners[key] = runner
        info[key] = {
            "variant": name,
            "exec": runner.exec_mode,
            "build_s": build_s,
            "warmup_s": warmup_s,
            "model_bytes": model_bytes(policy.model),
        }
        if name == "compile":
            notes.append(
                f"{cfg.name} {cameras} cam: compile: build {build_s:.1f} s, "
                f"compile + warm-up {warmup_s:.1f} s ({warmup} untimed chunks)"
            )
    # a ratio needs FP timed the same way: add FP eager when some variant fell back to eager
    if any(k.endswith("|eager") for k in runners) and "fp|eager" not in runners and "fp|graph" in runners:
        fp_pol = runners["fp|graph"].policy
        r = ChunkRunner(fp_pol, obs, steps, "eager")
        r.run()
        runners["fp|eager"] = r
        info["fp|eager"] = {"variant": "fp", "exec": "eager", "build_s": 0.0, "model_bytes": model_bytes(fp_pol.model)}
    timings: dict[str, list[dict[str, float]]] = {k: [] for k in runners}
    with _quiet_peer_warnings():
        for _ in range(opts.repeats):
            for k, r in runners.items():
                timings[k].append(r.run())
                bar.update(1)
    rows = []
    for k, r in runners.items():
        med = _summarise(timings[k], steps)
        row = {
            "preset": cfg.name,
            "cameras": cameras,
            "steps": steps,
            **info[k],
            "scheme": r.policy.scheme,
            "repeats": len(timings[k]),
            "median_ms": med,
            "runs_ms": timings[k],
            "cuda_memory_bytes": peak_memory_chunk(r),
        }
        rows.append(row)
    for k, row in zip(runners, rows):
        fp = next((x for x in rows if x["variant"] == "fp" and x["exec"] == row["exec"]), None)
        if fp is not None:
            row["speedup_vs_fp"] = {
                s: fp["median_ms"][s] / row["median_ms"][s]
                for s in (
                    "total",
                    "vision",
                    "prefix",
                    "denoise",
                    "step",
                    "total@cpu",
                    "vision@cpu",
                    "prefix@cpu",
                    "denoise@cpu",
                    "step@cpu",
                )
                if s in row["median_ms"] and row["median_ms"][s] > 0
            }
    for r in runners.values():
        r.release()
    return rows


def run_benchmark(
    opts: BenchOptions, argv: list[str] | None = None, progress: bool = True, on_partial=None
) -> dict[str, Any]:
    """Time every (preset, cameras, variant); account memory per preset. Returns the JSON dict;
    ``on_partial(result)`` gets the results so far after each (preset, cameras) group, so a run
    cut short by a device time limit still leaves files behind."""
    if opts.device.type == "cpu":
        torch.set_num_threads(opts.threads)
    env = environment(opts.device, torch.get_num_threads(), argv)
    notes: list[str] = []
    available_peers = []
    for p in opts.peers:
        ok, why = peer_available(p, opts.device, opts.dtype)
        (available_peers.append(p) if ok else notes.append(f"peer {p} skipped: {why}"))
    names = list(opts.schemes) + available_peers
    total_runs = 0 if opts.memory_only else len(opts.presets) * len(opts.cameras) * len(names) * opts.repeats
    bar = tqdm(total=total_runs, desc="bench chunks", unit="chunk", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    for p in opts.presets:
        base = preset(p)
        if opts.steps:
            base.num_steps = opts.steps
        memory[p] = memory_table(base, [s for s in opts.schemes if s != "fp"], opts.layout)
        for cams in [] if opts.memory_only else opts.cameras:
            cfg = dataclasses.replace(base, max_cameras=cams)
            variants = _Variants(cfg, opts)
            rows += _measure_one(variants, names, cfg, cams, opts, t_start, notes, bar)
            del variants
            if opts.device.type == "cuda":
                torch.cuda.empty_cache()
            if on_partial is not None:
                on_partial(_result(opts, env, rows, memory, notes, t_start))
    bar.close()
    return _result(opts, env, rows, memory, notes, t_start)


def _result(opts: BenchOptions, env: dict[str, Any], rows, memory, notes, t_start: float) -> dict[str, Any]:
    env = dict(env)
    try:
        env["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    env["wall_s"] = time.perf_counter() - t_start
    return {
        "format": "quantvla-bench-e2e",
        "version": 1,
        "environment": env,
        "options": {**{k: v for k, v in dataclasses.asdict(opts).items() if k != "device"}, "device": str(opts.device)},
        "rows": list(rows),
        "memory": memory,
        "notes": list(notes),
    }


# ---- output --------------------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """The ratio table: one row per (preset, cameras, variant); ms are medians."""
    widths = (10, 5, 6, 16, 6, 10, 8, 11, 9, 9, 8, 9, 7, 10, 9, 9)
    line = "".join(f"{c:>{w}}" if i > 3 else f"{c:<{w}}" for i, (c, w) in enumerate(zip(TABLE_COLUMNS, widths)))
    out = [line, "-" * len(line)]

    def f(v, w, fmt="{:.2f}"):
        return f"{(fmt.format(v) if isinstance(v, (int, float)) and v == v else '-'):>{w}}"

    for r in result["rows"]:
        m, sp = r["median_ms"], r.get("speedup_vs_fp", {})
        peak = (r.get("cuda_memory_bytes") or {}).get("peak")
        cells = [
            f"{r['preset']:<10}",
            f"{r['cameras']:<5}",
            f"{r['steps']:<6}",
            f"{r['variant']:<16}",
            f"{r['exec']:>6}",
            f(m["total"], 10),
            f(sp.get("total"), 8, "{:.2f}x"),
            f(m["preprocess"], 11),
            f(m["vision"], 9),
            f(m["prefix"], 9),
            f(m["step"], 8),
            f(m["denoise"], 9),
            f(m["postprocess"], 7),
            f(m.get("total@cpu"), 10),
            f(sp.get("total@cpu"), 9, "{:.2f}x"),
            f(peak / 2**20 if peak else None, 9, "{:.0f}"),
        ]
        out.append("".join(cells))
    return "\n".join(out)


def format_report(result: dict[str, Any]) -> str:
    env = result["environment"]
    where = env.get("gpu") or f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch thread(s))"
    head = [
        f"quantvla end-to-end benchmark - {env['date_utc']} - {where}",
        f"torch {env['torch']}, triton {env.get('triton')}, commit {env.get('git_commit')}"
        f"{' (+ local changes)' if env.get('git_dirty') else ''}; "
        f"load average {env.get('loadavg_start')} -> {env.get('loadavg_end')}",
        f"command: {env['command']}",
        "ms = median over interleaved repeats; x FP = FP total / variant total (same exec mode); "
        "cpu = thread CPU time (CPU runs)",
        "",
    ]
    parts = head + ([format_table(result), ""] if result["rows"] else [])
    for p, table in result["memory"].items():
        parts += [format_memory(table, f"weight memory, {p} (floats at FP16; quantized layers with scales)"), ""]
    if result["notes"]:
        parts += ["notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(parts)


def save_png(result: dict[str, Any], path: Path) -> None:
    """Stacked stage latency per variant (one panel per preset x cameras) + memory per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list] = {}
    for r in result["rows"]:
        groups.setdefault((r["preset"], r["cameras"]), []).append(r)
    n = len(groups) + len(result["memory"])
    fig, axes = plt.subplots(1, max(1, n), figsize=(4.2 * max(1, n), 4), squeeze=False)
    axes = axes[0]
    stages = (
        ("preprocess", "tab:gray"),
        ("vision", "tab:green"),
        ("prefix", "tab:blue"),
        ("denoise", "tab:orange"),
        ("postprocess", "tab:purple"),
    )
    for ax, ((p, cams), rows) in zip(axes, groups.items()):
        # on a shared CPU the thread's CPU time is the steadier clock; on CUDA, events
        cpu = all("total@cpu" in r["median_ms"] for r in rows)
        suffix = "@cpu" if cpu else ""
        labels = [f"{r['variant']}\n{r['exec']}" for r in rows]
        bottom = np.zeros(len(rows))
        for s, color in stages:
            vals = np.array([r["median_ms"][s + suffix] for r in rows])
            ax.bar(labels, vals, bottom=bottom, color=color, label=s)
            bottom += vals
        for i, r in enumerate(rows):
            sp = r.get("speedup_vs_fp", {}).get("total" + suffix)
            if sp:
                ax.text(i, bottom[i], f"{sp:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{p}, {cams} cam, {rows[0]['steps']} steps")
        ax.set_ylabel("thread CPU ms per chunk (median)" if cpu else "ms per chunk (median)")
        ax.tick_params(axis="x", labelsize=7)
    axes[0].legend(fontsize=7)
    for ax, (p, table) in zip(axes[len(groups) :], result["memory"].items()):
        schemes = list(table)
        comps = [c for c in table["fp"]["components"] if table["fp"]["components"][c]["bytes"]]
        bottom = np.zeros(len(schemes))
        for c in comps:
            vals = np.array([table[s]["components"][c]["bytes"] / 2**20 for s in schemes])
            ax.bar([("FP16" if s == "fp" else s) for s in schemes], vals, bottom=bottom, label=c)
            bottom += vals
        ax.set_title(f"{p}: weight memory")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7)
    o, env = result["options"], result["environment"]
    fig.suptitle(
        f"{env.get('gpu') or env['cpu']} - {env['date_utc'][:10]} - {o.get('quantizer', 'quick')} quantizer, "
        f"transforms {'+'.join(o.get('transforms', ['smooth', 'rotate'])) or 'none'}, layout {o.get('layout')}",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(result: dict[str, Any], out_dir: Path, tag: str | None, png: bool = True) -> dict[str, Path]:
    env = result["environment"]
    opts = result["options"]
    kind = "memory" if opts.get("memory_only") else device_tag(env)
    stem = tag or (
        f"e2e-{kind}-{env['date_utc'][:10]}-{'+'.join(opts['presets'])}"
        + ("-quick" if opts["quick"] and not opts.get("memory_only") else "")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "txt": out_dir / f"{stem}.txt"}
    atomic_write_json(paths["json"], result)
    atomic_write_bytes(paths["txt"], (format_report(result) + "\n").encode("utf-8"))
    if png and result["rows"]:
        try:
            save_png(result, out_dir / f"{stem}.png")
            paths["png"] = out_dir / f"{stem}.png"
        except ImportError as e:  # a bare device image may lack matplotlib: tables and JSON suffice
            print(f"no PNG: {e}", file=sys.stderr)
    return paths


def main_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    opts = BenchOptions.from_args(args)
    if opts.census:  # counts instead of timing: no repeats, no peers
        from .census import format_census, run_census, write_census

        result = run_census(opts, argv, progress=not args.no_progress)
        print(format_census(result))
        paths = write_census(result, Path(args.out), args.tag)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0 if result["rows"] else 1

    def partial(res: dict[str, Any]) -> None:
        write_results(res, Path(args.out), args.tag, png=False)

    result = run_benchmark(opts, argv, progress=not args.no_progress, on_partial=partial)
    print(format_report(result))
    paths = write_results(result, Path(args.out), args.tag, png=not args.no_png)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if (result["rows"] or opts.memory_only) else 1


def main(argv: list[str] | None = None, prog: str = "benchmarks/e2e.py") -> int:
    """The command line. A bad option, a missing file or a device this machine lacks ends in
    one line on stderr and exit status 2."""
    from quantvla_core.cli import OneLineParser

    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main_from_args(args, [prog] + list(argv if argv is not None else sys.argv[1:]))
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
