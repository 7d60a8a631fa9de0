"""Sibling projections (q/k/v, gate/up) of quantized models run as one QuantLinear: one
activation quantization and one GEMM, bit for bit the separate layers' outputs."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from quantvla_bench.variants import quick_quantize
from quantvla_core.config import preset
from quantvla_core.models import build_model
from quantvla_core.models.layers import GatedMLP
from quantvla_core.policy import Observation, Policy
from quantvla_core.quant.qlinear import (
    QuantLinear,
    concat_quant_linears,
    fused_siblings,
    quant_backend,
    scale_output_channels,
    set_epilogue_fusion,
    set_norm_fusion,
    set_sibling_fusion,
)
from quantvla_core.quant.transforms import InputTransform, hadamard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ql(k, n, bias, t=None, w_bits=8, a_bits=8):
    torch.manual_seed(k * 3 + n)
    return QuantLinear.from_linear(
        nn.Linear(k, n, bias=bias),
        w_bits=w_bits,
        a_bits=a_bits,
        group_size=128 if w_bits == 4 else None,
        transform=t,
        clip_grid=(1.0,),
    )


@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4)])
def test_concatenated_layer_equals_the_separate_layers(w_bits, a_bits):
    t = InputTransform(inv_smooth=torch.rand(256) + 0.5, rotation=hadamard(64).float(), rotation_kind="hadamard")
    layers = [_ql(256, n, bias, t, w_bits, a_bits) for n, bias in ((96, True), (32, False), (32, True))]
    fused = concat_quant_linears(layers)
    assert fused is not None and fused.out_features == 160
    x = torch.randn(2, 7, 256)
    x[0, 0, 3] = 50.0
    for backend in ("cpu", "auto"):
        with quant_backend(backend), torch.inference_mode():
            want = torch.cat([layer(x) for layer in layers], -1)
            got = fused(x)
        assert torch.equal(got, want), backend


def test_layers_that_cannot_share_a_quantization_are_not_fused():
    a = _ql(128, 16, False, InputTransform(inv_smooth=torch.rand(128) + 0.5))
    b = _ql(128, 16, False, InputTransform(inv_smooth=torch.rand(128) + 0.5))  # other smoothing
    assert concat_quant_linears([a, b]) is None
    assert concat_quant_linears([_ql(128, 16, False), _ql(128, 16, False, w_bits=4)]) is None  # other bits
    mlp = GatedMLP(128, 64, "gelu_tanh")  # float children: nothing to fuse
    assert fused_siblings(mlp, ("gate_proj", "up_proj")) is None


def test_fused_copy_follows_in_place_scale_changes():
    """ATM/OHB rescale a child's outputs in place: the fused copy must be rebuilt."""
    mlp = GatedMLP(128, 64, "silu")
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _ql(128, 64, False), _ql(128, 64, False), _ql(64, 128, False)
    x = torch.randn(5, 128)
    first = fused_siblings(mlp, ("gate_proj", "up_proj"))
    assert first is fused_siblings(mlp, ("gate_proj", "up_proj"))  # cached
    scale_output_channels(mlp.up_proj, 0.5)
    second = fused_siblings(mlp, ("gate_proj", "up_proj"))
    assert second is not first
    set_sibling_fusion(False)
    try:
        want = mlp(x)
    finally:
        set_sibling_fusion(True)
    assert torch.equal(mlp(x), want)


@pytest.fixture
def no_norm_fusion():
    """Sibling fusion alone (the RMSNorm fused into the quantization and the activation /
    residual in the GEMM epilogue change rounding)."""
    set_norm_fusion(False)
    set_epilogue_fusion(False)
    yield
    set_norm_fusion(True)
    set_epilogue_fusion(True)


def _policy_and_obs(name: str, scheme: str = "w8a8"):
    cfg = preset(name)
    model = build_model(cfg, seed=0).eval()
    quick_quantize(model, cfg.arch, scheme)
    policy = Policy(model, cfg, name=name, device="cpu", dtype="fp32", scheme=scheme)
    rng = np.random.default_rng(0)
    obs = Observation(
        images=[rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)],
        instruction="open the drawer",
        state=rng.normal(size=cfg.state_dim).astype(np.float32),
    )
    return policy, obs


