"""Integer GEMM benchmark: bf16 cuBLAS vs torch._int_mm vs fp8 _scaled_mm vs quantvla_kernels.

Shapes are the VLA layers of shared/docs/kernels.md (Gemma-2B backbone MLP/QKV, Gemma-300M
expert MLP) at M = 1, 16, 50, 256, 816 tokens.  On CUDA every method is timed the same way:
R copies of its operands (R chosen so they overflow L2 about three times) are called back to
back inside one CUDA graph, and the median over replays of (graph time / R) is reported, so
numbers are cold-L2, launch-overhead-free kernel times.  ``--eager`` times without graphs.

Reported per method: median microseconds, speed-up over bf16, ratio to torch._int_mm,
achieved TB/s (weights + activations + output bytes) and TOPS against the card's ceilings,
and, for our kernels, the relative error against a float reference of the same integer codes.
The expert layers are also timed with the activation-quantization kernel counted in.

On CPU (no GPU here) it runs tiny shapes with the torch integer path, so a test can run it.

    python benchmarks/kernels.py --quick --out benchmarks/results/h100-quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    import quantvla_kernels as qk
except ImportError:  # running from a checkout that is not installed: kernels/ is the package
    import importlib.util

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location(
        "quantvla_kernels", _root / "kernels" / "__init__.py", submodule_search_locations=[str(_root / "kernels")]
    )
    qk = importlib.util.module_from_spec(_spec)
    sys.modules["quantvla_kernels"] = qk
    _spec.loader.exec_module(qk)

# (name, K, N): y (M, N) = x (M, K) @ W (N, K)^T
LAYERS = [
    ("backbone_up", 2048, 16384),
    ("backbone_down", 16384, 2048),
    ("backbone_qkv", 2048, 2560),
    ("expert_up", 1024, 4096),
    ("expert_down", 4096, 1024),
]
QUICK_LAYERS = ["backbone_up", "backbone_down", "expert_up", "expert_down"]
MS = [1, 16, 50, 256, 816]
QUICK_MS = [1, 50, 816]
CPU_LAYERS = [("tiny_up", 256, 512), ("tiny_down", 512, 256)]
CPU_MS = [1, 16]

# Datasheet ceilings (dense): memory TB/s, int8/fp8 TOPS, bf16 TFLOP/s.
CEILINGS = {
    "H200": dict(tbps=4.8, int8_tops=1979.0, bf16_tflops=989.0),
    "H100": dict(tbps=3.35, int8_tops=1979.0, bf16_tflops=989.0),
    "A100": dict(tbps=2.0, int8_tops=624.0, bf16_tflops=312.0),
    "Orin": dict(tbps=0.2048, int8_tops=85.0, bf16_tflops=42.0),
}

# w4a8_g128 / w4a4_g128 / lin_w4a8_g128: integer group scales (what W4 layers deploy);
# w4a8_g128f: the same weights with a float scale per group (artifacts from before 2026-12-07)
OURS = ("w8a8", "w4a8_g128", "w4a8_g128f", "w4a8_pc", "w4a4_g128", "lin_w8a8", "lin_w4a8_g128")


def _ceilings(device_name: str) -> dict | None:
    for key, c in CEILINGS.items():
        if key.lower() in device_name.lower():
            return c
    return None


# ----------------------------------------------------------------------------- timing
class Timer:
    """Median per-call time of a list of equivalent calls (one per operand copy)."""

    def __init__(self, device: torch.device, iters: int, graphs: bool):
        self.device, self.iters, self.graphs = device, iters, graphs

    def __call__(self, calls: list) -> float:
        if self.device.type != "cuda":
            for c in calls:
                c()
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                for c in calls:
                    c()
                times.append((time.perf_counter() - t0) / len(calls) * 1e6)
            return statistics.median(times)
        for c in calls:  # compiles, autotunes (outside any capture), warms cuBLAS
            c()
        torch.cuda.synchronize()
        if self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            run = graph.replay
        else:

            def run():
                for c in calls:
                    c()

        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.iters):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(calls))
        return statistics.median(times)


# ----------------------------------------------------------------------------- operands
def _quant_weight(w: torch.Tensor, bits: int, group: int | None):
    qmax = 127 if bits == 8 else 7
    n, k = w.shape
    wf = w.float()
    if group is None:
        s = wf.abs().amax(1).clamp_min(1e-8) / qmax
        q = torch.clamp(torch.round(wf / s[:, None]), -qmax, qmax).to(torch.int8)
        deq = q.float() * s[:, None]
    else:
        g = wf.reshape(n, k // group, group)
        s = g.abs().amax(2).clamp_min(1e-8) / qmax
        q = torch.clamp(torch.round(g / s[..., None]), -qmax, qmax).to(torch.int8)
        deq = (q.float() * s[..., None]).reshape(n, k)
        q = q.reshape(n, k)
    return (qk.pack_int4(q) if bits == 4 else q), s.contiguous(), deq


def _int_group_weight(w: torch.Tensor, group: int):
    """4-bit codes with integer group scales (a channel scale x 1..18 per group), the deployed
    form (quantizers.integer_group_scales; absmax here, like _quant_weight)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    s = g.abs().amax(2).clamp_min(1e-8) / 7
    s1 = s.amax(1) / 18
    mult = torch.round(s / s1[:, None]).clamp(1, 18)
    q = torch.clamp(torch.round(g / (s1[:, None] * mult)[..., None]), -7, 7).to(torch.int8)
    deq = (q.float() * mult[..., None] * s1[:, None, None]).reshape(n, k)
    return qk.pack_int4(q.reshape(n, k)), s1.contiguous(), mult.to(torch.uint8).contiguous(), deq


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))


