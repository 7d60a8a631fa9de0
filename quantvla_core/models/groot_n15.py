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
- vl_self_attention blocks: affine `norm3`;
- image placement (`cfg.image_token_id` set, as the loader does for real checkpoints): the LLM
  reads the whole Eagle-templated prompt, each present camera's tokens in place of its run of
  `<IMG_CONTEXT>` placeholders (Eagle 2.5's masked scatter), so they follow the system prompt
  and their `<image k><img>` tag causally and RoPE positions follow that order. Unset: all image
  tokens first, then the text (presets, configs saved before the field).

fp32 islands. The originals run a bf16 model under `torch.autocast(bfloat16)` (LeRobot's
`use_bf16`, Isaac-GR00T's policy) with fp32 parameters: matmuls (linears, batched embodiment
matmuls, attention) run in bf16, while layer/RMS norms, the adaLN modulation, the sinusoidal and
timestep encodings, the bias of the embodiment projectors and the residual streams (SigLIP,
Qwen3, vl_self_attention, DiT) stay fp32. When this model's weights are bf16 / fp16 and
`fp32_islands` is on (the default), the forward reproduces that split: the residual streams
are carried in fp32 and only each linear / attention call sees the low-precision dtype. In fp32
the islands change nothing (the plain path runs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, ModelConfig
from .attention import attention_mask, name_attention_modules
from .base import Batch, prefix_validity
from .groot import ActionEncoder, CategorySpecificLinear, CategorySpecificMLP, DiTCache, GR00TModel, TimestepEncoder
from .layers import DecoderAttention, RMSNorm, apply_rope, modulation, rope_cos_sin
from .smolvla import pixel_shuffle


class Qwen3Attention(DecoderAttention):
    """GQA attention with Qwen3's per-head RMSNorm on queries and keys (before RoPE)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-6, offset=0.0)
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-6, offset=0.0)

    def to_heads(self, q, k, v, cos, sin):
        b, t, _ = q.shape
        q = self.q_norm(q.reshape(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.reshape(b, t, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
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


def action_time_embedding(t_disc: torch.Tensor, width: int) -> torch.Tensor:
    """N1.5's action-encoder time embedding (sin first, exponent over width / 2), (B, width) fp32."""
    half = width // 2
    freqs = torch.exp(-torch.arange(half, device=t_disc.device, dtype=torch.float32) * (math.log(10000.0) / half))
    ang = t_disc.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class N15ActionEncoder(ActionEncoder):
    def forward(self, actions, t_disc, cat):
        a = self.W1(actions, cat)
        temb = action_time_embedding(t_disc, self.width).to(a.dtype)[:, None].expand_as(a)
        return self.W3(F.silu(self.W2(torch.cat([a, temb], dim=-1), cat)), cat)


# ---- fp32 islands: residual stream x in fp32, each linear / attention call in the compute dtype cd ----
def ln32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm as autocast runs it: input, weight and bias in fp32, fp32 out."""
    w = None if norm.weight is None else norm.weight.float()
    b = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, w, b, norm.eps)


def rms32(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Qwen3's RMSNorm over fp32 weights: normalised in fp32, rounded back to the input's dtype
    (a no-op on the fp32 residual stream; bf16 for the q/k norms), times the fp32 weight -> fp32."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype).float()
    return y * (norm.offset + norm.weight.float())


def csl32(lin: CategorySpecificLinear, x: torch.Tensor, cat: torch.Tensor | int, cd: torch.dtype) -> torch.Tensor:
    """Embodiment linear: batched matmul in cd, bias added in fp32 (fp32 result); an int ``cat``
    (one embodiment for the batch) reads its weights in place (no per-sample copy)."""
    if isinstance(cat, int):
        return torch.matmul(x.to(cd), lin.W[cat].to(cd)).float() + lin.b[cat].float()
    y = torch.bmm(x.to(cd) if x.dim() == 3 else x.to(cd)[:, None], lin.W[cat].to(cd)).float()
    y = y + lin.b[cat].float()[:, None]
    return y if x.dim() == 3 else y[:, 0]


def csmlp32(mlp: CategorySpecificMLP, x: torch.Tensor, cat: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return csl32(mlp.layer2, F.relu(csl32(mlp.layer1, x, cat, cd)), cat, cd)


def block32(blk: nn.Module, x: torch.Tensor, cd: torch.dtype, temb=None, kv=None, mask=None) -> torch.Tensor:
    """A DiT / vl_self_attention TransformerBlock on an fp32 residual stream: (ada)LayerNorm and
    modulation in fp32, attention and feed-forward in cd, their outputs added in fp32."""
    if temb is not None:  # scale / shift come out of a cd linear; (1 + scale) is formed in cd too
        scale, shift = modulation(temb, blk.norm1.linear, F.silu).unsqueeze(1).chunk(2, dim=-1)
        h = ln32(blk.norm1.norm, x) * (1 + scale).float() + shift.float()
    else:
        h = ln32(blk.norm1, x)
    x = x + blk.attn1(h.to(cd), kv=kv, mask=mask).float()
    return x + blk.ff(ln32(blk.norm3, x).to(cd)).float()


def place_image_tokens(
    text: torch.Tensor, slots: torch.Tensor, image_tokens: torch.Tensor, image_mask: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Eagle 2.5's masked scatter: the j-th placeholder of a row (`slots`, (B, T) bool) takes the
    j-th image token of that row's present cameras, in camera order (absent cameras are skipped);
    other positions keep `text` (B, T, W). `image_tokens` is (B, C * n, W) as encode_images returns.
    Gathers by index (no host sync), so it also runs inside a CUDA graph capture; the count check
    runs whenever the stream is not capturing (the eager warm-up before a capture checks it)."""
    b, c = image_mask.shape
    per = image_tokens.shape[1] // c
    if not (text.is_cuda and torch.cuda.is_current_stream_capturing()):
        have, want = slots.sum(1), image_mask.sum(1) * per
        if not torch.equal(have, want):
            i = int((have != want).nonzero()[0, 0])
            raise ValueError(
                f"batch row {i}: the prompt has {int(have[i])} image placeholder tokens (id "
                f"{image_token_id}) but {int(image_mask[i].sum())} present camera(s) x {per} image "
                f"tokens = {int(want[i])}; the prompt needs one run of placeholders per present camera "
                "(Eagle 2.5 template)"
            )
    order = torch.argsort((~image_mask).to(torch.int32), dim=1, stable=True)  # present cameras first, in order
    j = (slots.long().cumsum(1) - 1).clamp(min=0)  # which of the row's image tokens each slot takes
    src = order.gather(1, (j // per).clamp(max=c - 1)) * per + j % per
    picked = image_tokens.gather(1, src[..., None].expand(-1, -1, image_tokens.shape[-1]))
    return torch.where(slots[..., None], picked, text)


class GR00TN15Model(GR00TModel):
    """GR00TModel with the modules above swapped in (same parameter names as the checkpoint).

    `embodiment_id` overrides `cfg.dit.embodiment_id` (the model's cfg then records it)."""

    def __init__(self, cfg: ModelConfig, embodiment_id: int | None = None):
        if embodiment_id is not None or cfg.variant != "n15":  # dataclasses.replace re-validates
            dit = dataclasses.replace(
                cfg.dit, embodiment_id=cfg.dit.embodiment_id if embodiment_id is None else embodiment_id
            )
            cfg = dataclasses.replace(cfg, dit=dit, variant="n15")
        super().__init__(cfg)
        for layer in self.backbone.eagle_model.language_model.model.layers:
            layer.self_attn = Qwen3Attention(cfg.backbone)
        vw, bw, f = cfg.vision.width, cfg.backbone.width, cfg.vision.pixel_shuffle
        self.backbone.eagle_model.mlp1 = nn.Sequential(
            nn.LayerNorm(vw * f * f), nn.Linear(vw * f * f, bw), nn.GELU(), nn.Linear(bw, bw)
        )
        ah = self.action_head
        ah.model.timestep_encoder.__class__ = N15TimestepEncoder
        ah.action_encoder.__class__ = N15ActionEncoder
        for blk in ah.vl_self_attention.transformer_blocks:
            blk.norm3 = nn.LayerNorm(bw, eps=1e-5)
        name_attention_modules(self)

    # Compute in fp32 where the originals do when the weights are bf16/fp16 (see the module doc).
    # A runtime switch, not part of the config: it changes rounding only, never the weights.
    fp32_islands: bool = True

    @property
    def embodiment_id(self) -> int:
        return self.cfg.dit.embodiment_id

    def compute_dtype(self) -> torch.dtype:
        """The dtype linears and attention run in (an embedding's: quantization never replaces it)."""
        return self.action_head.future_tokens.weight.dtype

    def islands_active(self) -> bool:
        return self.fp32_islands and self.compute_dtype() != torch.float32

    def _cat(self, b: int, device) -> int:
        return self.embodiment_id

    def encode_images(self, batch: Batch) -> torch.Tensor:
        b, c = batch.images.shape[:2]
        em = self.backbone.eagle_model
        if self.islands_active():
            feats = self._vision32(batch.images.flatten(0, 1))
        else:
            feats = em.mlp1(pixel_shuffle(em.vision_model(batch.images.flatten(0, 1)), self.cfg.vision.pixel_shuffle))
        return feats.view(b, c * feats.shape[1], -1)

    def _vision32(self, pixels: torch.Tensor) -> torch.Tensor:
        """SigLIP + pixel shuffle + mlp1 with fp32 residual stream and norms; returns cd tokens."""
        cd, em = self.compute_dtype(), self.backbone.eagle_model
        vm = em.vision_model.vision_model
        emb = vm.embeddings
        x = (
            emb.patch_embedding(pixels.to(cd)).flatten(2).transpose(1, 2).float()
            + emb.position_embedding.weight.float()
        )
        for layer in vm.encoder.layers:
            x = x + layer.self_attn(ln32(layer.layer_norm1, x).to(cd)).float()
            x = x + layer.mlp(ln32(layer.layer_norm2, x).to(cd)).float()
        x = pixel_shuffle(ln32(vm.post_layernorm, x), self.cfg.vision.pixel_shuffle)
        ln, fc1, act, fc2 = em.mlp1
        return fc2(act(fc1(ln32(ln, x).to(cd))))

    def _prefix_inputs(self, batch: Batch, image_tokens: torch.Tensor, dtype: torch.dtype):
        """(LLM input embeddings (B, T, W) in `dtype`, valid (B, T), RoPE positions (B, T)).

        `cfg.image_token_id` None: [all image tokens; text]. Set: the embedded prompt with its
        placeholder positions taken by the present cameras' image tokens (Eagle 2.5's order)."""
        embed = self.backbone.eagle_model.language_model.model.embed_tokens
        if self.cfg.image_token_id is None:
            valid, positions = prefix_validity(batch, image_tokens)
            return torch.cat([image_tokens.to(dtype), embed(batch.tokens).to(dtype)], dim=1), valid, positions
        slots = (batch.tokens == self.cfg.image_token_id) & batch.token_mask
        text = embed(batch.tokens.masked_fill(slots, 0)).to(dtype)  # the placeholder's own row is never read
        x = place_image_tokens(text, slots, image_tokens.to(dtype), batch.image_mask, self.cfg.image_token_id)
        valid = batch.token_mask
        return x, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)

    def _vl_features(self, batch: Batch, image_tokens: torch.Tensor):
        lm = self.backbone.eagle_model.language_model.model
        islands = self.islands_active()
        x, valid, positions = self._prefix_inputs(batch, image_tokens, torch.float32 if islands else image_tokens.dtype)
        t = valid.shape[1]
        mask = (torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()[None] & valid[:, None, :])[:, None]
        ah = self.action_head
        if islands:
            cd = self.compute_dtype()
            feats = ln32(ah.vlln, self._llm32(lm, x, positions, attention_mask(mask, cd), cd))
            vmask = attention_mask(valid[:, None, None, :], cd)
            for blk in ah.vl_self_attention.transformer_blocks:
                feats = block32(blk, feats, cd, mask=vmask)
            return feats, valid  # fp32, as the originals hand it to the DiT
        feats = lm.final_norm(lm(x, positions, mask), None)  # hidden_states[12]: after the final norm
        feats = ah.vlln(feats)
        vmask = attention_mask(valid[:, None, None, :], feats.dtype)
        for blk in ah.vl_self_attention.transformer_blocks:
            feats = blk(feats, mask=vmask)
        return feats, valid

    @staticmethod
    def _llm32(lm: nn.Module, x: torch.Tensor, positions, mask, cd: torch.dtype) -> torch.Tensor:
        """The kept Qwen3 layers on an fp32 residual stream; RMSNorms (q/k norms too) and RoPE
        in fp32, projections and attention in cd; returns the final-norm output in fp32."""
        cos, sin = rope_cos_sin(positions, lm.cfg.head_dim, lm.cfg.rope_theta, torch.float32)
        b, t, _ = x.shape
        for layer in lm.layers:
            a = layer.self_attn
            h = rms32(layer.input_layernorm, x).to(cd)
            q = rms32(a.q_norm, a.q_proj(h).view(b, t, a.heads, a.head_dim)).transpose(1, 2)
            k = rms32(a.k_norm, a.k_proj(h).view(b, t, a.kv_heads, a.head_dim)).transpose(1, 2)
            v = a.v_proj(h).view(b, t, a.kv_heads, a.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin).to(cd), apply_rope(k, cos, sin).to(cd)
            x = x + a.attend(q, k, v, mask).float()
            x = x + layer.mlp(rms32(layer.post_attention_layernorm, x).to(cd)).float()
        return rms32(lm.norm, x)

    # ---- DiT with islands (the plain paths are GR00TModel's) ----
    def _state_tokens(self, state: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        return csmlp32(self.action_head.state_encoder, state[:, None], self._cat(state.shape[0], state.device), cd)

    def encode_prefix(self, batch: Batch, image_tokens: torch.Tensor) -> DiTCache:
        if not self.islands_active():
            return super().encode_prefix(batch, image_tokens)
        cd = self.compute_dtype()
        vl, valid = self._vl_features(batch, image_tokens)
        vlc = vl.to(cd)
        cross = {i: blk.attn1.kv(vlc) for i, blk in enumerate(self.action_head.model.transformer_blocks) if blk.cross}
        return DiTCache(
            vl=vl,
            valid=valid,
            cross_kv=cross,
            state_tokens=self._state_tokens(batch.state, cd),
            cross_mask=attention_mask(valid[:, None, None, :], cd),
        )

    def velocity_joint(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.islands_active():
            return super().velocity_joint(batch, x_t, t)
        cd = self.compute_dtype()
        vl, valid = self._vl_features(batch, self.encode_images(batch))
        cache = DiTCache(vl=vl, valid=valid, cross_kv={}, state_tokens=self._state_tokens(batch.state, cd))
        vlc = vl.to(cd)
        return self._dit(cache, x_t, t, lambda i, blk: blk.attn1.kv(vlc) if blk.cross else None)

    def _dit(self, cache: DiTCache, x_t: torch.Tensor, t: torch.Tensor, cross_kv, pre=None) -> torch.Tensor:
        if not self.islands_active():
            return super()._dit(cache, x_t, t, cross_kv, pre)
        ah, cd = self.action_head, self.compute_dtype()
        b = x_t.shape[0]
        cat = self._cat(b, x_t.device)
        t_disc = self._discrete(t)
        enc = ah.action_encoder
        a = csl32(enc.W1, x_t, cat, cd)
        temb_a = action_time_embedding(t_disc, enc.width)[:, None].expand_as(a)
        actions = csl32(enc.W3, F.silu(csl32(enc.W2, torch.cat([a, temb_a], dim=-1), cat, cd)), cat, cd)
        actions = actions + ah.position_embedding.weight[: actions.shape[1]].float()[None]
        future = ah.future_tokens.weight.float()[None].expand(b, -1, -1)
        x = torch.cat([cache.state_tokens.float(), future, actions], dim=1)
        dit = ah.model
        # sinusoid fp32, MLP in cd (as the original); prepared for every step at once where it was
        temb = pre if pre is not None else self._time_condition(t_disc, cd)
        cross_mask = cache.cross_mask or attention_mask(cache.valid[:, None, None, :], cd)
        for i, blk in enumerate(dit.transformer_blocks):
            x = block32(blk, x, cd, temb, kv=cross_kv(i, blk), mask=cross_mask if blk.cross else None)
        shift, scale = modulation(temb, dit.proj_out_1, F.silu).unsqueeze(1).chunk(2, dim=-1)
        x = dit.proj_out_2((ln32(dit.norm_out, x) * (1 + scale).float() + shift.float()).to(cd))
        return csmlp32(ah.action_decoder, x, cat, cd)[:, -self.cfg.horizon :]  # fp32 velocity
