"""Reference VLA models: pi0, pi0.5 (PI0Model) and GR00T-style (GR00TModel)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import name_attention_modules
from .base import Batch, FlowMatchingVLA
from .groot import GR00TModel
from .groot_n15 import GR00TN15Model
from .layers import AdaRMSNorm
from .pi0 import PI0Model
from .smolvla import SmolVLAModel

__all__ = [
    "Batch",
    "FlowMatchingVLA",
    "PI0Model",
    "GR00TModel",
    "GR00TN15Model",
    "SmolVLAModel",
    "build_model",
    "component_of",
    "COMPONENTS",
]

COMPONENTS = ("vision", "backbone", "expert", "other")

_COMPONENT_PREFIXES = (
    ("paligemma_with_expert.paligemma.model.vision_tower.", "vision"),
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.", "vision"),
    ("paligemma_with_expert.paligemma.model.language_model.", "backbone"),
    ("paligemma_with_expert.gemma_expert.", "expert"),
    ("backbone.eagle_model.vision_model.", "vision"),
    ("backbone.eagle_model.mlp1.", "vision"),
    ("backbone.eagle_model.language_model.", "backbone"),
    ("action_head.", "expert"),
    ("vlm_with_expert.vlm.model.vision_model.", "vision"),
    ("vlm_with_expert.vlm.model.connector.", "vision"),
    ("vlm_with_expert.vlm.model.text_model.", "backbone"),
    ("vlm_with_expert.lm_expert.", "expert"),
)


def component_of(name: str) -> str:
    """Which component a parameter/module belongs to: vision, backbone, expert (action head), other."""
    for prefix, comp in _COMPONENT_PREFIXES:
        if name.startswith(prefix) or name + "." == prefix:
            return comp
    return "other"


def build_model(
    cfg: ModelConfig, *, seed: int | None = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FlowMatchingVLA:
    """Build the model a config describes (arch + variant, e.g. GR00T N1.5 for a real checkpoint's
    artifact). device='meta' allocates nothing (shape/memory accounting, loading real weights)."""
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        if cfg.variant == "n15":
            model: nn.Module = GR00TN15Model(cfg)
        else:
            model = {"groot": GR00TModel, "smolvla": SmolVLAModel}.get(cfg.arch, PI0Model)(cfg)
    if str(device) != "meta":
        _init_weights(model)
    name_attention_modules(model)
    return model.to(dtype=dtype).eval()


def _init_weights(model: nn.Module) -> None:
    """Small truncated-normal linears, so random models produce finite, non-trivial actions."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=min(0.02, 1.0 / m.in_features**0.5))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
    for m in model.modules():
        if isinstance(m, AdaRMSNorm):  # gates open at init so the expert's layers contribute
            with torch.no_grad():
                m.dense.bias[2 * m.dense.out_features // 3 :] = 1.0
