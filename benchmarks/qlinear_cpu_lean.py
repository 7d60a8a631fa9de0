"""Experiment: how much of the CPU integer path is per-call overhead? A lean CPU forward for
QuantLinear, installed over the real one for this process only, checked bit-identical to it
on every scheme, then the end-to-end benchmark run with it.

Why this exists: on `small` the shipped CPU path (quant/qlinear.py -> quantvla_kernels.ops)
reaches W8A8 1.17-1.21x over fp32 end to end; the issue's target is 1.3x. Profiling shows
the integer GEMMs are 4x faster than fp32 ones, but each QuantLinear call spends ~90 us
(M = 17) in validation, three torch.where, full_like/ones_like, a pack/unpack round trip for
W4A4, a per-call int4 unpack and per-group weight copies for W4. This file measures the gain
of removing that, so the owners of quant/ and kernels/ can decide; it changes nothing on disk.

    python benchmarks/qlinear_cpu_lean.py --check           # bit-identity on 4 shapes x 3 schemes
    python benchmarks/qlinear_cpu_lean.py --preset small --cameras 1,3 --out /tmp/lean
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quantvla_kernels as K  # noqa: E402
from quantvla_core.quant import qlinear as QL  # noqa: E402

SHIPPED_FORWARD = QL.QuantLinear.forward


def _cpu_weights(self):
    """int8 weights, unpacked once (W4) and split into contiguous K-groups; cached per module."""
    key = (self.qweight.data_ptr(), self.qweight._version)
    cache = getattr(self, "_lean_cpu_cache", None)
    if cache is None or cache[0] != key:
        w = K.unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight
        gs = self.group_size
        groups = None if gs is None else [w[:, i:i + gs].contiguous() for i in range(0, self.in_features, gs)]
        cache = (key, w, groups)
        self._lean_cpu_cache = cache
    return cache[1], cache[2]


def lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Same numbers as the shipped path (codes round(v * qmax/absmax), all-zero row -> scale 1,
    epilogue acc * xs * ws (+ bias), groups summed in order), fewer torch calls."""
    if (x.device.type != "cpu" or self.a_bits is None or self.act_scale is not None
            or (self.backend or QL.get_default_backend()) == "reference"):
        return SHIPPED_FORWARD(self, x)
    k = self.in_features
    lead = x.shape[:-1]
    v = x.reshape(-1, k).float()
    if self.inv_smooth is not None:
        v = v * self.inv_smooth
    if self.perm is not None:
        v = v[:, self.perm.long()]
    if self.rotation is not None:
        r = self.rotation
        b = r.shape[-1]
        v = ((v.reshape(-1, k // b, b) @ r) if r.dim() == 2
             else torch.einsum("mgb,gbc->mgc", v.reshape(-1, k // b, b), r)).reshape(-1, k)
    qm = 127.0 if self.a_bits == 8 else 7.0
    amax = v.abs().amax(1, keepdim=True)
    pos = amax > 0
    xs = torch.where(pos, amax / qm, 1.0)
    q = (v * torch.where(pos, qm / amax, 0.0)).round_().clamp_(-qm, qm).to(torch.int8)
    w, groups = _cpu_weights(self)
    if groups is None:
        y = torch._int_mm(q, w.t()).float().mul_(xs).mul_(self.wscale)
    else:
        gs = self.group_size
        y = None
        for i, wg in enumerate(groups):
            acc = torch._int_mm(q[:, i * gs:(i + 1) * gs], wg.t()).float().mul_(self.wscale[:, i])
            y = acc if y is None else y.add_(acc)
        y = y.mul_(xs)
    if self.bias is not None:
        y = y.add_(self.bias)
    return y.to(x.dtype).reshape(*lead, self.out_features)


def check(shapes=((17, 256, 1024), (17, 1024, 256), (81, 384, 1536), (81, 1536, 384))) -> bool:
    """Bit-identity against the shipped forward, plus per-call thread CPU time of both."""
    import time

    from quantvla_core.quant.transforms import InputTransform, hadamard

    def cost(f, n=200):
        for _ in range(10):
            f()
        ts = []
        for _ in range(n):
            c = time.thread_time()
            f()
            ts.append(time.thread_time() - c)
        return sorted(ts)[len(ts) // 2] * 1e6

    torch.manual_seed(0)
    ok = True
    for m, k, n in shapes:
        lin = torch.nn.Linear(k, n)
        x = torch.randn(1, m, k) * 3
        t = InputTransform(inv_smooth=torch.rand(k) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard")
        line = [f"M={m:<3} K={k:<5} N={n:<5} fp32 {cost(lambda: lin(x)):5.0f} us"]
        for wb, ab in ((8, 8), (4, 8), (4, 4)):
            ql = QL.QuantLinear.from_linear(lin, w_bits=wb, a_bits=ab, group_size=128 if wb == 4 else None,
                                            transform=t, clip_grid=(1.0,))
            with torch.inference_mode():
                same = torch.equal(SHIPPED_FORWARD(ql, x), lean_forward(ql, x))
                ok &= same
                line.append(f"w{wb}a{ab} {cost(lambda: SHIPPED_FORWARD(ql, x)):5.0f} -> "
                            f"{cost(lambda: lean_forward(ql, x)):5.0f} us{'' if same else ' DIFFERS'}")
        print(" | ".join(line))
    return ok


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--check" in sys.argv:
        sys.exit(0 if check() else 1)
    QL.QuantLinear.forward = lean_forward
    from quantvla_core.bench import main
    sys.exit(main(sys.argv[1:], prog="benchmarks/qlinear_cpu_lean.py"))
