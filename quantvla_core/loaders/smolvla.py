"""SmolVLA weights (LeRobot layout) -> SmolVLAModel, with the config derived from the tensors.

Fixed by the architecture rather than read from shapes: SmolLM2 head_dim 64, SigLIP-B head_dim
64, RoPE base 10000 (SmolVLA's own rotary, not SmolLM2's), expert layer i paired with backbone
layer i and self-attention on even layers (self_attn_every_n_layers = 2).
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import CheckpointError
from ..config import DecoderConfig, ModelConfig
from .keymap import Rule, count_layers, need
from .paligemma import siglip_config

VLM = "vlm_with_expert.vlm.model"
TEXT = f"{VLM}.text_model"
EXPERT = "vlm_with_expert.lm_expert"
VISION = f"{VLM}.vision_model"
HEAD_DIM = 64
SIGLIP_B_HEAD_DIM = 64

RULES = [
    Rule(r"vlm_with_expert\.vlm\.model\.((?:vision_model|connector)\..+)", VLM + r".\1"),
    Rule(r"vlm_with_expert\.vlm\.model\.text_model\.((?:embed_tokens|layers|norm)\..+)", TEXT + r".\1"),
    Rule(r"vlm_with_expert\.vlm\.lm_head\.weight", None),  # the VLM's LM head is never used
    Rule(r"vlm_with_expert\.lm_expert\.((?:layers|norm)\..+)", EXPERT + r".\1"),
    Rule(
        r"((?:state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out)"
        r"\.(?:weight|bias))",
        r"\1",
    ),
    Rule(r".*\.position_ids", None),
    Rule(r"(?:normalize_inputs|normalize_targets|unnormalize_outputs)\..+", None),
]


def _llama(
    m: dict[str, torch.Tensor], prefix: str, vocab: int, what: str, source: str, self_layer: int = 0
) -> DecoderConfig:
    depth = count_layers(m, f"{prefix}.layers")
    if depth == 0:
        raise CheckpointError(f"{source}: no {what} layers ({prefix}.layers.N.*) in the checkpoint")
    q = need(m, f"{prefix}.layers.{self_layer}.self_attn.q_proj.weight", source, "SmolVLA")
    k = need(m, f"{prefix}.layers.{self_layer}.self_attn.k_proj.weight", source, "SmolVLA")
    gate = need(m, f"{prefix}.layers.0.mlp.gate_proj.weight", source, "SmolVLA")
    if q.shape[0] % HEAD_DIM or k.shape[0] % HEAD_DIM:
        raise CheckpointError(
            f"{source}: {what} q/k projections ({q.shape[0]}, {k.shape[0]} outputs) are not "
            f"multiples of SmolLM2's head_dim {HEAD_DIM}"
        )
    return DecoderConfig(
        width=q.shape[1],
        depth=depth,
        mlp=gate.shape[0],
        heads=q.shape[0] // HEAD_DIM,
        kv_heads=k.shape[0] // HEAD_DIM,
        head_dim=HEAD_DIM,
        vocab_size=vocab,
        rope_theta=10000.0,
        act="silu",
    )


def derive_config(
    m: dict[str, torch.Tensor],
    *,
    source: str,
    horizon: int,
    num_steps: int,
    max_cameras: int,
    max_text_tokens: int,
    name: str,
) -> ModelConfig:
    embed = need(m, f"{TEXT}.embed_tokens.weight", source, "SmolVLA")
    backbone = _llama(m, TEXT, embed.shape[0], "backbone", source)
    expert = _llama(m, EXPERT, embed.shape[0], "action expert", source)
    vision = siglip_config(m, VISION, SIGLIP_B_HEAD_DIM, source, "SmolVLA")
    proj = need(m, f"{VLM}.connector.modality_projection.proj.weight", source, "SmolVLA")
    ratio = proj.shape[1] // vision.width
    f = math.isqrt(ratio)
    if f * f * vision.width != proj.shape[1]:
        raise CheckpointError(
            f"{source}: connector input {proj.shape[1]} is not the vision width {vision.width} "
            "times a square pixel-shuffle factor"
        )
    vision.pixel_shuffle = f
    state = need(m, "state_proj.weight", source, "SmolVLA")
    action_in = need(m, "action_in_proj.weight", source, "SmolVLA")
    return ModelConfig(
        arch="smolvla",
        name=name,
        vision=vision,
        backbone=backbone,
        expert=expert,
        action_dim=action_in.shape[1],
        state_dim=state.shape[1],
        horizon=horizon,
        num_steps=num_steps,
        max_cameras=max_cameras,
        max_text_tokens=max_text_tokens,
    )