def _actions_with_and_without_norm_fusion(policy, obs, backend, adaptive: bool):
    """(fused actions, plain actions, whether each try_forward_rmsnorm call of the fused run -
    adaptive ones (norm_shift) or plain ones - took the fused path)."""
    import quantvla_kernels as qk

    taken: list[bool] = []
    real = QuantLinear.try_forward_rmsnorm

    def spy(self, *a, **kw):
        y = real(self, *a, **kw)
        if (kw.get("norm_shift") is not None) == adaptive:
            taken.append(y is not None)
        return y

    QuantLinear.try_forward_rmsnorm = spy
    try:
        with qk.backend_scope(backend):
            fused = policy.predict(obs, seed=3).actions
            calls = list(taken)
            set_norm_fusion(False)
            try:
                plain = policy.predict(obs, seed=3).actions
            finally:
                set_norm_fusion(True)
    finally:
        QuantLinear.try_forward_rmsnorm = real
    return fused, plain, calls


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rmsnorm_fused_into_quantization_matches_norm_then_layers(name, scheme, backend):
    """Plain RMSNorms feeding quantized q/k/v or gate/up run inside the activation quantization
    (CPU: the fused extension's row pass; Triton: rmsnorm_quantize): the path is taken, and the
    actions stay within quantization rounding of norm-then-layers (not bit for bit: the norm is
    not rounded to the model dtype and its sum runs in the kernel's order)."""
    from quantvla_kernels.dispatch import triton_interpreting

    if backend == "triton" and not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    policy, obs = _policy_and_obs(name, scheme)
    fused, plain, calls = _actions_with_and_without_norm_fusion(
        policy, obs, None if backend == "auto" else backend, adaptive=False
    )
    assert calls and all(calls), "a plain RMSNorm before quantized siblings was not fused"
    assert not np.array_equal(fused, plain) or name == "tiny-pi05"
    np.testing.assert_allclose(fused, plain, rtol=0, atol=0.05 * np.abs(plain).max())


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_adarms_fused_into_gate_up_quantization(backend, scheme):
    """pi0.5's post-attention adaRMS, x * rstd * (1 + scale) + shift, runs inside gate/up's
    activation quantization (the CPU extension's row pass; Triton's row kernel), the shift
    added before smoothing and rotation: taken in every expert layer of every step, and the
    actions stay within quantization rounding of norm-then-layers."""
    from quantvla_kernels import cpu_fused
    from quantvla_kernels.dispatch import triton_interpreting

    if backend == "triton" and not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    if backend == "cpu" and cpu_fused.module() is None:
        pytest.skip(f"the fused CPU linear did not build here: {cpu_fused.failure()}")
    policy, obs = _policy_and_obs("tiny-pi05", scheme)
    cfg = policy.config
    fused, plain, calls = _actions_with_and_without_norm_fusion(policy, obs, backend, adaptive=True)
    assert calls == [True] * (cfg.expert.depth * cfg.num_steps)
    assert not np.array_equal(fused, plain)
    np.testing.assert_allclose(fused, plain, rtol=0, atol=0.05 * np.abs(plain).max())


@pytest.mark.usefixtures("no_norm_fusion")
@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_quantized_policy_is_bit_identical_with_and_without_fusion(name):
    cfg = preset(name)
    model = build_model(cfg, seed=0).eval()
    quick_quantize(model, cfg.arch, "w8a8")
    policy = Policy(model, cfg, name=name, device="cpu", dtype="fp32", scheme="w8a8")
    rng = np.random.default_rng(0)
    obs = Observation(
        images=[rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)],
        instruction="open the drawer",
        state=rng.normal(size=cfg.state_dim).astype(np.float32),
    )
    fused_calls = []
    import quantvla_core.quant.qlinear as qlinear_module

    real = qlinear_module.concat_quant_linears

    def spy(layers, *args):
        fused_calls.append(len(layers))
        return real(layers, *args)

    qlinear_module.concat_quant_linears = spy
    try:
        with_fusion = policy.predict(obs, seed=3).actions
    finally:
        qlinear_module.concat_quant_linears = real
    assert fused_calls, "no sibling group was fused in a quantized model"
    set_sibling_fusion(False)
    try:
        without = policy.predict(obs, seed=3).actions
    finally:
        set_sibling_fusion(True)
    assert np.array_equal(with_fusion, without)


def test_fusion_steps_aside_while_a_child_or_the_norm_is_hooked():
    """Hooks see the modules they were put on: with a hook on a child (or the norm), its
    siblings run one by one and the norm as its own module, with the unfused numbers."""
    from quantvla_core.models.layers import RMSNorm

    mlp = GatedMLP(128, 64, "gelu_tanh")
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = _ql(128, 64, False), _ql(128, 64, False), _ql(64, 128, False)
    norm = RMSNorm(128)
    x = torch.randn(5, 128)
    seen = []
    handle = mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert fused_siblings(mlp, ("gate_proj", "up_proj")) is None
        y = mlp.forward_normed(x, norm)
    finally:
        handle.remove()
    assert seen == [torch.Size([5, 64])]
    set_norm_fusion(False)
    set_sibling_fusion(False)
    try:
        want = mlp(norm(x))
    finally:
        set_norm_fusion(True)
        set_sibling_fusion(True)
    assert torch.equal(y, want)
    norm_seen = []
    h2 = norm.register_forward_hook(lambda m, i, o: norm_seen.append(1))
    try:
        mlp.forward_normed(x, norm)
    finally:
        h2.remove()
    assert norm_seen == [1] and fused_siblings(mlp, ("gate_proj", "up_proj")) is not None
