"""Issue-3 targets: quantized-component memory and action fidelity of `small` at W8A8 / W4A8.

Prints one table (PASS/MISS per target) and writes JSON. On CUDA it also checks that the
Triton backend of the quantized policy agrees with the float64 reference backend, and times a
chunk (eager, same execution for FP and quantized).

    python benchmarks/quant_targets.py [--device cpu|cuda] [--samples 32] [--out targets.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantvla_core import Observation, Policy  # noqa: E402
from quantvla_core.fileio import atomic_write_json  # noqa: E402
from quantvla_core.quant.qlinear import quant_backend  # noqa: E402
from quantvla_core.quant.quantize import QuantConfig, quantize  # noqa: E402
from quantvla_core.quant.report import check_targets  # noqa: E402


def _chunk_ms(policy, obs, reps=5) -> float:
    policy.predict(obs, seed=0)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        policy.predict(obs, seed=0)
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--schemes", default="w8a8,w4a8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    teacher = Policy.load(args.model, device=args.device, dtype="fp32")
    rng = np.random.default_rng(0)
    obs = Observation(
        images=[rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)],
        instruction="open the drawer",
        state=np.zeros(teacher.state_dim, np.float32),
    )
    rows, checks = [], []
    for scheme in args.schemes.split(","):
        for atm_ohb in (False, True):
            qc = QuantConfig(scheme=scheme, calib_samples=args.samples, atm=atm_ohb, ohb=atm_ohb)
            r = quantize(teacher, qc, "synthetic", progress=True)
            rep = r.report
            row = {
                "scheme": scheme,
                "atm_ohb": atm_ohb,
                **rep["fidelity"],
                "component_ratio": rep["memory"]["quantized_components_ratio"],
                "model_ratio": rep["memory"]["model_ratio"],
                "quantize_s": rep["timings_s"]["total"],
                "alpha_changed": rep["alpha_summary"].get("changed", 0),
                "beta_changed": rep["beta_summary"].get("changed", 0),
            }
            if args.device.startswith("cuda"):
                a_ref = None
                with quant_backend("reference"):
                    a_ref = r.policy.predict(obs, seed=1).actions
                with quant_backend("triton"):
                    a_tri = r.policy.predict(obs, seed=1).actions
                row["triton_vs_reference_max_abs"] = float(np.abs(a_tri - a_ref).max())
                row["chunk_ms_quantized_triton"] = _chunk_ms(r.policy, obs)
                row["chunk_ms_fp32"] = _chunk_ms(teacher, obs)
            rows.append(row)
            if atm_ohb:
                checks += [{**c, "scheme": scheme} for c in check_targets(rep)]
    print(f"\n{args.model} on {args.device}: {args.samples} calibration observations, held-out fidelity")
    print(f"{'scheme':<8}{'ATM+OHB':<9}{'cos mean':>10}{'cos min':>10}{'relL2':>9}{'comp mem':>10}{'model mem':>10}")
    for r in rows:
        print(
            f"{r['scheme']:<8}{str(r['atm_ohb']):<9}{r['cosine_mean']:>10.5f}{r['cosine_min']:>10.5f}"
            f"{r['rel_l2_mean']:>9.4f}{r['component_ratio']:>10.1%}{r['model_ratio']:>10.1%}"
            + (
                f"  triton-ref {r['triton_vs_reference_max_abs']:.2e}  chunk {r['chunk_ms_quantized_triton']:.1f} ms"
                f" (fp32 {r['chunk_ms_fp32']:.1f} ms)"
                if "chunk_ms_fp32" in r
                else ""
            )
        )
    print("\ntargets (issue 3):")
    for c in checks:
        print(
            f"  [{'PASS' if c['ok'] else 'MISS'}] {c['scheme']} {c['what']}: {c['value']:.4f} ({c['op']} {c['target']})"
        )
    if args.out:
        atomic_write_json(args.out, {"model": args.model, "device": args.device, "rows": rows, "targets": checks})
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