def bench_shape(layer, m, k, n, timer, device, copies_bytes, full, tol_fail):
    """Time every method at one shape; returns a list of row dicts."""
    g = torch.Generator(device="cpu").manual_seed(m * 7 + k + n)
    cuda = device.type == "cuda"
    fdt = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(m, k, generator=g).to(device, fdt)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, fdt)
    xq, xs = qk.quantize_per_token(x)
    xq4, xs4 = qk.quantize_per_token(x, bits=4)
    w8, ws8, wd8 = _quant_weight(w, 8, None)
    w4f, ws4f, wd4f = _quant_weight(w, 4, 128)
    w4g, ws4g, gm4g, wd4g = _int_group_weight(w, 128)
    w4c, ws4c, wd4c = _quant_weight(w, 4, None)
    x_deq = xq.float() * xs[:, None]
    x4_deq = qk.unpack_int4(xq4).float() * xs4[:, None]

    def copies(nbytes):
        return max(2, min(64, math.ceil(copies_bytes / max(nbytes, 1)))) if cuda else 1

    rows = []

    def add(method, calls, wbytes, abytes, obytes, note="", check=None):
        row = dict(
            layer=layer,
            M=m,
            K=k,
            N=n,
            method=method,
            us=None,
            bytes=wbytes + abytes + obytes,
            ops=2.0 * m * n * k,
            copies=len(calls),
            note=note,
        )
        try:  # one failing method must not lose the rest of the run
            y, ref = check() if check is not None else (None, None)
            row["us"] = timer(calls)
        except Exception as e:  # noqa: BLE001 - reported in the row and the table
            row["note"] = (note + " " if note else "") + f"failed: {type(e).__name__}: {e}"[:160]
            rows.append(row)
            return
        if y is not None:
            row["relerr"] = _rel_err(y, ref)
            if row["relerr"] > tol_fail:
                row["note"] = (note + " " if note else "") + f"WRONG (relerr {row['relerr']:.2e})"
        rows.append(row)

    def clone(t, r):
        return [t] + [t.clone() for _ in range(r - 1)]

    out_b = m * n * 2
    # bf16 (fp32 on CPU) cuBLAS
    r = copies(w.numel() * w.element_size())
    ws_, xs_ = clone(w, r), clone(x, r)
    add(
        "bf16" if cuda else "fp32",
        [lambda i=i: F.linear(xs_[i], ws_[i]) for i in range(r)],
        w.numel() * w.element_size(),
        x.numel() * x.element_size(),
        out_b,
    )
    # torch._int_mm (raw int32 result, no epilogue; CUDA needs M > 16: padded)
    mp = m if (not cuda or m > 16) else 32
    xp = torch.zeros(mp, k, dtype=torch.int8, device=device)
    xp[:m] = xq
    r = copies(w8.numel())
    w8s, xps = clone(w8, r), clone(xp, r)
    add(
        "int_mm",
        [lambda i=i: torch._int_mm(xps[i], w8s[i].t()) for i in range(r)],
        w8.numel(),
        xp.numel(),
        mp * n * 4,
        note=f"M padded to {mp}" if mp != m else "",
    )
    # fp8 e4m3 _scaled_mm, per-tensor scales, bf16 out (CUDA only; M padded to a multiple of 16)
    if cuda:
        mf = max(16, -(-m // 16) * 16)
        xf8 = torch.zeros(mf, k, device=device, dtype=torch.bfloat16)
        xf8[:m] = x
        xf8 = xf8.to(torch.float8_e4m3fn)
        wf8 = w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        r = copies(wf8.numel())
        wf8s, xf8s = clone(wf8, r), clone(xf8, r)
        add(
            "fp8",
            [lambda i=i: torch._scaled_mm(xf8s[i], wf8s[i].t(), one, one, out_dtype=torch.bfloat16) for i in range(r)],
            wf8.numel(),
            xf8.numel(),
            mf * n * 2,
            note=f"M padded to {mf}" if mf != m else "",
        )
    # ours
    odt = torch.bfloat16 if cuda else torch.float32
    r = copies(w8.numel())
    w8s = clone(w8, r)
    ref8 = x_deq @ wd8.t()
    add(
        "w8a8",
        [lambda i=i: qk.gemm_w8a8(xq, xs, w8s[i], ws8, out_dtype=odt) for i in range(r)],
        w8.numel() + ws8.numel() * 4,
        xq.numel() + m * 4,
        out_b,
        check=lambda: (qk.gemm_w8a8(xq, xs, w8, ws8, out_dtype=odt), ref8),
    )
    r = copies(w4g.numel())
    w4gs = clone(w4g, r)
    ref4g = x_deq @ wd4g.t()
    add(
        "w4a8_g128",
        [lambda i=i: qk.gemm_w4a8(xq, xs, w4gs[i], ws4g, 128, out_dtype=odt, group_mult=gm4g) for i in range(r)],
        w4g.numel() + gm4g.numel() + ws4g.numel() * 4,
        xq.numel() + m * 4,
        out_b,
        check=lambda: (qk.gemm_w4a8(xq, xs, w4g, ws4g, 128, out_dtype=odt, group_mult=gm4g), ref4g),
    )
    w4fs = clone(w4f, r)
    add(
        "w4a8_g128f",
        [lambda i=i: qk.gemm_w4a8(xq, xs, w4fs[i], ws4f, 128, out_dtype=odt) for i in range(r)],
        w4f.numel() + ws4f.numel() * 4,
        xq.numel() + m * 4,
        out_b,
        check=lambda: (qk.gemm_w4a8(xq, xs, w4f, ws4f, 128, out_dtype=odt), x_deq @ wd4f.t()),
    )
    if full:
        w4cs = clone(w4c, r)
        add(
            "w4a8_pc",
            [lambda i=i: qk.gemm_w4a8(xq, xs, w4cs[i], ws4c, None, out_dtype=odt) for i in range(r)],
            w4c.numel() + ws4c.numel() * 4,
            xq.numel() + m * 4,
            out_b,
            check=lambda: (qk.gemm_w4a8(xq, xs, w4c, ws4c, None, out_dtype=odt), x_deq @ wd4c.t()),
        )
        add(
            "w4a4_g128",
            [lambda i=i: qk.gemm_w4a4(xq4, xs4, w4gs[i], ws4g, 128, out_dtype=odt, group_mult=gm4g) for i in range(r)],
            w4g.numel() + gm4g.numel() + ws4g.numel() * 4,
            xq4.numel() + m * 4,
            out_b,
            check=lambda: (qk.gemm_w4a4(xq4, xs4, w4g, ws4g, 128, out_dtype=odt, group_mult=gm4g), x4_deq @ wd4g.t()),
        )
    if layer.startswith("expert") or layer.startswith("tiny"):
        # Float activations in: the activation quantization is counted (fused into the GEMM
        # for M <= 64 on Triton, a separate kernel above).
        r = copies(w8.numel())
        w8s = clone(w8, r)
        add(
            "lin_w8a8",
            [lambda i=i: qk.linear_w8a8(x, w8s[i], ws8, out_dtype=odt) for i in range(r)],
            w8.numel() + ws8.numel() * 4,
            x.numel() * x.element_size(),
            out_b,
            check=lambda: (qk.linear_w8a8(x, w8, ws8, out_dtype=odt), ref8),
        )
        r = copies(w4g.numel())
        w4gs = clone(w4g, r)
        add(
            "lin_w4a8_g128",
            [lambda i=i: qk.linear_w4a8(x, w4gs[i], ws4g, 128, out_dtype=odt, group_mult=gm4g) for i in range(r)],
            w4g.numel() + gm4g.numel() + ws4g.numel() * 4,
            x.numel() * x.element_size(),
            out_b,
            check=lambda: (qk.linear_w4a8(x, w4g, ws4g, 128, out_dtype=odt, group_mult=gm4g), ref4g),
        )
    return rows


def derive(rows: list[dict], ceil: dict | None) -> None:
    """Add ratios and fractions of the ceilings in place."""
    by_shape: dict = {}
    for r in rows:
        by_shape.setdefault((r["layer"], r["M"]), {})[r["method"]] = r
    for shape_rows in by_shape.values():
        base = shape_rows.get("bf16") or shape_rows.get("fp32")
        imm = shape_rows.get("int_mm")
        for r in shape_rows.values():
            if r.get("us") is None:
                continue
            r["tbps"] = r["bytes"] / (r["us"] * 1e-6) / 1e12
            r["tops"] = r["ops"] / (r["us"] * 1e-6) / 1e12
            if base and base.get("us"):
                r["speedup_vs_bf16"] = base["us"] / r["us"]
            if imm and imm.get("us"):
                r["speedup_vs_int_mm"] = imm["us"] / r["us"]
            if ceil:
                r["frac_bw_ceiling"] = r["tbps"] / ceil["tbps"]
                peak = ceil["bf16_tflops"] if r["method"] == "bf16" else ceil["int8_tops"]
                r["frac_compute_ceiling"] = r["tops"] / peak


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on whatever was measured."""
    idx = {(r["layer"], r["M"], r["method"]): r for r in rows if r.get("us")}
    out = []

    def sp(layer, m, method, ref="speedup_vs_bf16"):
        r = idx.get((layer, m, method))
        return None if r is None else r.get(ref)

    ms = sorted({r["M"] for r in rows})
    for layer in ("backbone_up", "backbone_down"):
        for m in ms:
            if m <= 64:
                out.append(dict(target=f"{layer} M={m} w8a8 >= 1.8x bf16", value=sp(layer, m, "w8a8"), need=1.8))
                out.append(dict(target=f"{layer} M={m} w4a8 >= 3x bf16", value=sp(layer, m, "w4a8_g128"), need=3.0))
        if 816 in ms:
            out.append(dict(target=f"{layer} M=816 w8a8 >= 1.5x bf16", value=sp(layer, 816, "w8a8"), need=1.5))
    for layer, m in {(r["layer"], r["M"]) for r in rows}:
        if (layer, m, "int_mm") in idx and (layer, m, "w8a8") in idx:
            out.append(
                dict(
                    target=f"{layer} M={m} w8a8 not slower than int_mm",
                    value=sp(layer, m, "w8a8", "speedup_vs_int_mm"),
                    need=1.0,
                )
            )
    for layer, m in sorted({(r["layer"], r["M"]) for r in rows}):
        a, b = idx.get((layer, m, "w8a8")), idx.get((layer, m, "w4a8_g128"))
        if a is not None and b is not None:  # issue 16 item 3: W4A8 never slower than W8A8
            out.append(dict(target=f"{layer} M={m} w4a8 not slower than w8a8", value=a["us"] / b["us"], need=1.0))
    for layer in ("expert_up", "expert_down"):
        if 50 in ms:
            out.append(
                dict(
                    target=f"{layer} M=50 w8a8 incl. act-quant >= 1.3x bf16", value=sp(layer, 50, "lin_w8a8"), need=1.3
                )
            )
    for t in out:
        t["met"] = None if t["value"] is None else bool(t["value"] >= t["need"])
    out.sort(key=lambda t: t["target"])
    return out


def format_table(rows: list[dict], methods: list[str]) -> str:
    shapes = []
    for r in rows:
        if (r["layer"], r["M"]) not in shapes:
            shapes.append((r["layer"], r["M"]))
    idx = {(r["layer"], r["M"], r["method"]): r for r in rows}
    head = f"{'layer':<14}{'M':>5} {'KxN':>12} " + "".join(f"{m:>17}" for m in methods)
    lines = [head, "-" * len(head)]
    for layer, m in shapes:
        any_r = next(r for r in rows if r["layer"] == layer and r["M"] == m)
        cells = []
        for meth in methods:
            r = idx.get((layer, m, meth))
            if r is None or r.get("us") is None:
                cells.append(f"{'FAILED' if r is not None and 'failed' in r.get('note', '') else '-':>17}")
            else:
                sp = r.get("speedup_vs_bf16")
                wrong = "!" if "WRONG" in r.get("note", "") else ""
                cells.append(f"{r['us']:>9.1f}us" + (f" {sp:4.2f}x" if sp else " " * 6) + wrong)
        lines.append(f"{layer:<14}{m:>5} {str(any_r['K']) + 'x' + str(any_r['N']):>12} " + "".join(cells))
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    """Through quantvla_core.fileio: fsynced, and no temp file is left behind on failure."""
    try:
        from quantvla_core.fileio import atomic_write_bytes
    except ImportError:  # run as a script from a checkout that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from quantvla_core.fileio import atomic_write_bytes
    atomic_write_bytes(path, text.encode("utf-8"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.json and table.txt (default: ./runs/bench/kernels-<device>-<date>)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer shapes and methods (GPU: well under a minute)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--iters", type=int, default=None, help="timed replays per method (default 20 GPU, 5 CPU)")
    ap.add_argument("--eager", action="store_true", help="time without CUDA graphs (launch overhead included)")
    ap.add_argument("--autotune", action="store_true", help="tune our tile configs per M bucket first")
    ap.add_argument("--time-budget", type=float, default=150.0, help="seconds; later shapes are skipped")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.autotune:
        qk.set_autotune(True)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        dev_name = props.name
        l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
        copies_bytes = 3 * l2
        layers = [l for l in LAYERS if not args.quick or l[0] in QUICK_LAYERS]
        ms = QUICK_MS if args.quick else MS
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        copies_bytes = 0
        layers, ms = CPU_LAYERS, CPU_MS
    iters = args.iters or (20 if cuda else 5)
    timer = Timer(device, iters, graphs=cuda and not args.eager)
    import triton

    meta = dict(
        device=dev_name,
        device_type=device.type,
        torch=torch.__version__,
        triton=triton.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        timing=("cuda-graph" if timer.graphs else "eager cuda events") if cuda else "cpu perf_counter",
        iters=iters,
        quick=args.quick,
        autotune=args.autotune,
        ceilings=_ceilings(dev_name) if cuda else None,
    )
    rows: list[dict] = []
    skipped = []
    t0 = time.time()
    # Expert layers first: if the time budget runs out, the backbone's large-M rows go first.
    layers = sorted(layers, key=lambda l: not l[0].startswith("expert"))
    shapes = [(name, k, n, m) for name, k, n in layers for m in ms]
    for name, k, n, m in tqdm(shapes, desc="kernels bench", disable=not sys.stderr.isatty()):
        if time.time() - t0 > args.time_budget:
            skipped.append(f"{name} M={m}")
            continue
        rows += bench_shape(name, m, k, n, timer, device, copies_bytes, full=not args.quick, tol_fail=2e-2)
    derive(rows, meta["ceilings"])
    targets = check_targets(rows) if cuda else []
    result = dict(
        meta=meta,
        rows=rows,
        targets=targets,
        skipped=skipped,
        seconds=time.time() - t0,
        tuned_configs=qk.ops.tuned_configs(),
    )

    methods = ["bf16" if cuda else "fp32", "int_mm"] + (["fp8"] if cuda else [])
    methods += [m for m in OURS if any(r["method"] == m for r in rows)]
    table = format_table(rows, methods)
    out_dir = args.out
    if out_dir is None:
        slug = "".join(c if c.isalnum() else "-" for c in dev_name.split(" (")[0]).strip("-").lower()
        out_dir = Path("runs") / "bench" / f"kernels-{slug}-{meta['date'][:10]}"  # git-ignored
    _atomic_write(out_dir / "results.json", json.dumps(result, indent=1))
    header = (
        f"device: {dev_name} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{meta['timing']}, median of {iters} | {meta['date']}\n"
        f"command: {meta['command']}\n"
        "cells: median us per call and speed-up over bf16 (fp32 on CPU); '!' = failed the accuracy check;\n"
        "lin_* take float activations (per-token quantization counted in, fused for M <= 64)\n"
    )
    _atomic_write(out_dir / "table.txt", header + table + "\n")

    print(f"results: {out_dir}/results.json ({len(rows)} rows, {result['seconds']:.0f} s)")
    if skipped:
        print(f"skipped (time budget {args.time_budget:.0f} s): {', '.join(skipped)}")
    wrong = [f"{r['layer']} M={r['M']} {r['method']}" for r in rows if "WRONG" in r.get("note", "")]
    if wrong:
        print("ACCURACY FAILURES: " + "; ".join(wrong))
    for c in result["tuned_configs"]:
        print("tuned", json.dumps(c, separators=(",", ":")))
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"target {'MET ' if t['met'] else 'MISS' if t['met'] is False else '----'} {t['target']}: {v}")
    print(header + table)
    return result


if __name__ == "__main__":
    main()
