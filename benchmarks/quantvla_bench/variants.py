"""The policies a speed benchmark compares: FP, quantized schemes, and optional peers.

Why a separate "quick" quantizer: timing needs the deployed structure (which linears are
integer, their bit widths, group scales, where a Hadamard rotation or an un-foldable smoothing
runs inside the activation quantization), not a calibrated student. ATM and OHB fold into
scales and smoothing folds into norms / producer rows, so they cost nothing at run time and the
quick path skips them. The layer structure is the library's layer plan
(``quantvla_core.quant.layer_plan``: layout rules, fold targets by name), the one the
weight-memory accounting counts. Since the pipeline searches the transform per layer group on
its calibration data, it may drop a rotation the quick path keeps, or keep smoothing inside the
quantization where its traced fold check fails: the quick structure is the PTQ default (every
group rotated), and ``--quantizer calib`` times the searched one. The test suite checks that
both have the same integer layers, bit widths and groups.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quantvla_core.config import ModelConfig
from quantvla_core.models import build_model
from quantvla_core.quant.layer_plan import GROUP_SIZE, QUANT_BITS, integer_linears, plan_layers, replace_module
from quantvla_core.quant.qlinear import QuantLinear
from quantvla_core.quant.transforms import InputTransform, hadamard

SCHEMES = ("fp",) + tuple(QUANT_BITS)
QUANTIZERS = ("quick", "calib")
PEERS = ("compile", "bf16", "fp32-blas", "ao-dynamic-int8", "torchao-int8dq", "torchao-int4wo")
PEER_SETS = {"all": PEERS}  # shorthand: every peer; those that cannot run here are skipped with a note


def check_schemes(schemes: list[str]) -> list[str]:
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise ValueError(f"unknown schemes {bad or schemes}; accepted: {', '.join(SCHEMES)}")
    return schemes


def check_peers(peers: list[str]) -> list[str]:
    """Peer names in order, shorthands (``all``) expanded, duplicates dropped."""
    out: list[str] = []
    for p in peers:
        for q in PEER_SETS.get(p, (p,)):
            if q not in out:
                out.append(q)
    bad = [p for p in out if p not in PEERS]
    if bad:
        raise ValueError(f"unknown peers {bad}; accepted: {', '.join(PEERS)}, all or none")
    return out


def quick_quantize(
    model: nn.Module,
    arch: str,
    scheme: str,
    layout: str = "quantvla",
    progress: Callable[[str], None] | None = None,
    transforms: tuple[str, ...] = ("smooth", "rotate"),
) -> nn.Module:
    """Replace the layout's linears by QuantLinears in place: round-to-nearest absmax codes of
    the rotated weights (no calibration, no clip search, no ATM/OHB). Smoothing that the
    pipeline cannot fold is kept as an identity ``inv_smooth``, so its cost is still paid.
    ``transforms`` as QuantConfig.transforms (permutation is not modelled: the pipeline's
    default does not use it)."""
    bad = [t for t in transforms if t not in ("smooth", "rotate")]
    if bad:
        raise ValueError(f"quick quantizer transforms {bad} unknown; accepted: smooth, rotate")
    modules = dict(model.named_modules())
    for p in plan_layers(model, arch, scheme, layout, smooth="smooth" in transforms, rotate="rotate" in transforms):
        lin = modules[p.name]
        t = InputTransform()
        if p.rotation_block > 1:
            t.rotation = hadamard(p.rotation_block).to(torch.float32)
            t.rotation_kind = "hadamard"
        if p.smooth_in_kernel:
            t.inv_smooth = torch.ones(lin.in_features, dtype=torch.float32)
        with torch.no_grad():
            ql = QuantLinear.from_linear(
                lin,
                w_bits=p.spec["w_bits"],
                a_bits=p.spec["a_bits"],
                group_size=p.spec["group_size"],
                transform=t,
                clip_grid=(1.0,),
                int_group_scales=p.spec["int_group_scales"],
            )
        replace_module(model, p.name, ql)
        del lin
        if progress:
            progress(p.name)
    return model


def with_activation_bits(model: nn.Module, a_bits: int) -> nn.Module:
    """Same weights, other activation width (W4A8 -> W4A4 without re-quantizing the weights)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and m.a_bits != a_bits:
            spec = dict(m.spec(), a_bits=a_bits)
            new = QuantLinear(**spec, dtype=m.weight.dtype).to(m.qweight.device)
            new.load_state_dict(m.state_dict())
            replace_module(model, name, new)
    return model


