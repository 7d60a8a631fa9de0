"""quantize_ on models that are not the project's Policy classes (issue 17).

Tiny random models in the real HF module layouts: built from `transformers` configs when the
package is installed (it is pinned in requirements.txt), and a hand-written Gemma-2-style block
(norms before AND after attention and MLP, HF attribute names) that needs nothing extra.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from quantvla_core.quant.api import fold_smoothing_, quantize_, static_act_scale
from quantvla_core.quant.qlinear import QuantLinear, scale_output_channels
from quantvla_core.quant.quantize import QuantConfig
from quantvla_core.quant.spec import ArchSpec


# ---- a hand-written Gemma-2-style block (HF names and norm placement) --------------------------------


class GemmaRMSNorm(nn.Module):
    """y = x / rms(x) * (1 + w), computed in fp32 like HF's Gemma norm."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Attn(nn.Module):
    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        shp = (b, t, self.heads, self.head_dim)
        q, k, v = (p(x).view(shp).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2Layer(nn.Module):
    def __init__(self, d=64, hidden=128, heads=4, head_dim=16):
        super().__init__()
        self.self_attn = Attn(d, heads, head_dim)
        self.mlp = MLP(d, hidden)
        self.input_layernorm = GemmaRMSNorm(d)
        self.post_attention_layernorm = GemmaRMSNorm(d)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d)
        self.post_feedforward_layernorm = GemmaRMSNorm(d)

    def forward(self, x):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TinyLM(nn.Module):
    def __init__(self, layers=2, d=64, **kw):
        super().__init__()
        self.layers = nn.ModuleList([Gemma2Layer(d, **kw) for _ in range(layers)])
        self.norm = GemmaRMSNorm(d)
        self.lm_head = nn.Linear(d, 32, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def _randomize(model, seed=0, outliers=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:  # every weight from the seeded generator: runs are reproducible
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif p.dim() == 1 and not n.endswith("weight"):
                p.zero_()  # biases
            if p.dim() == 1 and n.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                for ch in outliers:  # activation outlier channels come out of the norms
                    if n.endswith("layernorm.weight"):
                        p[ch] = 12.0
    return model


def _calib(n=4, d=64, t=10, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, t, d, generator=g).to(dtype) for _ in range(n)]


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_gemma2_layout_folds_into_the_norm_that_feeds_the_mlp_and_keeps_the_function():
    """The issue's case: name-based folding put the MLP's smoothing into post_attention_layernorm
    (108% float error). The trace proves pre_feedforward_layernorm and the 1 + w form."""
    model = _randomize(TinyLM()).double()
    calib = _calib(dtype=torch.float64)
    ref = [model(x) for x in calib]
    rep = fold_smoothing_(
        model, QuantConfig(scheme="w8a8", smooth_search=False, smooth_strength=0.5), calib, ArchSpec.generic(model)
    )
    by_members = {tuple(g["members"]): g for g in rep["groups"]}
    mlp = by_members[("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")]
    assert mlp["fold"] == "norm" and mlp["target"] == "layers.0.pre_feedforward_layernorm"
    assert mlp["offset"] == 1.0
    qkv = by_members[("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")]
    assert qkv["fold"] == "norm" and qkv["target"] == "layers.0.input_layernorm"
    down = by_members[("layers.0.mlp.down_proj",)]
    assert down["fold"] == "producer" and down["target"] == "layers.0.mlp.up_proj"
    o = by_members[("layers.0.self_attn.o_proj",)]
    assert o["fold"] == "exact"  # attention output: no proven target, inverse smoothing stays in the op
    assert rep["float_check"]["ok"]
    for x, r in zip(calib, ref):
        assert _rel(model(x), r) <= 1e-5


def test_name_based_fold_would_have_broken_the_gemma2_layer():
    """What the old rule did (smoothing of gate/up into post_attention_layernorm) changes the
    float function by O(1): the regression the trace prevents."""
    from quantvla_core.quant.transforms import fold_smoothing_into_norm, smoothing_vector

    model = _randomize(TinyLM(layers=1)).double()
    x = _calib(1, dtype=torch.float64)[0]
    ref = model(x)
    layer = model.layers[0]
    s = smoothing_vector(
        torch.rand(64, dtype=torch.float64) * 10 + 0.1, [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], 0.5
    )
    fold_smoothing_into_norm(layer.post_attention_layernorm, 1 / s, offset=1.0)
    with torch.no_grad():
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight.mul_(s)
    assert _rel(model(x), ref) > 0.05


def test_quantize_keeps_dtype_device_and_flags_and_is_faithful():
    model = _randomize(TinyLM()).to(torch.bfloat16)
    model.train()
    calib = _calib(dtype=torch.bfloat16)
    ref = [model(x).float() for x in calib]
    rep = quantize_(model, QuantConfig(scheme="w8a8", group_size=None), calib, ArchSpec.generic(model))
    assert model.training  # flags restored
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and not isinstance(model.lm_head, QuantLinear)
    assert all(m.weight.dtype == torch.bfloat16 for m in qls)
    model.eval()
    out = [model(x).float() for x in calib]
    assert out[0].dtype == torch.float32 and max(_rel(o, r) for o, r in zip(out, ref)) < 0.08
    assert rep["fidelity"]["cosine_mean"] > 0.995
    assert set(rep["layer_errors"]) == set(rep["integer_layers"])


def test_filter_fn_and_role_layouts():
    model = _randomize(TinyLM())
    spec = ArchSpec.generic(model, action="layers.1")
    assert spec.role("layers.1.self_attn.q_proj") == "dit_attn" and spec.role("layers.1.mlp.up_proj") == "dit_mlp"
    assert spec.role("layers.0.mlp.up_proj") == "llm" and spec.role("lm_head") == "float"
    rep = quantize_(
        model,
        QuantConfig(scheme="w8a8", layout=("dit_mlp",), atm=False, ohb=False),
        _calib(),
        spec,
        filter_fn=lambda m, n: not n.endswith("down_proj"),
    )
    assert rep["integer_layers"] == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]


