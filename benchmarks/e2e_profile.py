"""Per-kernel profile and CUDA-graph timing of one prefix pass and one denoising step, FP vs
quantized schemes under several settings of the activation quantization (issue 7), all in one
process: one quantized model is profiled and captured once per setting (``--paths``).

    python benchmarks/e2e_profile.py --preset pi05-3b --cameras 3 --device cuda --out DIR
    python benchmarks/e2e_profile.py --preset small --cameras 1 --device cpu   # dry run
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

_root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_root))
sys.path.insert(0, str(_root / "benchmarks"))
import e2e  # noqa: E402,F401  (registers quantvla_kernels from kernels/ when not installed)

import torch  # noqa: E402

from quantvla_core.bench import BenchOptions, _observation, _Variants, add_arguments  # noqa: E402
from quantvla_core.chunk_timing import ChunkRunner  # noqa: E402
from quantvla_core.config import preset  # noqa: E402

# name -> keyword arguments of the activation-quantization ops for rotated inputs. "ieee" is
# the library's path (QuantLinear always calls the ops with their defaults: row kernel, exact
# fp32 rotation); the others measure what the ops offer besides: the tile kernel (the fallback
# when the row kernel fails to build) and the tensor-core rotation (not a QuantLinear option).
PATHS = {
    "ieee": {},
    "tile": {"rotation_kernel": "tile"},
    "tf32x3": {"rotation_precision": "tf32x3"},
    "tf32": {"rotation_precision": "tf32"},
}


@contextlib.contextmanager
def quantization_options(options: dict):
    """QuantLinear calls the quantization ops through the quantvla_kernels package: for this
    benchmark only, call them with ``options`` inside the block (a CUDA graph captured inside
    keeps them)."""
    import quantvla_kernels as qk

    saved = {name: getattr(qk, name) for name in ("quantize_per_token", "rmsnorm_quantize")}
    for name, op in saved.items():
        setattr(qk, name, functools.partial(op, **options))
    try:
        yield
    finally:
        for name, op in saved.items():
            setattr(qk, name, op)


def _kernel_table(prof, cuda: bool, top: int) -> tuple[list[dict], str]:
    rows = []
    for e in prof.key_averages():
        t = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if t and t > 0:
            rows.append({"name": e.key, "count": e.count, "us": float(t)})
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows) or 1.0
    lines = [f"{'kernel' if cuda else 'op'[:60]:60s} {'calls':>6s} {'total us':>10s} {'%':>6s}"]
    for r in rows[:top]:
        lines.append(f"{r['name'][:60]:60s} {r['count']:6d} {r['us']:10.1f} {100 * r['us'] / total:6.1f}")
    lines.append(f"{'sum of all ' + str(len(rows)) + ' names':60s} {'':6s} {total:10.1f}")
    return rows, "\n".join(lines)


def _graph_ms(fn, reps: int = 20) -> float:
    """Median CUDA-event ms of a captured CUDA graph of fn (after an eager warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    del g
    return sorted(ts)[len(ts) // 2]


@torch.inference_mode()
def profile_policy(policy, cfg, cams: int, label: str, cuda: bool, top: int, out: dict, log) -> None:
    runner = ChunkRunner(policy, _observation(cfg, cams), cfg.num_steps, "eager")
    model = policy.model
    batch, x = runner._preprocess()
    t = runner._times()[0]
    img = model.encode_images(batch)
    stages = {"prefix": lambda: model.encode_prefix(batch, img)}
    cache = stages["prefix"]()  # warm-up: kernels compile here
    stages["step"] = lambda: runner._step(cache, x, t, batch.state)
    stages["step"]()
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for stage, fn in stages.items():
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        rows, table = _kernel_table(prof, cuda, top)
        entry = {"kernels": rows[:60]}
        if cuda:
            entry["graph_ms"] = _graph_ms(fn)
        out[f"{label}|{stage}"] = entry
        gm = f", CUDA graph {entry['graph_ms']:.3f} ms" if cuda else ""
        log(f"\n== {label} {stage}{gm}\n{table}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--paths", default="ieee,tf32x3,tf32", help=f"of {','.join(PATHS)}")
    p.add_argument("--top", type=int, default=12)
    p.set_defaults(preset="pi05-3b", schemes="fp,w8a8", cameras="3", out="runs/bench")  # git-ignored; copy what you keep into benchmarks/results
    a = p.parse_args()
    opts = BenchOptions.from_args(a)
    cuda = opts.device.type == "cuda"
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [s for s in a.paths.split(",") if s]
    bad = [s for s in paths if s not in PATHS]
    if bad:
        raise SystemExit(f"unknown --paths {bad}; accepted: {', '.join(PATHS)}")
    stem = outdir / f"profile-{'-'.join(opts.presets)}-{opts.cameras[0]}cam"
    txt = open(f"{stem}.txt", "w", encoding="utf-8")

    def log(s: str) -> None:
        print(s, flush=True)
        txt.write(s + "\n")
        txt.flush()

    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "paths": {k: PATHS[k] for k in paths}, "stages": {}}
    t0 = time.perf_counter()
    for pname in opts.presets:
        base = preset(pname)
        if opts.steps:
            base.num_steps = opts.steps
        cams = opts.cameras[0]
        cfg = dataclasses.replace(base, max_cameras=cams)
        variants = _Variants(cfg, opts)
        for scheme in opts.schemes:
            policy = variants.build(scheme)
            for path in (["-"] if scheme == "fp" else paths):
                try:
                    with quantization_options(PATHS.get(path, {})):
                        profile_policy(policy, cfg, cams, f"{pname} {cams}cam {scheme} {path}", cuda, a.top,
                                       result["stages"], log)
                except Exception as e:  # noqa: BLE001 - report and go on with the next setting
                    log(f"\n== {pname} {scheme} {path}: FAILED {type(e).__name__}: {str(e)[:300]}")
                log(f"   ({time.perf_counter() - t0:.0f} s)")
            if scheme != "fp":
                del policy
                if cuda:
                    torch.cuda.empty_cache()
        if cuda:
            log(f"\nCUDA-graph ms, {pname} {cams} cam (prefix / one step):")
            for key in result["stages"]:
                if key.startswith(pname) and key.endswith("|prefix"):
                    st = key[:-len("|prefix")]
                    log(f"  {st:40s} {result['stages'][key]['graph_ms']:8.3f} "
                        f"{result['stages'].get(st + '|step', {}).get('graph_ms', float('nan')):8.3f}")
        del variants
    with open(f"{stem}.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    txt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