def build_fp_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Seeded random weights, initialised directly on the device (a 3B model inits in seconds on
    a GPU, minutes on a CPU), then cast to the compute dtype."""
    model = build_model(cfg, seed=seed, device=device)
    return model.to(dtype=dtype).eval()


def calibrated_student(policy, scheme: str, calib: str, layout: str = "quantvla"):
    """The real PTQ pipeline (synthetic or recorded calibration), ATM/OHB off: they fold into
    scales and change no run-time work. Returns the student Policy."""
    from quantvla_core.quant.quantize import QuantConfig, quantize

    qc = QuantConfig(scheme=scheme, layout=layout, atm=False, ohb=False, calib_samples=4, batch_size=4)
    return quantize(policy, qc, calib, report=False, progress=False).policy


# ---- peers --------------------------------------------------------------------------------------
# A speed claim is made against the best float path a user could pick (torch.compile, bf16) and
# against PyTorch's own int8 (torch.ao dynamic quantization on the CPU, torchao where installed).


def peer_available(peer: str, device: torch.device | None = None, fp_dtype: str = "fp32") -> tuple[bool, str]:
    """Whether a peer can run on ``device`` next to an FP model in ``fp_dtype``, and why not."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if peer == "compile":
        return True, ""
    if peer == "bf16":
        if fp_dtype == "bf16":
            return False, "FP already runs in bf16 here (the CUDA default), so a bf16 peer would repeat it"
        return True, ""
    if peer == "fp32-blas":
        if device.type != "cpu":
            return False, "fp32-blas compares the CPU's fp32 GEMMs (F.linear's BLAS vs oneDNN); CPU only"
        if fp_dtype != "fp32":
            return False, f"fp32-blas is an fp32 path; FP here is {fp_dtype} (use --dtype fp32)"
        from quantvla_core.models.cpu_linear import onednn_linear_enabled

        if not onednn_linear_enabled():
            return False, "this torch build has no oneDNN: FP already runs F.linear"
        return True, ""
    if peer == "ao-dynamic-int8":
        if device.type != "cpu":
            return False, "torch.ao dynamic int8 runs on the CPU only (fbgemm / x86 engines)"
        if fp_dtype != "fp32":
            return False, f"torch.ao dynamic int8 takes fp32 activations; FP here is {fp_dtype} (use --dtype fp32)"
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm")):
            return False, f"no x86/fbgemm quantized engine in this torch build (engines: {engines})"
        return True, ""
    try:
        import torchao  # noqa: F401
        import torchao.quantization  # noqa: F401
    except Exception as e:  # ImportError or a torch/torchao version clash
        return False, f"torchao not importable ({type(e).__name__}: {str(e)[:80]})"
    return True, ""


def apply_ao_dynamic_int8(model: nn.Module, arch: str, layout: str = "quantvla") -> nn.Module:
    """torch.ao dynamic int8 (int8 weights per channel, activations quantized per call) on the
    layout's integer linears, in place. torch.ao.quantization is deprecated in favour of torchao;
    its warnings are silenced here because the peer is still the int8 path that ships with torch."""
    import warnings

    names = set(integer_linears(model, arch, layout))
    if not names:
        raise ValueError(f"layout {layout!r} makes no nn.Linear of this model integer")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|torch\.ao\.quantization).*")
        torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)
    return model


def apply_torchao(model: nn.Module, arch: str, peer: str, layout: str = "quantvla") -> nn.Module:
    """torchao on the same linears our layout makes integer (int8 dynamic activation + int8
    weight, or int4 weight-only group 128); the API name differs across torchao releases."""
    import torchao.quantization as tq

    names = set(integer_linears(model, arch, layout))

    def only_layout(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn in names

    if peer == "torchao-int8dq":
        cfg = (
            tq.Int8DynamicActivationInt8WeightConfig()
            if hasattr(tq, "Int8DynamicActivationInt8WeightConfig")
            else tq.int8_dynamic_activation_int8_weight()
        )
    elif peer == "torchao-int4wo":
        cfg = (
            tq.Int4WeightOnlyConfig(group_size=GROUP_SIZE)
            if hasattr(tq, "Int4WeightOnlyConfig")
            else tq.int4_weight_only(group_size=GROUP_SIZE)
        )
    else:
        raise ValueError(f"unknown torchao peer {peer!r}; accepted: torchao-int8dq, torchao-int4wo")
    tq.quantize_(model, cfg, filter_fn=only_layout)
    return model