def test_atm_and_ohb_land_on_the_action_attention_through_sdpa():
    """Plant a per-head query scale and an o_proj energy drift in the action block's attention
    of a float 'student': ATM (logits observed through F.scaled_dot_product_attention) and OHB
    recover them on exactly those modules."""
    from quantvla_core.quant.atm import AttentionTarget, calibrate_atm, collect_logit_std
    from quantvla_core.quant.ohb import calibrate_ohb, collect_output_rms

    teacher = _randomize(TinyLM()).eval()
    spec = ArchSpec.generic(teacher, action="layers.1")
    action = [a for a in spec.attention if a.part == "action"]
    assert [a.name for a in action] == ["layers.1.self_attn"] and action[0].heads == 4
    assert action[0].q_proj == "layers.1.self_attn.q_proj" and action[0].o_proj == "layers.1.self_attn.o_proj"
    calib = _calib()

    def run(m):
        with torch.no_grad():
            for x in calib:
                m(x)

    names = [a.name for a in spec.attention]
    sig_t = collect_logit_std(teacher, run, names)
    assert set(sig_t) == {"layers.0.self_attn", "layers.1.self_attn"} and sig_t["layers.1.self_attn"].numel() == 4
    student = copy.deepcopy(teacher)
    drift = torch.tensor([1.3, 1.0, 0.8, 1.1], dtype=torch.float64)
    scale_output_channels(student.layers[1].self_attn.q_proj, drift.repeat_interleave(16))
    scale_output_channels(student.layers[1].self_attn.o_proj, 0.8)
    alphas = calibrate_atm(student, run, [AttentionTarget(a.name, a.q_proj) for a in action], sig_t)
    assert list(alphas) == ["layers.1.self_attn"]
    for a, d in zip(alphas["layers.1.self_attn"], drift.tolist()):
        assert a * d == pytest.approx(1.0, abs=0.03) or abs(d - 1) < 0.02
    rms_t = collect_output_rms(teacher, run, [action[0].o_proj])
    betas = calibrate_ohb(student, run, [action[0].o_proj], rms_t)
    assert betas[action[0].o_proj] == pytest.approx(1.25, rel=0.02)
    assert torch.equal(student.layers[0].self_attn.q_proj.weight, teacher.layers[0].self_attn.q_proj.weight)


