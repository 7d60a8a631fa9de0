"""pi0 / pi0.5: PaliGemma-like backbone + Gemma-like action expert sharing attention.

Training runs one joint attention over [prefix; suffix] per layer (`velocity_joint`).
Inference fills a KV cache with the prefix once per chunk (`encode_prefix`), then every
denoising step runs only the expert, whose queries attend to [cached prefix K/V; own K/V]
(`denoise_step`). The block mask makes the two paths compute the same function.
pi0: suffix = state token + action tokens, time mixed into the action tokens by an MLP.
pi0.5: suffix = action tokens only; time conditions the expert through adaRMS norms with
gated residuals; state is written into the prompt by the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionMask, attention_mask
from .base import Batch, FlowMatchingVLA, check_shared_attention, prefix_validity
from .layers import Decoder, rope_cos_sin, sinusoidal_embedding
from .vision import VisionTower


@dataclass
class PrefixCache:
    """Static KV cache: per layer K/V buffers (B, Hkv, Tp + Ts, D) holding the prefix in
    [:Tp]; every denoising step writes its own suffix K/V into [Tp:] in place, so no step
    copies the prefix (and the buffers keep fixed addresses for CUDA graphs)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    valid: torch.Tensor  # (B, Tp) bool
    next_position: torch.Tensor  # (B,) long
    prefix_len: int
    # What every denoising step needs but no step changes: the suffix attention mask and RoPE.
    suffix_mask: AttentionMask | None = None  # (B, 1, Ts, Tp + Ts)
    suffix_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # prepare_steps: each step's t tensor -> its time condition (pi0: the time embedding;
    # pi0.5: the adaRMS Conditioning), computed for all steps at once
    time_conditions: dict | None = None


class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear = nn.Linear(cfg.vision.width, cfg.backbone.width)
        self.language_model = Decoder(cfg.backbone, embed=True)


class PaliGemma(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = PaliGemmaModel(cfg)


class GemmaExpert(nn.Module):
    def __init__(self, cfg: ModelConfig, cond_dim: int | None):
        super().__init__()
        self.model = Decoder(cfg.expert, embed=False, cond_dim=cond_dim)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: ModelConfig, cond_dim: int | None):
        super().__init__()
        self.paligemma = PaliGemma(cfg)
        self.gemma_expert = GemmaExpert(cfg, cond_dim)


