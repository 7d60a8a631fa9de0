"""Integer group scales for 4-bit weights: group g of channel n is ``code * mult[n, g] * s[n]``
with integer ``mult`` in 1..18, so every backend sums all groups in one int32 accumulator.

Checked here: the quantizer (error no worse than float group scales, also with outlier
channels injected, edge rows), QuantLinear on every backend against its float64 oracle and
against each other, the sibling concatenation, ATM/OHB's output scaling, the artifact round
trip, and that artifacts written before this format still load as float group scales."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from quantvla_core.quant.qlinear import QuantLinear, concat_quant_linears, scale_output_channels  # noqa: E402
from quantvla_core.quant.quantizers import GROUP_MULT_MAX, quantize_weight  # noqa: E402
from quantvla_core.quant.transforms import InputTransform, hadamard  # noqa: E402
from quantvla_kernels import cpu_fused  # noqa: E402
from quantvla_kernels.ops import triton_interpreting  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRITON = triton_interpreting()


def _weights(n, k, seed, outliers=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:  # pretrained-like: a few input channels and output rows far larger than the rest
        w[:, torch.randperm(k, generator=g)[: max(1, k // 50)]] *= 12
        w[torch.randperm(n, generator=g)[: max(1, n // 16)]] *= 6
    return w


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("n,k,gs", [(64, 256, 128), (96, 1024, 128), (48, 512, 256)])
def test_quantizer_codes_ranges_and_error_match_float_group_scales(n, k, gs, outliers):
    w = _weights(n, k, n + k + gs, outliers)
    w[3, :gs] = 0  # an all-zero group
    w[5] = 0  # an all-zero channel
    qi = quantize_weight(w, 4, gs, int_group_scales=True)
    qf = quantize_weight(w, 4, gs)
    assert qi.q.dtype == torch.int8 and int(qi.q.abs().max()) <= 7
    assert qi.group_mult.dtype == torch.uint8 and tuple(qi.group_mult.shape) == (n, k // gs)
    assert 1 <= int(qi.group_mult.min()) and int(qi.group_mult.max()) <= GROUP_MULT_MAX
    assert tuple(qi.scale.shape) == (n,) and bool((qi.scale > 0).all())
    # dequantization, independently: code * mult * channel scale, in float64
    q, m, s = qi.q.numpy().astype(np.float64), qi.group_mult.numpy().astype(np.float64), qi.scale.double().numpy()
    want = (q.reshape(n, k // gs, gs) * m[..., None]).reshape(n, k) * s[:, None]
    np.testing.assert_allclose(qi.dequantize(torch.float64).numpy(), want, rtol=1e-15, atol=0)
    assert bool((qi.dequantize()[5] == 0).all()) and bool((qi.dequantize()[3, :gs] == 0).all())
    # the integer constraint costs (almost) nothing: squared error within 2% of float scales
    err_i = float((qi.dequantize() - w).pow(2).sum())
    err_f = float((qf.dequantize() - w).pow(2).sum())
    assert err_i <= 1.02 * err_f, (err_i, err_f)
    # and row by row, the row with an all-zero group included (its placeholder scale must not
    # set the channel scale)
    row_i = (qi.dequantize() - w).pow(2).sum(1)
    row_f = (qf.dequantize() - w).pow(2).sum(1)
    assert bool((row_i <= 1.3 * row_f + 1e-12).all()), (row_i / row_f.clamp_min(1e-12)).max()
    assert int(qi.group_mult[3, 0]) == 1


@pytest.mark.parametrize("magnitude", [1e-3, 1e-2, 1.0])
def test_a_zero_group_leaves_the_rest_of_its_row_alone(magnitude):
    """A channel whose first group is all zero (pruned or padded inputs): its other groups are
    quantized as well as with float group scales, at any weight magnitude."""
    w = _weights(32, 512, 7) * (magnitude / 0.05)
    w[:, :128] = 0
    qi = quantize_weight(w, 4, 128, int_group_scales=True)
    qf = quantize_weight(w, 4, 128)
    rel_i = float((qi.dequantize() - w).norm() / w.norm())
    rel_f = float((qf.dequantize() - w).norm() / w.norm())
    assert rel_i <= 1.05 * rel_f, (rel_i, rel_f)
    assert bool((qi.group_mult[:, 0] == 1).all()) and bool((qi.q[:, :128] == 0).all())


def test_quantizer_and_layer_reject_what_integer_group_scales_cannot_be():
    w = _weights(8, 256, 0)
    with pytest.raises(ValueError, match="int_group_scales needs 4-bit group-wise weights"):
        quantize_weight(w, 8, 128, int_group_scales=True)
    with pytest.raises(ValueError, match="int_group_scales needs 4-bit group-wise weights"):
        quantize_weight(w, 4, None, int_group_scales=True)
    with pytest.raises(ValueError, match="int_group_scales needs 4-bit group-wise weights"):
        QuantLinear(256, 8, w_bits=4, a_bits=8, group_size=None, int_group_scales=True)
    ql = QuantLinear(256, 8, w_bits=4, a_bits=8, group_size=128, int_group_scales=True)
    q = torch.zeros(8, 256, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"group_mult must be \(8, 2\), got None"):
        ql.set_codes(q, torch.ones(8))
    for bad in (0, GROUP_MULT_MAX + 1):
        with pytest.raises(ValueError, match=rf"group_mult values must lie in \[1, {GROUP_MULT_MAX}\]"):
            ql.set_codes(q, torch.ones(8), torch.full((8, 2), bad, dtype=torch.uint8))
    plain = QuantLinear(256, 8, w_bits=4, a_bits=8, group_size=128)
    with pytest.raises(ValueError, match="without integer group scales"):
        plain.set_codes(q, torch.ones(8, 2), torch.ones(8, 2, dtype=torch.uint8))


def _layer(k=256, n=96, transform="hadamard", a_bits=8, seed=0):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(_weights(n, k, seed, outliers=True))
    t = None
    if transform == "hadamard":
        t = InputTransform(
            inv_smooth=torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.5,
            rotation=hadamard(64).float(),
            rotation_kind="hadamard",
        )
    elif transform == "smooth":
        t = InputTransform(inv_smooth=torch.rand(k, generator=torch.Generator().manual_seed(seed)) + 0.5)
    ql = QuantLinear.from_linear(lin, w_bits=4, a_bits=a_bits, group_size=128, transform=t, int_group_scales=True)
    return lin, ql


def _x(m, k, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    x[0] = 0  # all-zero row
    x[-1, 7] = 60.0  # an outlier token
    return x


@pytest.mark.parametrize("a_bits", [8, 4])
def test_layer_backends_match_the_float64_oracle_and_each_other(a_bits):
    lin, ql = _layer(a_bits=a_bits, transform="smooth")
    assert ql.wscale.shape == (96,) and ql.wgroup.shape == (96, 2)
    x = _x(17, 256)
    ref = ql.forward_reference(x)  # float64: codes x multipliers x scales, quantized activations
    ys = {}
    for backend in ["cpu", "reference"] + (["triton"] if TRITON else []):
        ql.backend = backend
        with torch.no_grad():
            ys[backend] = ql(x)
    ql.backend = None
    cpu_fused.set_enabled(False)
    try:
        with torch.no_grad():
            ys["cpu torch ops"] = ql(x)
    finally:
        cpu_fused.set_enabled(True)
    with torch.no_grad():
        ys["cpu fused"] = ql(x)
        ys["torch int"] = ql._forward_int_torch(x)
    scale = float(ref.abs().max())
    for name, y in ys.items():
        assert float((y.double() - ref).abs().max()) <= 1e-5 * scale, name
    # one integer accumulator and the same fp32 epilogue: the CPU paths agree bit for bit
    assert torch.equal(ys["cpu fused"], ys["cpu torch ops"])
    assert torch.equal(ys["cpu"], ys["cpu torch ops"])
    # as close to the float layer as the same layer with float group scales
    twin = QuantLinear.from_linear(lin, w_bits=4, a_bits=a_bits, group_size=128, transform=ql.input_transform())
    with torch.no_grad():
        y_float = lin(x)
        rel_int = float((ys["cpu"] - y_float).norm() / y_float.norm())
        rel_float = float((twin(x) - y_float).norm() / y_float.norm())
    assert rel_int <= 1.05 * rel_float, (rel_int, rel_float)


def test_rotated_layer_and_fused_norm_on_cpu_match_the_oracle():
    _, ql = _layer(transform="hadamard")
    x = _x(9, 256, seed=3)
    with torch.no_grad():
        y = ql(x)
        norm_w = torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.5
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
        fused = ql.try_forward_rmsnorm(x, norm_w, 1e-6, 0.0)
    ref = ql.forward_reference(x)
    assert float((y.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    if fused is not None:  # the extension was built: the norm inside the quantization
        ref_n = ql.forward_reference(normed)
        # a code may differ by one step at a rounding boundary (the norm is not rounded first)
        assert float((fused.double() - ref_n).abs().max()) <= 0.05 * float(ref_n.abs().max())


def test_siblings_concatenate_only_with_the_same_scale_form():
    _, a = _layer(n=64, seed=1)
    _, b = _layer(n=32, seed=2)
    b.inv_smooth, b.rotation = a.inv_smooth, a.rotation  # one shared input transform
    fused = concat_quant_linears([a, b])
    assert fused is not None and fused.int_group_scales and fused.wgroup.shape == (96, 2)
    x = _x(5, 256)
    with torch.no_grad():
        assert torch.equal(fused(x), torch.cat([a(x), b(x)], -1))
    pair = concat_quant_linears([a, _layer(n=64, seed=3)[1]], pairs=True)
    assert pair is None or pair.wgroup.shape == (128, 2)
    lin = nn.Linear(256, 32)
    floaty = QuantLinear.from_linear(lin, w_bits=4, a_bits=8, group_size=128, transform=a.input_transform())
    assert concat_quant_linears([a, floaty]) is None


def test_output_channel_scaling_is_exact_on_integer_group_scales():
    """ATM / OHB multiply a layer's outputs per channel: here that is the channel scale only."""
    _, ql = _layer(transform="smooth")
    x = _x(6, 256)
    f = torch.linspace(0.7, 1.4, 96)
    ref = ql.forward_reference(x)
    codes, mult = ql.qweight.clone(), ql.wgroup.clone()
    scale_output_channels(ql, f)
    assert torch.equal(ql.qweight, codes) and torch.equal(ql.wgroup, mult)
    got = ql.forward_reference(x)
    # the scaled fp32 channel scale is rounded once: relative 2^-24 of each output's terms
    want = (ref * f.double()).numpy()
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_state_dict_round_trip_and_bf16_cast_keep_multipliers():
    _, ql = _layer(transform="smooth")
    sd = ql.state_dict()
    assert sd["wgroup"].dtype == torch.uint8 and sd["wscale"].shape == (96,)
    fresh = QuantLinear(**ql.spec())
    fresh.load_state_dict(sd)
    x = _x(4, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), ql(x))
        fresh.to(torch.bfloat16)
    assert fresh.wgroup.dtype == torch.uint8 and fresh.wscale.dtype == torch.float32
    assert ql.storage_bytes() == 96 * 128 + 96 * 2 + 96 * 4 + 96 * 4 + 256 * 4  # codes, mult, scale, bias, smooth