def test_static_activation_scale_is_never_zero():
    assert static_act_scale(torch.zeros(8, 16), 99.9, 8) > 0
    x = torch.zeros(100, 16)
    x[0, 3] = 5.0  # percentile row absmax is 0, the max is not
    assert static_act_scale(x, 50.0, 8) == pytest.approx(5.0 / 127)
    model = _randomize(TinyLM(layers=1))
    rep = quantize_(
        model, QuantConfig(scheme="w8a8", activation="static", atm=False, ohb=False), _calib(), ArchSpec.generic(model)
    )
    assert all(float(m.act_scale) > 0 for m in model.modules() if isinstance(m, QuantLinear))
    assert rep["fidelity"]["cosine_mean"] > 0.99


def test_search_picks_per_group_and_beats_fixed_015_on_outlier_channels():
    """Injected activation outlier channels: every group's chosen (strength, rotate) has an
    output error no larger than the fixed 0.15 + rotation, and the whole model follows."""

    def make():
        return _randomize(TinyLM(), outliers=(3, 17, 40))

    calib = _calib()
    searched, fixed = make(), make()
    ref = [searched(x) for x in calib]
    rep = quantize_(
        searched,
        QuantConfig(scheme="w4a8", group_size=None, atm=False, ohb=False, smooth_search=True),
        calib,
        ArchSpec.generic(searched),
    )
    rep_f = quantize_(
        fixed,
        QuantConfig(scheme="w4a8", group_size=None, atm=False, ohb=False, smooth_search=False, smooth_strength=0.15),
        calib,
        ArchSpec.generic(fixed),
    )
    for g in rep["groups"]:
        tried = {(r["strength"], r["rotate"]): r["error"] for r in g["search"]}
        assert len(tried) == 12 and g["choice"]["error"] == min(tried.values())
        assert g["choice"]["error"] <= tried[(0.15, True)]
    err_s = sum(_rel(searched(x), r) for x, r in zip(calib, ref))
    err_f = sum(_rel(fixed(x), r) for x, r in zip(calib, ref))
    assert err_s < err_f
    assert rep_f["groups"][0]["search"] == []


def test_grouping_is_linear_in_the_number_of_linears():
    """Many parallel heads reading one tensor and many layers: the trace groups them in one pass."""
    from quantvla_core.quant.tracing import trace_forward

    class Wide(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 8) for _ in range(n)])
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            h = self.norm(x)
            return sum(lin(h) for lin in self.heads)

    times = []
    for n in (200, 800):
        m = Wide(n)
        names = [f"heads.{i}" for i in range(n)]
        t0 = time.perf_counter()
        tr = trace_forward(m, lambda mm: mm(torch.randn(2, 8)), names)
        groups = tr.groups()
        times.append(time.perf_counter() - t0)
        assert len(groups) == 1 and len(groups[0]) == n
        assert tr.fold_target(groups[0])[:2] == ("norm", "norm")
    assert times[1] < 12 * times[0] + 0.5  # 4x linears: far from 16x


@pytest.mark.parametrize("arch", ["tiny", "tiny-pi05", "tiny-groot"])
def test_builtin_specs_match_the_layout_tables(arch):
    from quantvla_core.config import preset
    from quantvla_core.models import build_model
    from quantvla_core.quant import layout as L

    cfg = preset(arch)
    model = build_model(cfg, device="meta")
    spec = ArchSpec.builtin(model, cfg.arch)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            old = L.role_of(n, cfg.arch)
            new = spec.role(n)
            assert new == old or (old == "float" and new == "vision"), n
    pat = L.ACTION_ATTENTION[cfg.arch][0]
    import re

    assert {a.name for a in spec.attention if a.part == "action"} == {
        n for n, _ in model.named_modules() if re.search(pat, n)
    }
    assert all(a.heads and a.head_dim for a in spec.attention)


