"""fp32 CPU linears through oneDNN: same function as F.linear (to fp32 GEMM rounding), only
where it applies (no grad, fp32, CPU), and the Policy's CPU models use it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from quantvla_core.models.cpu_linear import (
    OneDNNLinear,
    float_linear,
    onednn_linear_enabled,
    set_onednn_linear,
    use_onednn_linears,
)

pytestmark = pytest.mark.skipif(not onednn_linear_enabled(), reason="this PyTorch build has no oneDNN")


class OpNames(TorchDispatchMode):
    """Records the name of every aten op run inside it (shared by the tests that check which
    kernels a path launches)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_float_linear_matches_f_linear_in_fp32_and_runs_onednn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 256, generator=g)
    w, b = torch.randn(640, 256, generator=g), torch.randn(640, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    with torch.no_grad(), OpNames() as ops:
        y = float_linear(x, w, b)
        y_view = float_linear(
            x.transpose(1, 2).contiguous().transpose(1, 2), w[:320], b[:320]
        )  # strided input, row-slice weight
    assert any("mkldnn._linear_pointwise" in n for n in ops.names)
    assert y.dtype == torch.float32 and y.shape == (2, 17, 640)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_view.double(), ref[..., :320], rtol=1e-5, atol=1e-4)


def test_float_linear_is_f_linear_with_grad_or_other_dtypes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=g, requires_grad=True)
    w = torch.randn(16, 32, generator=g, requires_grad=True)
    with OpNames() as ops:
        y = float_linear(x, w)
    assert not any("mkldnn" in n for n in ops.names)  # autograd needs F.linear
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, x.detach().sum(0)[None].expand(16, -1))
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    with torch.no_grad():
        assert torch.equal(float_linear(xb, wb), F.linear(xb, wb))
    set_onednn_linear(False)
    try:
        with torch.no_grad(), OpNames() as ops:
            float_linear(x.detach(), w.detach())
        assert not any("mkldnn" in n for n in ops.names)
    finally:
        set_onednn_linear(True)


