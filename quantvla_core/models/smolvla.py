"""SmolVLA-like: SmolVLM backbone (SigLIP + pixel-shuffle connector + truncated Llama decoder)
and a narrower Llama action expert that alternates self- and cross-attention.

Why its own class: unlike pi0, SmolVLA's expert is narrower than the backbone and, on every
second layer, does not attend to the prefix K/V directly: its own k_proj/v_proj *re-project*
the backbone's (RoPE-applied) keys and values of that layer. The state is a prefix token (so it
is cached once per chunk) and the action tokens attend causally among themselves.

Layer i of the expert pairs with backbone layer i. Even layers ("self"): expert queries attend
to [prefix K/V; own K/V] exactly as in pi0. Odd layers ("cross"): expert queries, with RoPE
positions restarting at 0, attend to k_proj(prefix K), v_proj(prefix V) of that layer.
`velocity_joint` runs backbone and expert side by side over [prefix; suffix] (training path);
`encode_prefix` + `denoise_step` compute the same function from a prefix KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionMask, attention, attention_mask
from .base import Batch, FlowMatchingVLA, check_shared_attention, prefix_validity
from .layers import Decoder, RMSNorm, apply_rope, rope_cos_sin, sinusoidal_embedding
from .vision import SiglipVisionModel

LLAMA_RMS_EPS = 1e-5  # SmolLM2 (Llama) norm epsilon; Gemma uses 1e-6
SELF_ATTN_EVERY = 2  # SmolVLA default: layers 0, 2, 4, ... self-attend, the others cross-attend


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Idefics3 / SmolVLM space-to-depth: (B, S*S, D) -> (B, S*S / f^2, D * f^2).

    Groups of f consecutive columns are merged first, then groups of f rows, which fixes the
    feature order the connector's projection was trained with.
    """
    if factor == 1:
        return x
    b, n, d = x.shape
    side = math.isqrt(n)
    if side * side != n or side % factor:
        raise ValueError(f"pixel shuffle needs a square patch grid divisible by {factor}, got {n} patches")
    x = x.reshape(b, side, side // factor, d * factor)
    x = x.permute(0, 2, 1, 3).reshape(b, side // factor, side // factor, d * factor * factor)
    return x.permute(0, 2, 1, 3).reshape(b, n // (factor * factor), d * factor * factor)


@dataclass
class SmolPrefixCache:
    """Everything a denoising step reads but no step changes, computed once per chunk:
    per expert layer either a static K/V buffer (B, Hkv, Tp + Ts, D) holding the backbone's
    prefix K/V (self-attention layers write their suffix K/V into the tail in place) or the
    cross-attention K/V re-projected from the backbone's; the masks and the RoPE tables."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor  # (B, Tp) bool
    next_position: torch.Tensor  # (B,) long
    prefix_len: int = 0
    self_mask: AttentionMask | None = None
    cross_mask: AttentionMask | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


class Connector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.vision.pixel_shuffle
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(cfg.vision.width * f * f, cfg.backbone.width, bias=False)


class SmolVLMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(cfg.vision)
        self.connector = Connector(cfg)
        self.text_model = Decoder(cfg.backbone, embed=True, norm_offset=0.0)


class SmolVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = SmolVLMModel(cfg)


class SmolVLMWithExpert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vlm = SmolVLM(cfg)
        self.lm_expert = Decoder(cfg.expert, embed=False, norm_offset=0.0)
        bb, ex = cfg.backbone, cfg.expert
        for i, layer in enumerate(self.lm_expert.layers):
            if not is_self_attn_layer(i):  # cross layers read the backbone's K/V, not the expert's hidden
                layer.self_attn.k_proj = nn.Linear(bb.kv_heads * bb.head_dim, ex.kv_heads * ex.head_dim, bias=False)
                layer.self_attn.v_proj = nn.Linear(bb.kv_heads * bb.head_dim, ex.kv_heads * ex.head_dim, bias=False)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.eps = LLAMA_RMS_EPS


def is_self_attn_layer(i: int) -> bool:
    return i % SELF_ATTN_EVERY == 0


class SmolVLAModel(FlowMatchingVLA):
    noise_at_one = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        check_shared_attention(cfg)
        self.vlm_with_expert = SmolVLMWithExpert(cfg)
        w = cfg.expert.width
        self.state_proj = nn.Linear(cfg.state_dim, cfg.backbone.width)
        self.action_in_proj = nn.Linear(cfg.action_dim, w)
        self.action_out_proj = nn.Linear(w, cfg.action_dim)
        self.action_time_mlp_in = nn.Linear(2 * w, w)
        self.action_time_mlp_out = nn.Linear(w, w)

    @property
    def _vlm(self) -> SmolVLMModel:
        return self.vlm_with_expert.vlm.model

    @property
    def _expert(self) -> Decoder:
        return self.vlm_with_expert.lm_expert

    # -- prefix: [images; text; state] ------------------------------------------------------
    def encode_images(self, batch: Batch) -> torch.Tensor:
        b, c = batch.images.shape[:2]
        feats = self._vlm.vision_model(batch.images.flatten(0, 1))
        feats = pixel_shuffle(feats, self.cfg.vision.pixel_shuffle)
        feats = self._vlm.connector.modality_projection.proj(feats)
        feats = feats * math.sqrt(feats.shape[-1])  # SmolVLA scales image embeddings like text ones
        return feats.view(b, c * feats.shape[1], -1)

    def _prefix_embeddings(self, batch: Batch, image_tokens: torch.Tensor):
        """Embeddings, validity, RoPE positions and the prefix self-mask (B, Tp, Tp)."""
        lm = self._vlm.text_model
        text = lm.embed_tokens(batch.tokens) * math.sqrt(lm.cfg.width)
        state = self.state_proj(batch.state.to(image_tokens.dtype))[:, None]
        x = torch.cat([image_tokens, text.to(image_tokens.dtype), state], dim=1)
        b = x.shape[0]
        valid, positions = prefix_validity(batch, image_tokens, torch.ones(b, 1, dtype=torch.bool, device=x.device))
        # Images and text see each other, never the state; the state token sees everything.
        block = torch.zeros(x.shape[1], dtype=torch.long, device=x.device)
        block[-1] = 1
        mask = valid[:, None, :] & (block[None, :] <= block[:, None])[None]
        return x, valid, positions, mask

    def encode_prefix(self, batch: Batch, image_tokens: torch.Tensor) -> SmolPrefixCache:
        x, valid, positions, mask = self._prefix_embeddings(batch, image_tokens)
        _, kv = self._vlm.text_model(x, positions, mask[:, None], return_kv=True)
        b, tp, ts = x.shape[0], x.shape[1], self.cfg.horizon
        expert = self._expert
        per_layer = []
        for i, (layer, (k, v)) in enumerate(zip(expert.layers, kv)):
            if is_self_attn_layer(i):
                kb = k.new_empty(b, k.shape[1], tp + ts, k.shape[3])
                vb = v.new_empty(b, v.shape[1], tp + ts, v.shape[3])
                kb[:, :, :tp] = k
                vb[:, :, :tp] = v
                per_layer.append((kb, vb))
            else:
                per_layer.append(self._cross_kv(layer, k, v))
        causal = torch.ones(ts, ts, dtype=torch.bool, device=x.device).tril()
        prefix_vis = valid[:, None, :].expand(b, ts, -1)
        next_position = valid.long().sum(-1)
        suffix_positions = next_position[:, None] + torch.arange(ts, device=x.device)[None]
        return SmolPrefixCache(
            kv=per_layer,
            valid=valid,
            next_position=next_position,
            prefix_len=tp,
            self_mask=attention_mask(torch.cat([prefix_vis, causal[None].expand(b, -1, -1)], dim=-1)[:, None], x.dtype),
            cross_mask=attention_mask(prefix_vis[:, None], x.dtype),
            rope=rope_cos_sin(suffix_positions, expert.cfg.head_dim, expert.cfg.rope_theta, x.dtype),
        )

    # -- suffix: causal action tokens -------------------------------------------------------
    def _suffix(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.cfg.expert.width
        actions = self.action_in_proj(x_t)
        temb = sinusoidal_embedding(t, w).to(actions.dtype)[:, None].expand_as(actions)
        h = self.action_time_mlp_in(torch.cat([actions, temb], dim=-1))
        return self.action_time_mlp_out(F.silu(h))

    def _cross_kv(self, layer, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-project the backbone's K/V (B, Hkv, Tp, D) with the expert layer's k_proj/v_proj."""
        b, hkv, tp, d = k.shape
        attn = layer.self_attn
        flat = lambda y: y.transpose(1, 2).reshape(b, tp, hkv * d).to(attn.k_proj.weight.dtype)  # noqa: E731
        split = lambda y: y.view(b, tp, attn.kv_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
        return split(attn.k_proj(flat(k))), split(attn.v_proj(flat(v)))

    def _cross_query(self, layer, h: torch.Tensor) -> torch.Tensor:
        b, ts, _ = h.shape
        attn = layer.self_attn
        q = attn.q_proj(h).view(b, ts, attn.heads, attn.head_dim).transpose(1, 2)
        pos = torch.arange(ts, device=h.device)[None].expand(b, -1)  # expert positions restart at 0
        cos, sin = rope_cos_sin(pos, attn.head_dim, self.cfg.expert.rope_theta, h.dtype)
        return apply_rope(q, cos, sin)

    def denoise_step(
        self, cache: SmolPrefixCache, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        x = self._suffix(x_t, t)
        expert = self._expert
        cos, sin = cache.rope
        tp = cache.prefix_len
        for i, (layer, (kb, vb)) in enumerate(zip(expert.layers, cache.kv)):
            h = layer.input_layernorm(x)
            if is_self_attn_layer(i):
                q, k, v = layer.self_attn.qkv(h, cos, sin)
                kb[:, :, tp:] = k
                vb[:, :, tp:] = v
                x = layer.attend_finish(x, q, kb, vb, cache.self_mask, None, None)
            else:  # cross-attention K/V were re-projected once in encode_prefix
                x = layer.attend_finish(x, self._cross_query(layer, h), kb, vb, cache.cross_mask, None, None)
        x = expert.final_norm(x, None)
        return self.action_out_proj(x[:, -self.cfg.horizon :])

    def velocity_joint(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Backbone and expert side by side over [prefix; suffix], as in training."""
        xp, valid, pos_p, pmask = self._prefix_embeddings(batch, self.encode_images(batch))
        xs = self._suffix(x_t, t)
        b, tp, ts = xp.shape[0], xp.shape[1], xs.shape[1]
        dev = xs.device
        pos_s = valid.long().sum(-1)[:, None] + torch.arange(ts, device=dev)[None]
        causal = torch.ones(ts, ts, dtype=torch.bool, device=dev).tril()
        top = torch.cat([pmask, torch.zeros(b, tp, ts, dtype=torch.bool, device=dev)], dim=-1)
        bottom = torch.cat([valid[:, None, :].expand(b, ts, tp), causal[None].expand(b, -1, -1)], dim=-1)
        joint_mask = torch.cat([top, bottom], dim=1)[:, None]
        lm, expert = self._vlm.text_model, self._expert
        cp, sp = rope_cos_sin(pos_p, lm.cfg.head_dim, lm.cfg.rope_theta, xp.dtype)
        cs, ss = rope_cos_sin(pos_s, expert.cfg.head_dim, expert.cfg.rope_theta, xs.dtype)
        for i, (bl, el) in enumerate(zip(lm.layers, expert.layers)):
            hp, hs = bl.input_layernorm(xp), el.input_layernorm(xs)
            qp, kp, vp = bl.self_attn.qkv(hp, cp, sp)
            if is_self_attn_layer(i):
                qs, ks, vs = el.self_attn.qkv(hs, cs, ss)
                out = attention(
                    torch.cat([qp, qs], 2),
                    torch.cat([kp, ks], 2),
                    torch.cat([vp, vs], 2),
                    joint_mask,
                    name=el.self_attn.attn_name,
                )
                out = out.transpose(1, 2).reshape(b, tp + ts, -1)
                out_p, out_s = bl.self_attn.o_proj(out[:, :tp]), el.self_attn.o_proj(out[:, tp:])
            else:
                out_p = bl.self_attn.attend(qp, kp, vp, pmask[:, None])
                k, v = self._cross_kv(el, kp, vp)
                out_s = el.self_attn.attend(self._cross_query(el, hs), k, v, valid[:, None, None, :])
            xp = bl.finish(xp, out_p, None, None)
            xs = el.finish(xs, out_s, None, None)
        xs = expert.final_norm(xs, None)
        return self.action_out_proj(xs[:, -self.cfg.horizon :])
