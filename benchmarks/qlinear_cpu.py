"""One quantized linear on the CPU: W8A8 vs W4A8 with integer and with float group scales.

Why: issue 16 asks that W4A8 never be slower than W8A8 at any token count. This times the
layer a model runs (QuantLinear: smoothing, Hadamard rotation, per-token codes, integer GEMM,
epilogue; the compiled CPU linear where it builds) at action-step and prefix token counts, all
variants interleaved in one process on the same input, medians. Usage:

    python benchmarks/qlinear_cpu.py --threads 2 --out benchmarks/results/qlinear-cpu-DATE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402, F401 - puts the checkout's quantvla_core and kernels/ first on the import path

import torch  # noqa: E402
from torch import nn  # noqa: E402

from quantvla_core.quant.qlinear import QuantLinear  # noqa: E402
from quantvla_core.quant.transforms import InputTransform, hadamard  # noqa: E402

# (K, N) of `small`'s backbone q/k/v, gate/up and down projections
SHAPES = [(384, 1152), (384, 3072), (1536, 384)]
TOKENS = [1, 17, 96, 230]


def _variants(k: int, n: int) -> dict[str, QuantLinear]:
    lin = nn.Linear(k, n)
    t = InputTransform(inv_smooth=torch.rand(k) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard")
    kw = dict(transform=t, clip_grid=(1.0,))
    return {
        "w8a8": QuantLinear.from_linear(lin, w_bits=8, a_bits=8, **kw),
        "w4a8 int groups": QuantLinear.from_linear(
            lin, w_bits=4, a_bits=8, group_size=128, int_group_scales=True, **kw
        ),
        "w4a8 float groups": QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=128, **kw),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per variant and shape (interleaved)")
    ap.add_argument("--out", default="runs/bench/qlinear-cpu", help="path prefix of the .json / .txt written")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        layers = _variants(k, n)
        for m in TOKENS:
            x = torch.randn(m, k)
            times: dict[str, list[float]] = {v: [] for v in layers}
            with torch.inference_mode():
                for layer in layers.values():
                    for _ in range(20):
                        layer(x)
                for _ in range(a.repeats):
                    for v, layer in layers.items():
                        t0 = time.perf_counter()
                        layer(x)
                        times[v].append(time.perf_counter() - t0)
            us = {v: statistics.median(t) * 1e6 for v, t in times.items()}
            rows.append(dict(M=m, K=k, N=n, us=us))
            print(
                f"M={m:4d} K={k:5d} N={n:5d}  "
                + "  ".join(f"{v} {t:7.1f} us" for v, t in us.items())
                + f"  int / w8a8 {us['w4a8 int groups'] / us['w8a8']:.3f}"
                + f"  float / w8a8 {us['w4a8 float groups'] / us['w8a8']:.3f}",
                flush=True,
            )
    head = (
        f"QuantLinear on the CPU, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{a.threads} thread(s), torch {torch.__version__}, median of {a.repeats} interleaved calls"
    )
    lines = [
        head,
        f"{'M':>5} {'K':>6} {'N':>6} {'w8a8 us':>9} {'w4a8 int':>9} {'w4a8 float':>11} {'int/w8':>7} {'float/w8':>9}",
    ]
    for r in rows:
        u = r["us"]
        lines.append(
            f"{r['M']:5d} {r['K']:6d} {r['N']:6d} {u['w8a8']:9.1f} {u['w4a8 int groups']:9.1f} "
            f"{u['w4a8 float groups']:11.1f} {u['w4a8 int groups'] / u['w8a8']:7.3f} "
            f"{u['w4a8 float groups'] / u['w8a8']:9.3f}"
        )
    print("\n".join(lines))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in (
        (".txt", "\n".join(lines) + "\n"),
        (".json", json.dumps(dict(header=head, rows=rows), indent=1)),
    ):
        tmp = out.with_name(out.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_name(out.name + suffix))
    print(f"wrote {out}.txt, {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
