"""GR00T N1.5 (LeRobot `groot` directories) -> a GR00T model with the real checkpoint's numerics.

The reference GR00TModel keeps the module names of N1.5 but simplifies a few computations. For
real weights this file swaps in modules with the same parameter names and the original maths
(read from LeRobot 0.4.4's port of Isaac-GR00T):
- Qwen3 attention: per-head RMSNorm `q_norm` / `k_norm` on queries and keys before RoPE;
- Eagle 2.5 connector: pixel shuffle (downsample 0.5) then `mlp1` = LayerNorm, Linear, GELU,
  Linear on 4x the vision width; VL features = the 12-layer LLM output after its final norm
  (`hidden_states[12]`);
- DiT timestep encoder: diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`;
- action encoder: sinusoidal encoding [sin, cos] with frequencies exp(-ln(1e4) i / (w/2));
- vl_self_attention blocks: affine `norm3`.
Not reproduced (so actions differ from the original): the Eagle chat template with image
context tokens interleaved in the text (here: [images; tokens(str([task]))]) and Eagle's own
image resizing (here: resize-with-pad to the vision resolution).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..config import DecoderConfig, DiTConfig, ModelConfig
from ..models.attention import name_attention_modules
from ..models.base import Batch
from ..models.groot import ActionEncoder, GR00TModel, TimestepEncoder
from ..models.layers import DecoderAttention, RMSNorm, apply_rope
from ..models.smolvla import pixel_shuffle
from .keymap import Rule, count_layers, need
from .paligemma import SIGLIP_SO400M_HEAD_DIM, siglip_config

EAGLE = "backbone.eagle_model"
LM = f"{EAGLE}.language_model.model"
VISION = f"{EAGLE}.vision_model.vision_model"
DIT = "action_head.model"
DIT_HEAD_DIM = 48  # N1.5 diffusion_model_cfg: 32 heads x 48
QWEN3_ROPE_THETA = 1_000_000.0
EMBODIMENTS = {"new_embodiment": 31, "oxe_droid": 17, "agibot_genie1": 26, "gr1": 24, "so100": 2, "unitree_g1": 3}

RULES = [
    Rule(r".*vision_model\.head\..+", None),  # SigLIP pooling head: Eagle uses the patch tokens
    Rule(r"backbone\.eagle_model\.((?:vision_model|mlp1)\..+)", EAGLE + r".\1"),
    Rule(r"backbone\.eagle_model\.language_model\.model\.((?:embed_tokens|layers|norm)\..+)", LM + r".\1"),
    Rule(r"backbone\.eagle_model\.language_model\.lm_head\.weight", None),
    Rule(r"(action_head\.(?:vlln|vl_self_attention|model|state_encoder|action_encoder|action_decoder"
         r"|position_embedding|future_tokens)\..+)", r"\1"),
    Rule(r".*\.position_ids", None),
]


class Qwen3Attention(DecoderAttention):
    """GQA attention with Qwen3's per-head RMSNorm on queries and keys (before RoPE)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-6, offset=0.0)
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-6, offset=0.0)

    def qkv(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def diffusers_timesteps(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class N15TimestepEncoder(TimestepEncoder):
    def forward(self, t_disc: torch.Tensor) -> torch.Tensor:
        e = self.timestep_embedder
        x = diffusers_timesteps(t_disc).to(e.linear_1.weight.dtype)
        return e.linear_2(F.silu(e.linear_1(x)))


class N15ActionEncoder(ActionEncoder):
    def forward(self, actions, t_disc, cat):
        a = self.W1(actions, cat)
        half = self.width // 2
        freqs = torch.exp(-torch.arange(half, device=a.device, dtype=torch.float32) * (math.log(10000.0) / half))
        ang = t_disc.float()[:, None] * freqs[None]
        temb = torch.cat([ang.sin(), ang.cos()], dim=-1).to(a.dtype)[:, None].expand_as(a)
        return self.W3(F.silu(self.W2(torch.cat([a, temb], dim=-1), cat)), cat)


class GR00TN15Model(GR00TModel):
    """GR00TModel with the modules above swapped in (same parameter names as the checkpoint)."""

    def __init__(self, cfg: ModelConfig, embodiment_id: int = 0):
        super().__init__(cfg)
        for layer in self.backbone.eagle_model.language_model.model.layers:
            layer.self_attn = Qwen3Attention(cfg.backbone)
        vw, bw, f = cfg.vision.width, cfg.backbone.width, cfg.vision.pixel_shuffle
        self.backbone.eagle_model.mlp1 = nn.Sequential(nn.LayerNorm(vw * f * f), nn.Linear(vw * f * f, bw), nn.GELU(),
                                                       nn.Linear(bw, bw))
        ah = self.action_head
        ah.model.timestep_encoder.__class__ = N15TimestepEncoder
        ah.action_encoder.__class__ = N15ActionEncoder
        for blk in ah.vl_self_attention.transformer_blocks:
            blk.norm3 = nn.LayerNorm(bw, eps=1e-5)
        if not 0 <= embodiment_id < cfg.dit.num_embodiments:
            raise CheckpointError(f"embodiment id {embodiment_id} outside the checkpoint's "
                                  f"{cfg.dit.num_embodiments} embodiment projectors")
        self.embodiment_id = embodiment_id
        name_attention_modules(self)

    def _cat(self, b: int, device) -> torch.Tensor:
        return torch.full((b,), self.embodiment_id, dtype=torch.long, device=device)

    def encode_images(self, batch: Batch) -> torch.Tensor:
        b, c = batch.images.shape[:2]
        em = self.backbone.eagle_model
        feats = pixel_shuffle(em.vision_model(batch.images.flatten(0, 1)), self.cfg.vision.pixel_shuffle)
        feats = em.mlp1(feats)
        return feats.view(b, c * feats.shape[1], -1)

    def _vl_features(self, batch: Batch, image_tokens: torch.Tensor):
        lm = self.backbone.eagle_model.language_model.model
        x = torch.cat([image_tokens, lm.embed_tokens(batch.tokens).to(image_tokens.dtype)], dim=1)
        per_image = image_tokens.shape[1] // batch.image_mask.shape[1]
        valid = torch.cat([batch.image_mask.repeat_interleave(per_image, dim=1), batch.token_mask], dim=1)
        t = x.shape[1]
        mask = (torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None] & valid[:, None, :])[:, None]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        feats = lm.final_norm(lm(x, positions, mask), None)  # hidden_states[12]: after the final norm
        ah = self.action_head
        feats = ah.vlln(feats)
        for blk in ah.vl_self_attention.transformer_blocks:
            feats = blk(feats, mask=valid[:, None, None, :])
        return feats, valid


def derive_config(m: dict[str, torch.Tensor], *, source: str, horizon: int, num_steps: int, max_cameras: int,
                  max_text_tokens: int, name: str) -> ModelConfig:
    fmt = "GR00T N1.5"
    embed = need(m, f"{LM}.embed_tokens.weight", source, fmt)
    q = need(m, f"{LM}.layers.0.self_attn.q_proj.weight", source, fmt)
    k = need(m, f"{LM}.layers.0.self_attn.k_proj.weight", source, fmt)
    qn = need(m, f"{LM}.layers.0.self_attn.q_norm.weight", source, fmt)
    gate = need(m, f"{LM}.layers.0.mlp.gate_proj.weight", source, fmt)
    hd = qn.shape[0]
    backbone = DecoderConfig(width=q.shape[1], depth=count_layers(m, f"{LM}.layers"), mlp=gate.shape[0],
                             heads=q.shape[0] // hd, kv_heads=k.shape[0] // hd, head_dim=hd,
                             vocab_size=embed.shape[0], rope_theta=QWEN3_ROPE_THETA, act="silu")
    vision = siglip_config(m, VISION, SIGLIP_SO400M_HEAD_DIM, source, fmt)
    ln = need(m, f"{EAGLE}.mlp1.0.weight", source, fmt)
    f = math.isqrt(ln.shape[0] // vision.width)
    if f * f * vision.width != ln.shape[0]:
        raise CheckpointError(f"{source}: mlp1 input {ln.shape[0]} is not the vision width {vision.width} times a "
                              "square pixel-shuffle factor")
    vision.pixel_shuffle = f
    to_q = need(m, f"{DIT}.transformer_blocks.0.attn1.to_q.weight", source, fmt)
    ff = need(m, f"{DIT}.transformer_blocks.0.ff.net.0.proj.weight", source, fmt)
    se = need(m, "action_head.state_encoder.layer1.W", source, fmt)
    ae = need(m, "action_head.action_encoder.W1.W", source, fmt)
    fut = need(m, "action_head.future_tokens.weight", source, fmt)
    if to_q.shape[0] % DIT_HEAD_DIM:
        raise CheckpointError(f"{source}: DiT width {to_q.shape[0]} is not a multiple of N1.5's head_dim "
                              f"{DIT_HEAD_DIM}")
    dit = DiTConfig(width=to_q.shape[0], depth=count_layers(m, f"{DIT}.transformer_blocks"),
                    heads=to_q.shape[0] // DIT_HEAD_DIM, head_dim=DIT_HEAD_DIM, mlp=ff.shape[0],
                    vl_self_attention_depth=count_layers(m, "action_head.vl_self_attention.transformer_blocks"),
                    num_future_tokens=fut.shape[0], num_embodiments=se.shape[0], hidden=se.shape[2])
    return ModelConfig(arch="groot", name=name, vision=vision, backbone=backbone, dit=dit, action_dim=ae.shape[1],
                       state_dim=se.shape[1], horizon=horizon, num_steps=num_steps, max_cameras=max_cameras,
                       max_text_tokens=max_text_tokens)
