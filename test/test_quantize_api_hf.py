"""quantize_ on tiny random models built from `transformers` configs (Llama, Qwen2, Qwen3, Gemma,
Gemma-2, Gemma-3, SmolLM = Llama layout): every proven fold keeps the float function (float64,
<= 1e-5 relative), the quantized model stays close, ATM/OHB land on the action block.
Skipped when `transformers` is not installed (requirements.txt pins it, installed --no-deps)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quantvla_core.quant.api import fold_smoothing_, quantize_  # noqa: E402
from quantvla_core.quant.qlinear import QuantLinear  # noqa: E402
from quantvla_core.quant.quantize import QuantConfig  # noqa: E402
from quantvla_core.quant.spec import ArchSpec  # noqa: E402

SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"attn_logit_softcapping": None, "final_logit_softcapping": None}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
}
# the MLP's input norm, by family: Gemma-2/3 normalise the attention output with
# post_attention_layernorm and feed the MLP from pre_feedforward_layernorm
MLP_NORM = {"gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm"}


def build(family, dtype=torch.float32, seed=0):
    cfg_name, cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**SIZES, **extra)
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"  # Gemma-2 has no sdpa path
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights (HF initialises them to 1 / 0)
        g = torch.Generator().manual_seed(seed + 1)
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0 if "gemma" in family else 1))
    return model.to(dtype)


def calib(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SIZES["vocab_size"], (2, 12), generator=g) for _ in range(n)]


def logits(model, batches):
    with torch.no_grad():
        return [model(b).logits for b in batches]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_proven_fold_keeps_the_float_function(family):
    model = build(family, torch.float64)
    batches = calib()
    ref = logits(model, batches)
    rep = fold_smoothing_(model, QuantConfig(scheme="w8a8", smooth_search=False, smooth_strength=0.5), batches)
    got = logits(model, batches)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
    assert rel <= 1e-5
    assert rep["float_check"]["ok"] and not rep["float_check"].get("undone")
    folds = {tuple(g["members"]): g for g in rep["groups"]}
    for i in range(2):
        pre = f"model.layers.{i}"
        qkv = folds[tuple(f"{pre}.self_attn.{c}_proj" for c in "qkv")]
        assert (qkv["fold"], qkv["target"]) == ("norm", f"{pre}.input_layernorm")
        mlp = folds[(f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj")]
        assert (mlp["fold"], mlp["target"]) == ("norm", f"{pre}.{MLP_NORM.get(family, 'post_attention_layernorm')}")
        assert mlp["offset"] == (1.0 if "gemma" in family else 0.0)
        down = folds[(f"{pre}.mlp.down_proj",)]
        assert (down["fold"], down["target"]) == ("producer", f"{pre}.mlp.up_proj")
        assert folds[(f"{pre}.self_attn.o_proj",)]["fold"] == "exact"
    assert len(rep["folded"]) == 12


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_quantized_hf_model_is_faithful_and_atm_ohb_land_on_the_action_block(family):
    model = build(family)
    batches = calib()
    ref = logits(model, batches)
    spec = ArchSpec.generic(model, action="model.layers.1")
    rep = quantize_(model, QuantConfig(scheme="w8a8", layout="llm+dit-all", group_size=None), batches, spec)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert not isinstance(model.lm_head, QuantLinear)
    assert rep["fidelity"]["cosine_mean"] > 0.999
    got = logits(model, batches)
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref)) < 0.05
    assert set(rep["beta"]) == {"model.layers.1.self_attn.o_proj"}
    if family == "qwen3":  # q_norm would undo the ATM scale
        assert rep["alpha"] == {} and "q_norm" in rep["atm_skipped"]["model.layers.1.self_attn"]
    else:
        assert set(rep["alpha"]) == {"model.layers.1.self_attn"} and len(rep["alpha"]["model.layers.1.self_attn"]) == 4


def test_w4a8_hf_model_with_bf16_weights_keeps_dtype_and_refuses_lossy_norm_folds():
    """bf16 Gemma: (1 + w) / s - 1 does not survive bf16 rounding where (1 + w) / s is small, so
    those norm folds are refused (smoothing stays in the quantization op) instead of silently
    changing the function. (W4 on random tiny weights: cosine ~0.97 in fp32 too.)"""
    model = build("gemma3", torch.bfloat16)
    batches = calib()
    rep = quantize_(model, QuantConfig(scheme="w4a8", group_size=32), batches)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert rep["float_check"]["ok"] and rep["float_check"]["rel_error"] < 0.02
    assert any("does not survive" in g["proof"] for g in rep["groups"])
    assert rep["fidelity"]["cosine_mean"] > 0.95
