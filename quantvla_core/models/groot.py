"""GR00T N1.5-like: Eagle-style VLM backbone + DiT action head (adaLN, alternating
cross-attention to the VL features on even blocks and self-attention on odd blocks).

The VL features, the state token and every cross-attention block's K/V depend only on the
observation, so `encode_prefix` computes them once per chunk; each of the (4) denoising steps
then runs only the DiT over [state; future tokens; action tokens].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import AttentionMask, attention_mask
from .base import Batch, FlowMatchingVLA, prefix_validity
from .layers import Attention, Decoder, FeedForward, conditioning, modulation
from .vision import VisionTower


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers-style sinusoidal embedding (cos first) of (discretised) timesteps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class CategorySpecificLinear(nn.Module):
    """A linear layer per embodiment: batched matmul over W (E, in, out). Not an nn.Linear."""

    def __init__(self, num_categories: int, d_in: int, d_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_categories, d_in, d_out) * (1.0 / math.sqrt(d_in)))
        self.b = nn.Parameter(torch.zeros(num_categories, d_out))

    def forward(self, x: torch.Tensor, cat: torch.Tensor | int) -> torch.Tensor:
        """``cat``: one embodiment id per sample (a tensor: its weights are gathered per sample,
        a copy of W per row), or one int for the whole batch - what a deployed model has - which
        reads that embodiment's W and b in place: one GEMM with the bias, no copy."""
        if isinstance(cat, int):
            w, b = self.W[cat].to(x.dtype), self.b[cat].to(x.dtype)
            return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
        w = self.W[cat].to(x.dtype)
        y = torch.bmm(x if x.dim() == 3 else x[:, None], w) + self.b[cat].to(x.dtype)[:, None]
        return y if x.dim() == 3 else y[:, 0]


class CategorySpecificMLP(nn.Module):
    def __init__(self, num_categories: int, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, d_in, hidden)
        self.layer2 = CategorySpecificLinear(num_categories, hidden, d_out)

    def forward(self, x: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, cat)), cat)


