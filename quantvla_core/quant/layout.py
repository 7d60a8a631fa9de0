"""The selective quantization layout, as data: per-architecture name rules -> roles -> precision.

Each linear gets a role from the first rule whose regex matches its qualified name:
``llm`` (language-backbone q/k/v/o/gate/up/down), ``dit_attn`` (action-head attention
projections), ``dit_mlp`` (action-head MLP linears) or ``float`` (everything else: vision,
projector, embeddings, norms incl. adaLN/adaRMS dense, time MLPs, state/action in/out, lm_head).
A named layout says which roles become integer. Rules are searched (not anchored at the start),
so the same rules hold for our reference models, openpi / LeRobot (``model.`` prefix, HF
``language_model.model.layers``) and GR00T N1.5 checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

ROLES = ("llm", "dit_attn", "dit_mlp", "vision", "float")

# Which roles are integer in each named layout. "quantvla" is the paper's selective layout.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "fp": (),
    "llm": ("llm",),
    "dit-all": ("dit_attn", "dit_mlp"),
    "dit-mlp": ("dit_mlp",),
    "llm+dit-all": ("llm", "dit_attn", "dit_mlp"),
    "llm+dit-mlp": ("llm", "dit_mlp"),
    "quantvla": ("llm", "dit_mlp"),
    "all": ("llm", "dit_attn", "dit_mlp", "vision", "float"),
}

_LLM_LINEAR = r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"

RULES: dict[str, list[tuple[str, str]]] = {
    # pi0 / pi0.5: PaliGemma backbone + Gemma action expert (openpi, LeRobot and ours).
    "pi0": [
        (r"(^|\.)lm_head$", "float"),
        (r"paligemma\.(model\.)?language_model\.(model\.)?" + _LLM_LINEAR, "llm"),
        (r"gemma_expert\.(model\.)?layers\.\d+\.self_attn\.(q|k|v|o)_proj$", "dit_attn"),
        (r"gemma_expert\.(model\.)?layers\.\d+\.mlp\.(gate|up|down)_proj$", "dit_mlp"),
        (r".*", "float"),
    ],
    # GR00T N1.5: Eagle (Qwen3) backbone + DiT action head (ours and NVIDIA's names).
    "groot": [
        (r"(^|\.)lm_head$", "float"),
        (r"eagle_model\.language_model\.(model\.)?" + _LLM_LINEAR, "llm"),
        (r"action_head\.model\.transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$", "dit_attn"),
        (r"action_head\.model\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$", "dit_mlp"),
        (r".*", "float"),
    ],
    # SmolVLA (LeRobot): SmolVLM2 text model + lm_expert.
    "smolvla": [
        (r"(^|\.)lm_head$", "float"),
        (r"vlm\.model\.text_model\.(model\.)?" + _LLM_LINEAR, "llm"),
        (r"lm_expert\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$", "dit_attn"),
        (r"lm_expert\.layers\.\d+\.mlp\.(gate|up|down)_proj$", "dit_mlp"),
        (r".*", "float"),
    ],
}
RULES["pi05"] = RULES["pi0"]

# Attention modules of the action head (ATM / OHB targets): regex -> (q child, o child).
ACTION_ATTENTION: dict[str, tuple[str, str, str]] = {
    "pi0": (r"gemma_expert\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
    "pi05": (r"gemma_expert\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
    "groot": (r"action_head\.model\.transformer_blocks\.\d+\.attn1$", "to_q", "to_out.0"),
    "smolvla": (r"lm_expert\.layers\.\d+\.self_attn$", "q_proj", "o_proj"),
}
BACKBONE_ATTENTION: dict[str, tuple[str, str, str]] = {
    "pi0": (r"paligemma\.(model\.)?language_model\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
    "pi05": (r"paligemma\.(model\.)?language_model\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
    "groot": (r"eagle_model\.language_model\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
    "smolvla": (r"vlm\.model\.text_model\.(model\.)?layers\.\d+\.self_attn$", "q_proj", "o_proj"),
}
# Action-head MLP output linears (optional OHB on down projections).
ACTION_MLP_OUT: dict[str, str] = {
    "pi0": r"gemma_expert\.(model\.)?layers\.\d+\.mlp\.down_proj$",
    "pi05": r"gemma_expert\.(model\.)?layers\.\d+\.mlp\.down_proj$",
    "groot": r"action_head\.model\.transformer_blocks\.\d+\.ff\.net\.2$",
    "smolvla": r"lm_expert\.layers\.\d+\.mlp\.down_proj$",
}


def check_arch(arch: str) -> str:
    if arch not in RULES:
        raise ValueError(f"no layout rules for arch {arch!r}; accepted: {', '.join(sorted(RULES))}")
    return arch


def layout_roles(layout: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Roles made integer by a named layout, or an explicit tuple of roles."""
    if isinstance(layout, (tuple, list)):
        bad = [r for r in layout if r not in ROLES]
        if bad:
            raise ValueError(f"unknown roles {bad} in layout; accepted: {', '.join(ROLES)}")
        return tuple(layout)
    return LAYOUTS[check_layout(layout)]


def check_layout(layout: str) -> str:
    if isinstance(layout, (tuple, list)):
        layout_roles(layout)
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    return layout


def role_of(name: str, arch: str, rules: list[tuple[str, str]] | None = None) -> str:
    """Role of one linear by its qualified name (first matching rule wins)."""
    for pattern, role in rules if rules is not None else RULES[check_arch(arch)]:
        if re.search(pattern, name):
            return role
    return "float"


def is_linear(module: nn.Module) -> bool:
    from .qlinear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


@dataclass
class LayoutEntry:
    name: str
    role: str
    integer: bool
    in_features: int
    out_features: int


def plan(
    names_and_shapes: list[tuple[str, int, int]],
    arch: str,
    layout: str = "quantvla",
    rules: list[tuple[str, str]] | None = None,
) -> list[LayoutEntry]:
    """Layout decision for a list of (name, in_features, out_features) linears."""
    check_layout(layout)
    roles = LAYOUTS[layout]
    out = []
    for name, k, n in names_and_shapes:
        role = role_of(name, arch, rules)
        out.append(LayoutEntry(name, role, role in roles, k, n))
    return out


def linear_names(model: nn.Module) -> list[tuple[str, int, int]]:
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules() if is_linear(m)]


def plan_model(
    model: nn.Module, arch: str, layout: str = "quantvla", rules: list[tuple[str, str]] | None = None
) -> list[LayoutEntry]:
    """Layout decision for every nn.Linear / QuantLinear in a model."""
    return plan(linear_names(model), arch, layout, rules)


def detect_arch(model: nn.Module) -> str:
    """Arch from ``model.config.arch`` or, failing that, from characteristic module names."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "arch", None) in RULES:
        return cfg.arch
    names = [n for n, _ in model.named_modules()]
    if any("time_mlp_in" in n for n in names) and any("gemma_expert" in n for n in names):
        return "pi05"
    if any("gemma_expert" in n for n in names):
        return "pi0"
    if any("action_head.model.transformer_blocks" in n for n in names):
        return "groot"
    if any("lm_expert" in n for n in names):
        return "smolvla"
    raise ValueError("cannot tell the architecture from the module names; accepted archs: " + ", ".join(sorted(RULES)))
