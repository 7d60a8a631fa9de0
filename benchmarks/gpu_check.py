"""GPU results against the CPU reference, before any GPU timing is trusted.

For the layer shapes of pi0.5 / GR00T (and tiny ones on the CPU under the Triton interpreter,
so this script itself is tested without a GPU), every scheme's Triton path (activation
quantization + integer GEMM, through QuantLinear, including q/k/v fused into one layer) is
compared with the exact CPU path on the same inputs:
  * activation codes and scales: equal, except where the block rotation's dot sums in another
    order (then within one code step on < 0.5% of values and 1e-6 relative on scales);
  * layer outputs: within 2% of the output range (a code moved by one step) and mostly equal;
  * sibling fusion: the fused q/k/v layer equals the three separate layers bit for bit;
  * GEMM epilogue: a gate/up pair layer's gelu(gate) * up + residual within 2% of the output
    range of the separate layers and torch's ops;
  * adaptive norm (pi0.5's adaRMS) inside the quantization: rmsnorm_quantize(norm_shift=) codes
    and scales as the CPU path's (the row's sum of squares runs in another order: scales to
    1e-5, codes within one step); the float adaptive RMSNorm kernel against the torch ops.
Prints a table; exits 1 on any mismatch.

    python benchmarks/gpu_check.py                 # CUDA (the GPU script runs this first)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu   # small shapes, interpreter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_root))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from quantvla_core.quant.qlinear import QuantLinear, concat_quant_linears  # noqa: E402
from quantvla_core.quant.transforms import InputTransform, hadamard  # noqa: E402

GPU_SHAPES = [  # (what, M, K, N)
    ("pi05 backbone qkv, prefix", 816, 2048, 2560),
    ("pi05 backbone down, prefix", 816, 16384, 2048),
    ("pi05 expert up, step", 50, 1024, 4096),
    ("pi05 expert down, step", 50, 4096, 1024),
    ("groot dit ff, step", 49, 1536, 6144),
    ("single token", 1, 2048, 2048),
]
CPU_SHAPES = [("tiny prefix", 33, 256, 192), ("tiny step", 17, 128, 256), ("single token", 1, 128, 64)]
# w4a8 / w4a4: integer group scales (the deployed form); w4a8f: a float scale per group
SCHEMES = {"w8a8": (8, 8, None), "w4a8": (4, 8, 128), "w4a8f": (4, 8, 128), "w4a4": (4, 4, 128)}


def _layer(k: int, n: int, w_bits: int, a_bits: int, group, seed: int, device, int_groups=True) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    t = InputTransform(
        inv_smooth=torch.rand(k, generator=g) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard"
    )
    return QuantLinear.from_linear(
        lin,
        w_bits=w_bits,
        a_bits=a_bits,
        group_size=group,
        transform=t,
        clip_grid=(1.0,),
        int_group_scales=bool(group and int_groups),
    ).to(device)


def _close_outputs(y: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float, float]:
    y, ref = y.float().cpu(), ref.float().cpu()
    err = float((y - ref).abs().max())
    span = float(ref.abs().max()) or 1.0
    equal = float((y == ref).float().mean())
    return err <= 0.02 * span, err / span, equal


def check(device: torch.device, dtype: torch.dtype) -> bool:
    import quantvla_kernels as qk

    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    ok_all = True
    print(
        f"{'shape':28s} {'scheme':6s} {'codes eq':>9s} {'max|dy|/span':>13s} {'y equal':>8s} {'fused':>6s} "
        f"{'epilog':>6s} {'adanorm':>7s}  result"
    )
    for i, (what, m, k, n) in enumerate(shapes):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(m, k, generator=g) * 2
        x[0, 7] = 60.0  # an outlier channel
        for name, (w_bits, a_bits, group) in SCHEMES.items():
            ig = not name.endswith("f")
            if not ig and i >= 2:
                continue  # the float-group-scale form (older artifacts): two shapes keep the compile time down
            layer = _layer(k, n, w_bits, a_bits, group, 10 * i + w_bits + a_bits, device, ig)
            xd = x.to(device=device, dtype=dtype)
            layer.backend = "triton"
            y = layer(xd)
            layer_cpu = _layer(k, n, w_bits, a_bits, group, 10 * i + w_bits + a_bits, "cpu", ig)
            layer_cpu.backend = "cpu"
            ref = layer_cpu(x.to(dtype).float()).to(dtype)
            # the codes themselves, Triton vs CPU
            q1, s1 = qk.quantize_per_token(xd, a_bits, layer.inv_smooth, layer.rotation, backend="triton")
            q2, s2 = qk.quantize_per_token(
                x.to(dtype).float(), a_bits, layer_cpu.inv_smooth, layer_cpu.rotation, backend="cpu"
            )
            c1 = qk.unpack_int4(q1.cpu()) if a_bits == 4 else q1.cpu()
            c2 = qk.unpack_int4(q2) if a_bits == 4 else q2
            codes_eq = float((c1 == c2).float().mean())
            codes_ok = (
                (c1.int() - c2.int()).abs().max() <= 1
                and codes_eq > 0.995
                and torch.allclose(s1.cpu(), s2, rtol=1e-6, atol=0)
            )
            out_ok, rel, equal = _close_outputs(y, ref)
            # sibling fusion on this backend: bit for bit
            sib = [_layer(k, n // 2 or 1, w_bits, a_bits, group, 7 + j, device, ig) for j in range(2)]
            for s in sib:
                s.inv_smooth = layer.inv_smooth.clone()
                s.backend = "triton"
            fused = concat_quant_linears(sib)
            fused_ok = fused is not None and torch.equal(fused(xd), torch.cat([s(xd) for s in sib], -1))
            # the GEMM epilogue: gate/up pairs -> gelu(gate) * up, then + residual, against the
            # separate layers and torch's ops (float rounding only)
            pair = concat_quant_linears(sib, pairs=True)
            res = torch.randn(m, sib[0].out_features, generator=g).to(device=device, dtype=dtype)
            want = torch.nn.functional.gelu(sib[0](xd).float(), approximate="tanh") * sib[1](xd).float() + res.float()
            epi_ok = pair is not None and _close_outputs(pair(xd, act="gelu_tanh", residual=res), want)[0]
            # pi0.5's gated residual in the epilogue: residual + gate * y
            rgate = (torch.rand(sib[0].out_features, generator=g) - 0.5).to(device=device, dtype=dtype)
            want_g = res.float() + sib[0](xd).float() * rgate.float()
            epi_ok = epi_ok and _close_outputs(sib[0](xd, residual=res, residual_gate=rgate), want_g)[0]
            # the adaptive norm's shift inside the quantization (row kernel), Triton vs CPU
            nw = torch.rand(k, generator=g) + 0.5
            shift = torch.randn(k, generator=g) * 0.3
            kw = dict(bits=a_bits, inv_smooth=layer_cpu.inv_smooth, rotation=layer_cpu.rotation, norm_shift=shift)
            qa, sa = qk.rmsnorm_quantize(x.to(dtype).float(), nw, 1e-6, backend="cpu", **kw)
            kw_dev = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in kw.items()}
            qb, sb = qk.rmsnorm_quantize(xd, nw.to(device), 1e-6, backend="triton", **kw_dev)
            ca = qk.unpack_int4(qa) if a_bits == 4 else qa
            cb = qk.unpack_int4(qb.cpu()) if a_bits == 4 else qb.cpu()
            ada_ok = bool(
                (ca.int() - cb.int()).abs().max() <= 1
                and float((ca == cb).float().mean()) > 0.995
                and torch.allclose(sb.cpu(), sa, rtol=1e-5, atol=0)
            )
            ok = bool(codes_ok and out_ok and fused_ok and epi_ok and ada_ok)
            ok_all &= ok
            print(
                f"{what:28s} {name:6s} {codes_eq:9.4f} {rel:13.2e} {equal:8.3f} {str(fused_ok):>6s} "
                f"{str(epi_ok):>6s} {str(ada_ok):>7s}  {'ok' if ok else 'MISMATCH'}",
                flush=True,
            )
    # pi0.5's float adaptive RMSNorm kernel (every variant runs it on the GPU) against the torch ops
    g = torch.Generator().manual_seed(99)
    shape = (1, 50, 1024) if device.type == "cuda" else (1, 17, 256)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(1, 1, shape[-1], generator=g) + 0.5
    b = torch.randn(1, 1, shape[-1], generator=g)
    with torch.no_grad():
        got = qk.adaptive_rmsnorm(x.to(device=device, dtype=dtype), w.to(device), b.to(device), 1e-6, backend="triton")
        want = qk.adaptive_rmsnorm(x.to(dtype), w, b, 1e-6, backend="cpu")
    norm_ok, rel, equal = _close_outputs(got, want)
    norm_ok = norm_ok and rel < 1e-2  # one bf16 step at most
    ok_all &= norm_ok
    print(
        f"{'adaptive rmsnorm ' + str(shape):28s} {'float':6s} {'':>9s} {rel:13.2e} {equal:8.3f} {'':>6s} {'':>6s} {'':>7s}  {'ok' if norm_ok else 'MISMATCH'}"
    )
    return ok_all


def check_cuda_graphs(device: torch.device) -> bool:
    """Policy(cuda_graphs=True) (quantvla_core.cuda_graphs) against the eager chunk: `small-pi05`
    at bf16, float and W4A8: observations of one shape (a capture, then replays with new inputs
    copied into the static buffers) and of another (a second set of graphs), each twice."""
    import numpy as np

    sys.path.insert(0, str(_root / "benchmarks"))
    from quantvla_bench.variants import quick_quantize
    from quantvla_core.config import preset
    from quantvla_core.models import build_model
    from quantvla_core.policy import Observation, Policy

    cfg = preset("small-pi05")
    rng = np.random.default_rng(0)
    obs = [
        Observation(
            images=[rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)],
            instruction=text,
            state=rng.normal(size=cfg.state_dim).astype(np.float32),
        )
        # same prompt (one set of graphs, replayed with new images and state), then another
        for text in ("pick up the red block", "pick up the red block", "open the drawer")
    ]
    ok_all = True
    for scheme in ("fp", "w4a8"):
        model = build_model(cfg, seed=0).eval()
        if scheme != "fp":
            quick_quantize(model, cfg.arch, scheme)
        policy = Policy(model, cfg, name="check", device=device, dtype="bf16", scheme=scheme)
        eager = [policy.predict(o, seed=3).actions for o in obs]
        policy.use_cuda_graphs(True)
        graphed = [policy.predict(o, seed=3).actions for o in obs + obs]
        span = max(float(np.abs(e).max()) for e in eager) or 1.0
        err = max(float(np.abs(g - e).max()) for g, e in zip(graphed, eager + eager))
        ok = err <= 1e-3 * span
        ok_all &= ok
        print(
            f"{'cuda graphs, small-pi05':28s} {scheme:6s} max|d actions|/span {err / span:9.2e}  {'ok' if ok else 'MISMATCH'}"
        )
    return ok_all


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-graphs", action="store_true", help="kernels only (skip the CUDA-graph policy check)")
    which.add_argument("--graphs-only", action="store_true", help="only the CUDA-graph policy check (CUDA)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        from quantvla_kernels.dispatch import triton_interpreting

        if not triton_interpreting():
            print("gpu_check on the CPU needs TRITON_INTERPRET=1 (the Triton interpreter)", file=sys.stderr)
            return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[a.dtype] or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    ok = True if a.graphs_only else check(device, dtype)
    if device.type == "cuda" and not a.no_graphs:
        ok = check_cuda_graphs(device) and ok
    print("GPU CHECK PASSED" if ok else "GPU CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