def test_pipeline_writes_and_reloads_integer_group_scales(tmp_path):
    from quantvla_core.policy import Policy
    from quantvla_core.quant.artifact import read_quant_meta
    from quantvla_core.quant.quantize import QuantConfig, quantize

    teacher = Policy.load("tiny", dtype="fp32")
    qc = QuantConfig(scheme="w4a8", group_size=32, calib_samples=3, batch_size=3)  # ATM / OHB on
    result = quantize(teacher, qc, "synthetic", progress=False)
    result.save(tmp_path / "q")
    meta = read_quant_meta(tmp_path / "q")
    grouped = {n for n, s in meta["modules"].items() if s["group_size"]}
    assert grouped and all(meta["modules"][n]["int_group_scales"] for n in grouped)
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["config"]["int_group_scales"] is True
    loaded = Policy.load(tmp_path / "q", dtype="fp32")
    saved = dict(result.model.named_modules())
    for name, mod in loaded.model.named_modules():
        if name in grouped:
            assert mod.int_group_scales and torch.equal(mod.wgroup, saved[name].wgroup)
            assert torch.equal(mod.qweight, saved[name].qweight) and torch.equal(mod.wscale, saved[name].wscale)
    assert result.report["fidelity"]["cosine_mean"] > 0.99
    # multipliers out of range in a file (never written by us) are refused at load, naming them
    from safetensors.torch import load_file, save_file

    from quantvla_core.checkpoint import CheckpointError
    from quantvla_core.models import build_model
    from quantvla_core.quant.artifact import load_quantized

    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = sorted(grouped)[0]
    tensors[f"{name}.wgroup"][0, 0] = 19
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name}.wgroup holds values outside \[1, 18\]"):
        load_quantized(build_model(teacher.config), tmp_path / "q", verify=False)
    # the same calibration with float group scales: fidelity within a whisker
    floaty = quantize(teacher, QuantConfig(**dict(qc.__dict__, int_group_scales=False)), "synthetic", progress=False)
    assert not any(getattr(m, "int_group_scales", False) for m in floaty.model.modules())
    assert abs(floaty.report["fidelity"]["cosine_mean"] - result.report["fidelity"]["cosine_mean"]) < 0.01


def test_artifacts_from_before_integer_group_scales_load_as_float_group_scales(tmp_path):
    """The committed default W4A8 policy predates the format: its specs have no
    int_group_scales key and its group scales are floats; it loads and runs unchanged."""
    import shutil

    from quantvla_core.policy import Policy, default_policy_dir
    from quantvla_core.quant.artifact import read_quant_meta

    src = default_policy_dir("default-w4a8")
    meta = json.loads((src / "quantization.json").read_text())
    assert all("int_group_scales" not in s for s in meta["modules"].values())
    copy = tmp_path / "old"
    shutil.copytree(src, copy)
    assert all(s["int_group_scales"] is False for s in read_quant_meta(copy)["modules"].values())
    policy = Policy.load(copy)
    qls = [m for m in policy.model.modules() if isinstance(m, QuantLinear)]
    assert qls and not any(m.int_group_scales for m in qls)
    assert any(m.group_size and m.wscale.dim() == 2 for m in qls)
