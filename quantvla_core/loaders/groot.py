"""GR00T N1.5 (LeRobot `groot` directories) -> a GR00T N1.5 model with the real checkpoint's numerics.

The weights map by name onto GR00TN15Model (models/groot_n15.py: Qwen3 q/k norms, Eagle pixel
shuffle connector, final-norm VL features, diffusers timestep / action-encoder embeddings,
affine norm3); the derived config records `variant="n15"` and the robot's embodiment id so that
`build_model` rebuilds the same model from a saved config (quantized artifacts, model dirs).
The Eagle 2.5 chat template (text.eagle_prompt) and image processor (imaging.eagle_image) are
applied by ExternalIO (the policy's `io`); the config's `image_token_id` makes the model put each present
camera's image tokens in place of its `<IMG_CONTEXT>` run inside the templated prompt, as
Eagle 2.5 does (see docs/real-checkpoints.md).
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import CheckpointError
from ..config import DecoderConfig, DiTConfig, ModelConfig
from ..models.groot_n15 import GR00TN15Model, Qwen3Attention, diffusers_timesteps
from .keymap import Rule, count_layers, need
from .paligemma import SIGLIP_SO400M_HEAD_DIM, siglip_config

# the N1.5 modules moved to models/groot_n15.py; still importable from here
__all__ = ["RULES", "EMBODIMENTS", "derive_config", "GR00TN15Model", "Qwen3Attention", "diffusers_timesteps"]

EAGLE = "backbone.eagle_model"
LM = f"{EAGLE}.language_model.model"
VISION = f"{EAGLE}.vision_model.vision_model"
DIT = "action_head.model"
DIT_HEAD_DIM = 48  # N1.5 diffusion_model_cfg: 32 heads x 48
QWEN3_ROPE_THETA = 1_000_000.0
# Eagle 2.5's <IMG_CONTEXT> id in GR00T N1.5's tokenizer (its `image_token_index`). To the model it is
# only a marker: placeholder positions are never looked up in the embedding, and ExternalIO writes
# this id at the positions where the user's tokenizer put <IMG_CONTEXT>, whatever that tokenizer's id.
EAGLE_IMAGE_TOKEN_ID = 151669
EMBODIMENTS = {"new_embodiment": 31, "oxe_droid": 17, "agibot_genie1": 26, "gr1": 24, "so100": 2, "unitree_g1": 3}

RULES = [
    Rule(r".*vision_model\.head\..+", None),  # SigLIP pooling head: Eagle uses the patch tokens
    Rule(r"backbone\.eagle_model\.((?:vision_model|mlp1)\..+)", EAGLE + r".\1"),
    Rule(r"backbone\.eagle_model\.language_model\.model\.((?:embed_tokens|layers|norm)\..+)", LM + r".\1"),
    Rule(r"backbone\.eagle_model\.language_model\.lm_head\.weight", None),
    Rule(
        r"(action_head\.(?:vlln|vl_self_attention|model|state_encoder|action_encoder|action_decoder"
        r"|position_embedding|future_tokens)\..+)",
        r"\1",
    ),
    Rule(r".*\.position_ids", None),
]


def derive_config(
    m: dict[str, torch.Tensor],
    *,
    source: str,
    horizon: int,
    num_steps: int,
    max_cameras: int,
    max_text_tokens: int,
    name: str,
    embodiment_id: int = 0,
    image_token_id: int | None = None,
) -> ModelConfig:
    """The N1.5 config of mapped tensors `m`. With `image_token_id` (image tokens placed inside the
    prompt) `max_text_tokens` is the budget for the templated text and the config's own
    max_text_tokens adds `max_cameras` runs of image placeholders to it."""
    fmt = "GR00T N1.5"
    embed = need(m, f"{LM}.embed_tokens.weight", source, fmt)
    q = need(m, f"{LM}.layers.0.self_attn.q_proj.weight", source, fmt)
    k = need(m, f"{LM}.layers.0.self_attn.k_proj.weight", source, fmt)
    qn = need(m, f"{LM}.layers.0.self_attn.q_norm.weight", source, fmt)
    gate = need(m, f"{LM}.layers.0.mlp.gate_proj.weight", source, fmt)
    hd = qn.shape[0]
    backbone = DecoderConfig(
        width=q.shape[1],
        depth=count_layers(m, f"{LM}.layers"),
        mlp=gate.shape[0],
        heads=q.shape[0] // hd,
        kv_heads=k.shape[0] // hd,
        head_dim=hd,
        vocab_size=embed.shape[0],
        rope_theta=QWEN3_ROPE_THETA,
        act="silu",
    )
    vision = siglip_config(m, VISION, SIGLIP_SO400M_HEAD_DIM, source, fmt)
    ln = need(m, f"{EAGLE}.mlp1.0.weight", source, fmt)
    f = math.isqrt(ln.shape[0] // vision.width)
    if f * f * vision.width != ln.shape[0]:
        raise CheckpointError(
            f"{source}: mlp1 input {ln.shape[0]} is not the vision width {vision.width} times a "
            "square pixel-shuffle factor"
        )
    vision.pixel_shuffle = f
    to_q = need(m, f"{DIT}.transformer_blocks.0.attn1.to_q.weight", source, fmt)
    ff = need(m, f"{DIT}.transformer_blocks.0.ff.net.0.proj.weight", source, fmt)
    se = need(m, "action_head.state_encoder.layer1.W", source, fmt)
    ae = need(m, "action_head.action_encoder.W1.W", source, fmt)
    fut = need(m, "action_head.future_tokens.weight", source, fmt)
    if to_q.shape[0] % DIT_HEAD_DIM:
        raise CheckpointError(
            f"{source}: DiT width {to_q.shape[0]} is not a multiple of N1.5's head_dim {DIT_HEAD_DIM}"
        )
    dit = DiTConfig(
        width=to_q.shape[0],
        depth=count_layers(m, f"{DIT}.transformer_blocks"),
        heads=to_q.shape[0] // DIT_HEAD_DIM,
        head_dim=DIT_HEAD_DIM,
        mlp=ff.shape[0],
        vl_self_attention_depth=count_layers(m, "action_head.vl_self_attention.transformer_blocks"),
        num_future_tokens=fut.shape[0],
        num_embodiments=se.shape[0],
        hidden=se.shape[2],
    )
    if not 0 <= embodiment_id < dit.num_embodiments:
        raise CheckpointError(
            f"{source}: embodiment id {embodiment_id} outside the checkpoint's "
            f"{dit.num_embodiments} embodiment projectors"
        )
    dit.embodiment_id = embodiment_id
    cfg = ModelConfig(
        arch="groot",
        name=name,
        vision=vision,
        backbone=backbone,
        dit=dit,
        action_dim=ae.shape[1],
        state_dim=se.shape[1],
        horizon=horizon,
        num_steps=num_steps,
        max_cameras=max_cameras,
        max_text_tokens=max_text_tokens,
        variant="n15",
        image_token_id=image_token_id,
    )
    if image_token_id is not None:
        cfg.max_text_tokens += max_cameras * cfg.num_image_tokens
    return cfg