def test_quantize_policy_leaves_the_input_model_untouched():
    from quantvla_core.config import preset
    from quantvla_core.models import build_model
    from quantvla_core.quant.quantize import quantize

    cfg = preset("tiny")
    model = build_model(cfg).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = quantize(
        model,
        QuantConfig(scheme="w8a8", calib_samples=2, atm=False, ohb=False),
        "synthetic",
        progress=False,
        report=False,
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.meta["float_check"]["ok"] and r.meta["fold_groups"]
    assert not math.isnan(r.meta["float_check"]["rel_error"])


def test_top_level_exports():
    import quantvla_core
    from quantvla_core import quant

    assert quantvla_core.quantize_ is quantize_ and quantvla_core.ArchSpec is ArchSpec
    assert quant.fold_smoothing_ is fold_smoothing_ and quant.QuantConfig is QuantConfig


def test_smolvla_builtin_spec_names_the_expert_attention():
    from conftest import tiny_smolvla_config
    from quantvla_core.models import build_model

    cfg = tiny_smolvla_config()
    spec = ArchSpec.builtin(build_model(cfg, device="meta"))
    assert spec.name == "smolvla"
    act = [a for a in spec.attention if a.part == "action"]
    assert [a.name for a in act] == [f"vlm_with_expert.lm_expert.layers.{i}.self_attn" for i in range(2)]
    assert all(a.heads == 2 and a.head_dim == 32 for a in act)
    assert spec.role("vlm_with_expert.lm_expert.layers.0.mlp.up_proj") == "dit_mlp"


class ForeignVLA(nn.Module):
    """A VLA the project has never seen: vision blocks, a language backbone and an action expert,
    each a stack of Gemma-2-style layers under names of its own."""

    def __init__(self, d=64):
        super().__init__()
        self.vision_tower = nn.ModuleDict({"patch": nn.Linear(48, d), "layers": nn.ModuleList([Gemma2Layer(d)])})
        self.language_model = nn.ModuleDict({"layers": nn.ModuleList([Gemma2Layer(d) for _ in range(2)])})
        self.action_expert = nn.ModuleDict(
            {
                "action_in": nn.Linear(7, d),
                "layers": nn.ModuleList([Gemma2Layer(d) for _ in range(2)]),
                "action_out": nn.Linear(d, 7),
            }
        )

    def forward(self, patches, noisy_actions):
        v = self.vision_tower["patch"](patches)
        for layer in self.vision_tower["layers"]:
            v = layer(v)
        for layer in self.language_model["layers"]:
            v = layer(v)
        a = torch.cat([v, self.action_expert["action_in"](noisy_actions)], 1)
        for layer in self.action_expert["layers"]:
            a = layer(a)
        return self.action_expert["action_out"](a[:, v.shape[1] :])


def test_foreign_vla_in_ten_lines():
    """The docs/quantize-any-model.md example, on a model with names of its own."""
    model = _randomize(ForeignVLA())
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(2, 9, 48, generator=g), torch.randn(2, 5, 7, generator=g)) for _ in range(4)]
    spec = ArchSpec.generic(model, backbone="language_model", action="action_expert", vision="vision_tower")
    report = quantize_(model, QuantConfig(scheme="w4a8", group_size=32), calib=calib, spec=spec)
    ints = set(report["integer_layers"])
    assert {n for n in ints if n.startswith("vision_tower")} == set()  # the quantvla layout keeps vision float
    assert "language_model.layers.0.self_attn.q_proj" in ints and "action_expert.layers.1.mlp.down_proj" in ints
    assert "action_expert.layers.0.self_attn.q_proj" not in ints  # action attention stays float (quantvla)
    assert set(report["alpha"]) == {f"action_expert.layers.{i}.self_attn" for i in range(2)}
    assert set(report["beta"]) == {f"action_expert.layers.{i}.self_attn.o_proj" for i in range(2)}
    # W4 on random tiny weights through five layers: 0.972 (w8a8 on the same model: 0.9998)
    assert report["fidelity"]["cosine_mean"] > 0.95 and report["float_check"]["ok"]


def test_quantized_foreign_model_round_trips_through_a_state_dict(tmp_path):
    """Saving: the state dict (codes, scales, folded norms) plus report["modules"]; loading:
    QuantLinears installed into a freshly built float model, then load_state_dict."""
    import json

    from quantvla_core.quant.artifact import install_quant_linears

    model = _randomize(TinyLM())
    calib = _calib()
    rep = quantize_(model, QuantConfig(scheme="w4a8", group_size=32), calib, ArchSpec.generic(model))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "modules.json").write_text(json.dumps(rep["modules"]))
    fresh = _randomize(TinyLM(), seed=7)
    install_quant_linears(fresh, json.loads((tmp_path / "modules.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "w.pt"), strict=True)
    with torch.no_grad():
        for x in calib:
            assert torch.equal(fresh(x), model(x))