class ActionEncoder(nn.Module):
    """Noisy actions + flow time -> action tokens (W1, then W2 over [a; time], swish, W3)."""

    def __init__(self, num_categories: int, action_dim: int, width: int):
        super().__init__()
        self.width = width
        self.W1 = CategorySpecificLinear(num_categories, action_dim, width)
        self.W2 = CategorySpecificLinear(num_categories, 2 * width, width)
        self.W3 = CategorySpecificLinear(num_categories, width, width)

    def forward(self, actions: torch.Tensor, t_disc: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        a = self.W1(actions, cat)
        temb = timestep_embedding(t_disc, self.width).to(a.dtype)[:, None].expand_as(a)
        return self.W3(F.silu(self.W2(torch.cat([a, temb], dim=-1), cat)), cat)


class AdaLayerNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-5)

    def forward(self, x: torch.Tensor, temb) -> torch.Tensor:
        scale, shift = modulation(temb, self.linear, F.silu).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class TransformerBlock(nn.Module):
    """DiT block (adaLN when `ada`), attention to `kv_dim` context when cross-attending."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp: int, kv_dim: int | None, ada: bool):
        super().__init__()
        self.cross = kv_dim is not None
        self.norm1 = AdaLayerNorm(width) if ada else nn.LayerNorm(width, eps=1e-5)
        self.attn1 = Attention(width, heads, head_dim, kv_dim=kv_dim)
        self.norm3 = nn.LayerNorm(width, eps=1e-5, elementwise_affine=False)
        self.ff = FeedForward(width, mlp)

    def forward(self, x, temb=None, kv=None, mask=None):
        h = self.norm1(x, temb) if temb is not None else self.norm1(x)
        x = x + self.attn1(h, kv=kv, mask=mask)
        return self.ff(self.norm3(x), residual=x)  # the add in ff's epilogue where quantized


class TimestepEncoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(256, width)
        self.timestep_embedder.linear_2 = nn.Linear(width, width)

    def forward(self, t_disc: torch.Tensor) -> torch.Tensor:
        e = self.timestep_embedder
        # the sinusoid is computed in fp32; the layers may hold bf16 / fp16 weights
        return e.linear_2(F.silu(e.linear_1(timestep_embedding(t_disc, 256).to(e.linear_1.weight.dtype))))


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, vl = cfg.dit, cfg.backbone.width
        self.timestep_encoder = TimestepEncoder(d.width)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(d.width, d.heads, d.head_dim, d.mlp, kv_dim=vl if i % 2 == 0 else None, ada=True)
            for i in range(d.depth)
        )
        self.norm_out = nn.LayerNorm(d.width, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(d.width, 2 * d.width)
        self.proj_out_2 = nn.Linear(d.width, d.hidden)

    def conditioning(self, temb: torch.Tensor):
        """``temb`` with every block's adaLN modulation and proj_out_1's, linear(silu(temb)),
        from one GEMM (layers.conditioning)."""
        ada = [blk.norm1.linear for blk in self.transformer_blocks if isinstance(blk.norm1, AdaLayerNorm)]
        return conditioning(self, temb, ada + [self.proj_out_1], F.silu)


class VLSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.backbone.width
        heads = max(1, w // 64)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(w, heads, w // heads, 4 * w, kv_dim=None, ada=False)
            for _ in range(cfg.dit.vl_self_attention_depth)
        )


class ActionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dit
        self.vlln = nn.LayerNorm(cfg.backbone.width)
        self.vl_self_attention = VLSelfAttention(cfg)
        self.model = DiT(cfg)
        self.state_encoder = CategorySpecificMLP(d.num_embodiments, cfg.state_dim, d.hidden, d.width)
        self.action_encoder = ActionEncoder(d.num_embodiments, cfg.action_dim, d.width)
        self.action_decoder = CategorySpecificMLP(d.num_embodiments, d.hidden, d.hidden, cfg.action_dim)
        self.position_embedding = nn.Embedding(1024, d.width)
        self.future_tokens = nn.Embedding(d.num_future_tokens, d.width)


class EagleModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vw, bw = cfg.vision.width, cfg.backbone.width
        self.vision_model = VisionTower(cfg.vision)
        self.mlp1 = nn.Sequential(nn.LayerNorm(vw), nn.Linear(vw, bw), nn.GELU(), nn.Linear(bw, bw))
        self.language_model = nn.Module()
        self.language_model.model = Decoder(cfg.backbone, embed=True, norm_offset=0.0)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eagle_model = EagleModel(cfg)


@dataclass
class DiTCache:
    vl: torch.Tensor  # (B, Tp, Wvl) VL features after vlln + vl_self_attention
    valid: torch.Tensor  # (B, Tp)
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # block index -> (K, V)
    state_tokens: torch.Tensor  # (B, 1, W)
    cross_mask: AttentionMask | None = None  # valid VL tokens, (B, 1, 1, Tp); None: built per step
    # prepare_steps: each step's t tensor -> the DiT's time conditioning, computed for all steps at once
    time_conditions: dict | None = None


class GR00TModel(FlowMatchingVLA):
    noise_at_one = False
    num_timestep_buckets = 1000

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.backbone = Backbone(cfg)
        self.action_head = ActionHead(cfg)

    def _cat(self, b: int, device) -> int:
        """The embodiment of every sample: one per model (the config's), so the
        per-embodiment layers read its weights in place (CategorySpecificLinear with an int)."""
        return int(self.cfg.dit.embodiment_id)

    def encode_images(self, batch: Batch) -> torch.Tensor:
        b, c = batch.images.shape[:2]
        em = self.backbone.eagle_model
        feats = em.mlp1(em.vision_model(batch.images.flatten(0, 1)))
        return feats.view(b, c * feats.shape[1], -1)

    def _vl_features(self, batch: Batch, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.backbone.eagle_model.language_model.model
        x = torch.cat([image_tokens, lm.embed_tokens(batch.tokens).to(image_tokens.dtype)], dim=1)
        valid, positions = prefix_validity(batch, image_tokens)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]
        feats = lm(x, positions, mask)  # layer-12 hidden states, as GR00T selects them
        ah = self.action_head
        feats = ah.vlln(feats)
        vmask = attention_mask(valid[:, None, None, :], feats.dtype)
        for blk in ah.vl_self_attention.transformer_blocks:
            feats = blk(feats, mask=vmask)
        return feats, valid

    def encode_prefix(self, batch: Batch, image_tokens: torch.Tensor) -> DiTCache:
        vl, valid = self._vl_features(batch, image_tokens)
        blocks = self.action_head.model.transformer_blocks
        cross = {i: blk.attn1.kv(vl) for i, blk in enumerate(blocks) if blk.cross}
        b = vl.shape[0]
        state = self.action_head.state_encoder(batch.state.to(vl.dtype)[:, None], self._cat(b, vl.device))
        cross_mask = attention_mask(valid[:, None, None, :], vl.dtype)
        return DiTCache(vl=vl, valid=valid, cross_kv=cross, state_tokens=state, cross_mask=cross_mask)

    def _discrete(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.num_timestep_buckets).floor().clamp(max=self.num_timestep_buckets - 1)

    def _time_condition(self, t_disc: torch.Tensor, dtype: torch.dtype):
        """The DiT's time conditioning: the timestep encoder, then every block's adaLN
        modulation and proj_out_1's from one GEMM where it can (a `Conditioning`)."""
        dit = self.action_head.model
        return dit.conditioning(dit.timestep_encoder(t_disc).to(dtype))

    def prepare_steps(self, cache: DiTCache, times: list[torch.Tensor]) -> None:
        if torch.is_grad_enabled() or not times:
            return  # training runs velocity_joint
        islands = getattr(self, "islands_active", None)
        # GR00T N1.5's fp32-island path runs the time conditioning in its compute dtype
        dtype = (
            self.compute_dtype()
            if islands is not None and islands()
            else self.action_head.model.proj_out_1.weight.dtype
        )
        self._store_time_conditions(cache, times, self._time_condition(self._discrete(torch.cat(times)), dtype))

    def _dit(self, cache: DiTCache, x_t: torch.Tensor, t: torch.Tensor, cross_kv, pre=None) -> torch.Tensor:
        ah = self.action_head
        b = x_t.shape[0]
        t_disc = self._discrete(t)
        actions = ah.action_encoder(x_t, t_disc, self._cat(b, x_t.device))
        actions = actions + ah.position_embedding.weight[: actions.shape[1]][None].to(actions.dtype)
        future = ah.future_tokens.weight[None].expand(b, -1, -1).to(actions.dtype)
        x = torch.cat([cache.state_tokens.to(actions.dtype), future, actions], dim=1)
        dit = ah.model
        temb = pre if pre is not None else self._time_condition(t_disc, x.dtype)
        cross_mask = cache.cross_mask or attention_mask(cache.valid[:, None, None, :], x.dtype)
        for i, blk in enumerate(dit.transformer_blocks):
            x = blk(x, temb, kv=cross_kv(i, blk), mask=cross_mask if blk.cross else None)
        shift, scale = modulation(temb, dit.proj_out_1, F.silu).unsqueeze(1).chunk(2, dim=-1)
        x = dit.proj_out_2(dit.norm_out(x) * (1 + scale) + shift)
        return ah.action_decoder(x, self._cat(b, x.device))[:, -self.cfg.horizon :]

    def denoise_step(self, cache: DiTCache, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        pre = self._prepared_time_condition(cache, t)
        return self._dit(cache, x_t, t, lambda i, blk: cache.cross_kv.get(i), pre)

    def velocity_joint(self, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Training path: cross-attention K/V recomputed inside every block (no cache)."""
        vl, valid = self._vl_features(batch, self.encode_images(batch))
        b = vl.shape[0]
        state = self.action_head.state_encoder(batch.state.to(vl.dtype)[:, None], self._cat(b, vl.device))
        cache = DiTCache(vl=vl, valid=valid, cross_kv={}, state_tokens=state)
        return self._dit(cache, x_t, t, lambda i, blk: blk.attn1.kv(vl) if blk.cross else None)