class PI0Model(FlowMatchingVLA):
    noise_at_one = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        check_shared_attention(cfg)
        self.pi05 = cfg.arch == "pi05"
        w = cfg.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(cfg, cond_dim=w if self.pi05 else None)
        self.action_in_proj = nn.Linear(cfg.action_dim, w)
        self.action_out_proj = nn.Linear(w, cfg.action_dim)
        if self.pi05:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)
        else:
            self.state_proj = nn.Linear(cfg.state_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)

    # -- handy views ---------------------------------------------------------------------
    @property
    def _pg(self) -> PaliGemmaModel:
        return self.paligemma_with_expert.paligemma.model

    @property
    def _expert(self) -> Decoder:
        return self.paligemma_with_expert.gemma_expert.model

    # -- prefix ----------------------------------------------------------------------------
    def encode_images(self, batch: Batch) -> torch.Tensor:
        b, c = batch.images.shape[:2]
        feats = self._pg.vision_tower(batch.images.flatten(0, 1))
        feats = self._pg.multi_modal_projector.linear(feats)
        return feats.view(b, c * feats.shape[1], -1)

    def _prefix_embeddings(self, batch: Batch, image_tokens: torch.Tensor):
        lm = self._pg.language_model
        text = lm.embed_tokens(batch.tokens) * math.sqrt(lm.cfg.width)
        x = torch.cat([image_tokens, text.to(image_tokens.dtype)], dim=1)
        valid, positions = prefix_validity(batch, image_tokens)
        return x, valid, positions

    def encode_prefix(self, batch: Batch, image_tokens: torch.Tensor) -> PrefixCache:
        x, valid, positions = self._prefix_embeddings(batch, image_tokens)
        mask = valid[:, None, None, :]
        _, kv = self._pg.language_model(x, positions, mask, return_kv=True)
        tp, ts = x.shape[1], self.cfg.horizon + (0 if self.pi05 else 1)
        static = []
        for k, v in kv:
            kb = k.new_empty(k.shape[0], k.shape[1], tp + ts, k.shape[3])
            vb = v.new_empty(v.shape[0], v.shape[1], tp + ts, v.shape[3])
            kb[:, :, :tp] = k
            vb[:, :, :tp] = v
            static.append((kb, vb))
        cache = PrefixCache(kv=static, valid=valid, next_position=valid.long().sum(-1), prefix_len=tp)
        b = x.shape[0]
        positions = cache.next_position[:, None] + torch.arange(ts, device=x.device)[None]
        keep = torch.cat(
            [valid[:, None, :].expand(b, ts, -1), self._suffix_self_mask(ts, x.device)[None].expand(b, -1, -1)], dim=-1
        )[:, None]
        cache.suffix_mask = attention_mask(keep, x.dtype)
        expert = self._expert
        cache.suffix_rope = rope_cos_sin(positions, expert.cfg.head_dim, expert.cfg.rope_theta, x.dtype)
        return cache

    def _suffix_self_mask(self, ts: int, device) -> torch.Tensor:
        """pi0.5: actions attend to each other. pi0: the state token sees only itself; action
        tokens see the state and all actions (pi0's ar-mask blocks)."""
        mask = torch.ones(ts, ts, dtype=torch.bool, device=device)
        if not self.pi05:
            mask[0, 1:] = False
        return mask

    # -- suffix ----------------------------------------------------------------------------
    def _time_condition(self, t: torch.Tensor, dtype: torch.dtype):
        """What a step derives from its flow time alone: pi0 the time embedding, pi0.5 the
        adaRMS condition (with every norm's modulation where it can: a `Conditioning`)."""
        temb = sinusoidal_embedding(t, self.cfg.expert.width).to(dtype)
        if not self.pi05:
            return temb
        return self._expert.conditioning(F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb)))))

    def prepare_steps(self, cache: PrefixCache, times: list[torch.Tensor]) -> None:
        if torch.is_grad_enabled() or not times:
            return  # training runs velocity_joint; nothing to share
        cond = self._time_condition(torch.cat(times), self.action_in_proj.weight.dtype)
        self._store_time_conditions(cache, times, cond)

    def _suffix(self, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor, pre=None):
        """Suffix tokens and the adaRMS condition (pi0.5); ``pre``: the step's time condition
        from prepare_steps."""
        temb = pre if pre is not None else self._time_condition(t, x_t.dtype)
        actions = self.action_in_proj(x_t)
        h = actions.shape[1]
        if self.pi05:
            return actions, temb
        at = torch.cat([actions, temb[:, None].expand(-1, h, -1)], dim=-1)
        at = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
        tokens = torch.cat([self.state_proj(state.to(x_t.dtype))[:, None], at], dim=1)
        return tokens, None

    def denoise_step(self, cache: PrefixCache, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        x, cond = self._suffix(x_t, t, state, self._prepared_time_condition(cache, t))
        expert = self._expert
        mask = cache.suffix_mask
        cos, sin = cache.suffix_rope
        tp = cache.prefix_len
        for layer, (kb, vb) in zip(expert.layers, cache.kv):
            q, k, v, gate = layer.attn_qkv(x, cond, cos, sin)
            kb[:, :, tp:] = k
            vb[:, :, tp:] = v
            x = layer.attend_finish(x, q, kb, vb, mask, gate, cond)
        x = expert.final_norm(x, cond)
        return self.action_out_proj(x[:, -self.cfg.horizon :])

    def velocity_joint(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One joint attention per layer over [prefix; suffix], as in training."""
        xp, valid, pos_p = self._prefix_embeddings(batch, self.encode_images(batch))
        xs, cond = self._suffix(x_t, t, batch.state)
        b, tp, ts = xp.shape[0], xp.shape[1], xs.shape[1]
        self_mask = self._suffix_self_mask(ts, xs.device)
        pos_s = valid.long().sum(-1)[:, None] + torch.arange(ts, device=xs.device)[None]
        # Prefix queries see valid prefix keys only; suffix queries see valid prefix + suffix mask.
        top = torch.cat(
            [valid[:, None, :].expand(b, tp, tp), torch.zeros(b, tp, ts, dtype=torch.bool, device=xs.device)], dim=-1
        )
        bottom = torch.cat([valid[:, None, :].expand(b, ts, tp), self_mask[None].expand(b, -1, -1)], dim=-1)
        mask = torch.cat([top, bottom], dim=1)[:, None]
        lm, expert = self._pg.language_model, self._expert
        cp, sp = rope_cos_sin(pos_p, lm.cfg.head_dim, lm.cfg.rope_theta, xp.dtype)
        cs, ss = rope_cos_sin(pos_s, expert.cfg.head_dim, expert.cfg.rope_theta, xs.dtype)
        from .attention import attention

        for bl, el in zip(lm.layers, expert.layers):
            hp, _ = bl.norm(bl.input_layernorm, xp, None)
            hs, gate = el.norm(el.input_layernorm, xs, cond)
            qp, kp, vp = bl.self_attn.qkv(hp, cp, sp)
            qs, ks, vs = el.self_attn.qkv(hs, cs, ss)
            out = attention(
                torch.cat([qp, qs], 2),
                torch.cat([kp, ks], 2),
                torch.cat([vp, vs], 2),
                mask,
                name=el.self_attn.attn_name,
            )
            out = out.transpose(1, 2).reshape(b, tp + ts, -1)
            xp = bl.finish(xp, bl.self_attn.o_proj(out[:, :tp]), None, None)
            xs = el.finish(xs, el.self_attn.o_proj(out[:, tp:]), gate, cond)
        xs = expert.final_norm(xs, cond)
        return self.action_out_proj(xs[:, -self.cfg.horizon :])