def test_use_onednn_linears_converts_plain_linears_only():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Sub(8, 4), nn.Linear(4, 2, bias=False))
    keys = list(model.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    assert use_onednn_linears(model) == 2
    assert type(model[0]) is OneDNNLinear and type(model[2]) is Sub and type(model[3]) is OneDNNLinear
    assert isinstance(model[0], nn.Linear) and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    model(x).sum().backward()  # training still works (F.linear under autograd)
    assert model[0].weight.grad is not None
    model[0].register_forward_pre_hook(lambda *a: None)  # an observed layer is a plain F.linear
    with torch.no_grad(), OpNames() as ops:
        model[0](x)
    assert not any("mkldnn" in n for n in ops.names)


def test_cpu_policy_runs_its_float_linears_through_onednn():
    from quantvla_core.policy import Observation, Policy

    pol = Policy.load("tiny", device="cpu")
    assert any(type(m) is OneDNNLinear for m in pol.model.modules())
    assert not any(type(m) is nn.Linear for m in pol.model.modules())
    with torch.no_grad(), OpNames() as ops:  # tiny layers stay on F.linear (oneDNN's cost per call)
        float_linear(torch.randn(16, 4), torch.randn(256, 4))
    assert not any("mkldnn" in n for n in ops.names)
    rng = np.random.default_rng(0)
    obs = Observation(
        images=[rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)],
        instruction="pick",
        state=np.zeros(pol.state_dim, np.float32),
    )
    a = pol.predict(obs, seed=3).actions
    set_onednn_linear(False)
    try:
        b = pol.predict(obs, seed=3).actions
    finally:
        set_onednn_linear(True)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _Wrapped(torch.Tensor):
    """A minimal wrapper tensor subclass, as torchao's quantized weights are: the data lives in
    an inner tensor, every op unwraps it."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return _Wrapped(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func.namespace == "mkldnn":  # as torchao's: only the ops it implements (F.linear's)
            raise NotImplementedError(f"{func} is not implemented for _Wrapped")
        unwrap = lambda a: a.inner if isinstance(a, _Wrapped) else a  # noqa: E731
        out = func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        if func is torch.ops.aten.detach.default:  # a Parameter needs detach() to keep the type
            return _Wrapped(out)
        return out


def test_tensor_subclass_weights_keep_their_own_linear_and_are_not_fused():
    """Weights that are tensor subclasses (torchao's quantized ones) never go to oneDNN's fp32
    kernel or into a float concatenation: F.linear dispatches them, and fusing steps aside."""
    from quantvla_core.models.float_fusion import fused_float_linear, fused_float_weights

    torch.manual_seed(0)
    a, b = nn.Linear(256, 512), nn.Linear(256, 512)
    dense_a = a.weight.detach().clone()
    a.weight = nn.Parameter(_Wrapped(dense_a), requires_grad=False)
    use_onednn_linears(nn.Sequential(a, b))
    x = torch.randn(17, 256)
    owner = nn.Module()
    with torch.no_grad():
        torch.testing.assert_close(a(x), F.linear(x, dense_a, a.bias), rtol=1e-6, atol=1e-6)
        assert fused_float_weights(owner, "_s", (a, b)) is None
        assert fused_float_linear(owner, "_s", (a, b), x) is None
        assert isinstance(a.weight, _Wrapped)  # nothing re-pointed into a concatenation


def test_few_row_gemms_use_a_prepacked_weight_kept_in_step_with_it():
    """Under inference mode, at most PREPACK_MAX_ROWS rows: a oneDNN-blocked copy of the weight,
    made once and reused, rebuilt when the weight changes in place or is re-pointed (also onto
    a reused address), dropped with the weight; more rows, or no_grad without inference mode
    (where weights get edited), read the plain weight; deepcopy of a used model still works."""
    import copy
    import gc

    from quantvla_core.models import cpu_linear as cl

    cl.set_onednn_prepack(False)  # start from an empty registry
    cl.set_onednn_prepack(True)
    torch.manual_seed(0)
    lin = nn.Linear(256, 768)
    use_onednn_linears(nn.Sequential(lin))
    ref = lambda x: F.linear(x.double(), lin.weight.double(), lin.bias.double())  # noqa: E731
    with torch.no_grad():
        lin(torch.randn(17, 256))
    assert not cl._PACKED  # no_grad alone: the plain weight
    with torch.inference_mode():
        for rows in (8, 17, 64):  # each far from the last: packed again for its row count
            x = torch.randn(rows, 256)
            torch.testing.assert_close(lin(x).double(), ref(x), rtol=0, atol=1e-4)
            assert cl._PACKED[id(lin.weight)][4] == rows
        assert len(cl._PACKED) == 1 and cl.prepacked_bytes() == 768 * 256 * 4
        first = cl._PACKED[id(lin.weight)][3]
        lin(torch.randn(40, 256))  # within half / twice of 64: reused
        assert cl._PACKED[id(lin.weight)][3] is first
        lin(torch.randn(200, 256))  # many rows: the plain weight, nothing new kept
        assert len(cl._PACKED) == 1
        lin.weight.mul_(2.0)  # in place: a new version
        x = torch.randn(17, 256)
        torch.testing.assert_close(lin(x).double(), ref(x), rtol=0, atol=2e-4)
        assert cl._PACKED[id(lin.weight)][3] is not first
        for _ in range(3):  # re-pointed storage, the allocator may hand back the same address
            lin.weight.data = torch.zeros(1)
            lin.weight.data = torch.randn(768, 256)
            torch.testing.assert_close(lin(x).double(), ref(x), rtol=0, atol=2e-4)
        lin.weight.data.mul_(3.0)  # invisible to the version counter: documented, invalidate
        cl.invalidate_prepacked()
        torch.testing.assert_close(lin(x).double(), ref(x), rtol=0, atol=5e-4)
        twin = copy.deepcopy(nn.Sequential(lin))  # the kept copy is not part of the model
        torch.testing.assert_close(twin[0](x), lin(x), rtol=0, atol=0)
        cl.set_onednn_prepack(False)
        assert not cl._PACKED
        torch.testing.assert_close(lin(x).double(), ref(x), rtol=0, atol=5e-4)
        cl.set_onednn_prepack(True)
        lin(x)
        lin = twin = None
        gc.collect()
    assert not cl._PACKED  # freed with its weight (the deep copy's own was too)


def test_fused_float_weights_follow_in_place_updates_of_their_layers():
    """A layer re-pointed into a float concatenation keeps its own version counter: an in-place
    update through it (loading a state_dict, ATM / OHB scaling) rebuilds the concatenation, so
    the fused GEMM - and its prepacked copy - compute with the new weights."""
    from quantvla_core.models.layers import Attention

    torch.manual_seed(0)
    attn = Attention(256, 4, 64).eval()
    use_onednn_linears(attn)
    x = torch.randn(1, 17, 256)
    with torch.inference_mode():
        attn(x)  # builds (and prepacks) the q|k|v concatenation
    fresh = {k: torch.randn_like(v) for k, v in attn.state_dict().items()}
    attn.load_state_dict(fresh)
    with torch.no_grad():
        attn.to_q.weight.mul_(2.0)
    with torch.inference_mode():
        got = attn(x)
    want = Attention(256, 4, 64).eval()
    want.load_state_dict(fresh)
    with torch.no_grad():
        want.to_q.weight.mul_(2.0)
        torch.testing.assert_close(got, want(x), rtol=1e-4, atol=1e-3)
