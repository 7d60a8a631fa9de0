"""GR00T N1.5 as the real checkpoints compute it (config variant "n15").

The reference GR00TModel keeps N1.5's module names but simplifies a few computations; this
subclass swaps in modules with the same parameter names and the original maths (read from
LeRobot 0.4.4's port of Isaac-GR00T). It lives with the models, not the loaders, so that
`build_model` rebuilds it from a saved config (quantized artifacts, derived model dirs):
- Qwen3 attention: per-head RMSNorm `q_norm` / `k_norm` on queries and keys before RoPE;
- Eagle 2.5 connector: pixel shuffle (factor `vision.pixel_shuffle`) then `mlp1` = LayerNorm,
  Linear, GELU, Linear on f^2 x the vision width; VL features = the LLM output after its final
  norm (`hidden_states[12]` for the 12 kept layers);
- DiT timestep encoder: diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`;
- action encoder: sinusoidal encoding [sin, cos] with frequencies exp(-ln(1e4) i / (w/2));
- vl_self_attention blocks: affine `norm3`.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, ModelConfig
from .attention import name_attention_modules
from .base import Batch, prefix_validity
from .groot import ActionEncoder, GR00TModel, TimestepEncoder
from .layers import DecoderAttention, RMSNorm, apply_rope
from .smolvla import pixel_shuffle


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
    """GR00TModel with the modules above swapped in (same parameter names as the checkpoint).

    `embodiment_id` overrides `cfg.dit.embodiment_id` (the model's cfg then records it)."""

    def __init__(self, cfg: ModelConfig, embodiment_id: int | None = None):
        if embodiment_id is not None or cfg.variant != "n15":  # dataclasses.replace re-validates
            dit = dataclasses.replace(cfg.dit, embodiment_id=cfg.dit.embodiment_id if embodiment_id is None
                                      else embodiment_id)
            cfg = dataclasses.replace(cfg, dit=dit, variant="n15")
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
        name_attention_modules(self)

    @property
    def embodiment_id(self) -> int:
        return self.cfg.dit.embodiment_id

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
        valid, positions = prefix_validity(batch, image_tokens)
        t = x.shape[1]
        mask = (torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None] & valid[:, None, :])[:, None]
        feats = lm.final_norm(lm(x, positions, mask), None)  # hidden_states[12]: after the final norm
        ah = self.action_head
        feats = ah.vlln(feats)
        for blk in ah.vl_self_attention.transformer_blocks:
            feats = blk(feats, mask=valid[:, None, None, :])
        return feats, valid
