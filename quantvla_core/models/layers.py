"""Building blocks shared by the reference VLAs (Gemma/Qwen decoders, SigLIP ViT, DiT).

Module attribute names match the real checkpoints (q_proj, gate_proj, to_q, ff.net.0.proj, ...)
so that the quantization layout rules written once apply to real models too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantvla_kernels import adaptive_rmsnorm, resolve_backend

from ..config import DecoderConfig
from .attention import attention, attention_mask
from .float_fusion import fused_float_linear


def _fused(parent: nn.Module, names: tuple[str, ...]):
    """A quantized parent's sibling projections as one layer (quant.qlinear.fused_siblings);
    None for float models. Imported here, not at module level: quant imports models."""
    from ..quant.qlinear import fused_siblings

    return fused_siblings(parent, names)


def _sibling_gemm(parent: nn.Module, names: tuple[str, ...], slot: str, x: torch.Tensor) -> torch.Tensor | None:
    """``cat([parent.<name>(x) for name in names], -1)`` as one GEMM: where the siblings are
    quantized one activation quantization and one integer GEMM (quant.qlinear.fused_siblings),
    where they are float one GEMM over their concatenated weights (float_fusion, cached on
    ``parent`` under ``slot``); None where neither applies (the caller runs them one by one)."""
    fused = _fused(parent, names)
    if fused is not None:
        return fused(x)
    return fused_float_linear(parent, slot, tuple(getattr(parent, n) for n in names), x)


def _fused_gate_up(mlp: nn.Module):
    """A quantized MLP's gate/up projections as one gated-pairs layer whose GEMM epilogue
    writes act(gate) * up, or None (float model, epilogue fusion off, observed children)."""
    from ..quant.qlinear import epilogue_fusion, fused_siblings

    return fused_siblings(mlp, ("gate_proj", "up_proj"), pairs=True) if epilogue_fusion() else None


def _epilogue_layer(layer: nn.Module):
    """``layer`` if it is a quantized linear that can add a residual (or apply an activation)
    in its GEMM epilogue: nobody hooks it (a hook must see the layer's own output)."""
    from ..quant.qlinear import QuantLinear, epilogue_fusion

    if (
        isinstance(layer, QuantLinear)
        and epilogue_fusion()
        and not layer.gated_pairs
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
    ):
        return layer
    return None


def linear_residual(
    layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + layer(x)`` - with ``gate`` ``residual + layer(x) * gate`` (pi0.5's gated
    residual) - computed inside a quantized layer's GEMM epilogue where it can be (a gate with
    one vector for the whole batch: one sample)."""
    if residual is None:
        return layer(x)
    fused = _epilogue_layer(layer)
    if gate is None:
        return fused(x, residual=residual) if fused is not None else residual + layer(x)
    width = residual.shape[-1]
    if fused is not None and gate.numel() == width and gate.shape[-1] == width:
        return fused(x, residual=residual, residual_gate=gate.reshape(width))
    return gated_residual(residual, layer(x), gate)


def _normed_fused(
    parent: nn.Module, names: tuple[str, ...], norm: nn.Module, x: torch.Tensor, fused=None, act: str | None = None
):
    """The parent's fused sibling layer applied to ``norm(x)`` with the RMSNorm computed inside
    the activation quantization (one kernel / one row pass), or None (float model, adaptive or
    other norm, or a layer the fused norm does not cover: the caller runs norm, then layers).
    Only for norms whose output feeds nothing but these siblings, which the caller knows."""
    if type(norm) is not RMSNorm or norm._forward_hooks or norm._forward_pre_hooks:
        return None  # another norm, or one somebody observes: it runs as its own module
    fused = fused if fused is not None else _fused(parent, names)
    if fused is None:
        return None
    return fused.try_forward_rmsnorm(x, norm.weight, norm.eps, norm.offset, act=act)


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + h * gate`` (pi0.5's gated residual). Where the kernels run on Triton (a GPU) it is
    one ``addcmul`` launch, rounded once instead of twice; elsewhere the two ops, whose numbers
    the CPU path keeps."""
    if resolve_backend(None, x.device) == "triton" and x.dtype == h.dtype == gate.dtype:
        return torch.addcmul(x, h, gate)
    return x + h * gate


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}; accepted: gelu_tanh, silu")


class RMSNorm(nn.Module):
    """RMSNorm; `offset=1` is Gemma's x * (1 + w) with w initialised to zero."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 1.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps), one op
        return (y * (self.offset + self.weight.float())).to(x.dtype)


class Conditioning:
    """A condition vector (flow time, pi0.5 / GR00T) with what every adaptive norm computes from
    it already computed: one GEMM over the concatenated modulation layers of the whole stack
    (the condition is the same for all of them: one launch per denoising step, not one per norm).
    ``modulations`` maps each modulation layer to its output."""

    def __init__(
        self,
        cond: torch.Tensor,
        modulations: dict[nn.Module, torch.Tensor],
        norm_terms: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
        output: torch.Tensor | None = None,
    ):
        self.cond = cond
        self.modulations = modulations
        self.output = output  # the fused GEMM's whole output (conditioning())
        # adaRMS norm -> (1 + scale, shift) in fp32 and gate, each (B, 1, D): formed for all norms at once
        self.norm_terms = norm_terms or {}

    def rows(self, start: int, stop: int) -> "Conditioning":
        """The same for rows [start, stop) of the batch (views: one step of a batched chunk)."""
        return Conditioning(
            self.cond[start:stop],
            {k: v[start:stop] for k, v in self.modulations.items()},
            {k: tuple(x[start:stop] for x in v) for k, v in self.norm_terms.items()},
            None if self.output is None else self.output[start:stop],
        )


def modulation(cond, layer: nn.Module, prepare=None) -> torch.Tensor:
    """``layer(prepare(cond))``, taken from a `Conditioning` that holds it where it does."""
    if isinstance(cond, Conditioning):
        mod = cond.modulations.get(layer)
        if mod is not None:
            return mod
        cond = cond.cond
    return layer(cond if prepare is None else prepare(cond))


def conditioning(owner: nn.Module, cond: torch.Tensor, layers: list[nn.Module], prepare=None):
    """``cond`` as a `Conditioning` whose modulations ``layer(prepare(cond))`` for ``layers``
    come from one GEMM (float_fusion), or ``cond`` itself where that cannot run (gradients on,
    hooked or quantized layers): each norm then computes its own."""
    y = fused_float_linear(owner, "_float_modulations", layers, cond if prepare is None else prepare(cond))
    if y is None:
        return cond
    return Conditioning(cond, dict(zip(layers, y.split([m.out_features for m in layers], dim=-1))), output=y)


class AdaRMSNorm(nn.Module):
    """pi0.5 adaptive RMSNorm: (scale, shift, gate) = dense(cond); returns (normed, gate)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.normal_(self.dense.weight, std=0.02 / math.sqrt(cond_dim))
        nn.init.zeros_(self.dense.bias)

    def terms(self, cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1 + scale, shift) in fp32 and gate, each (B, 1, D), for condition ``cond``."""
        terms = cond.norm_terms.get(self) if isinstance(cond, Conditioning) else None
        if terms is None:
            scale, shift, gate = modulation(cond, self.dense).unsqueeze(1).chunk(3, dim=-1)
            terms = (1 + scale.float(), shift.float(), gate)
        return terms

    def forward(self, x: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x) * (1 + scale) + shift, gate): one Triton kernel on the GPU
        (quantvla_kernels.adaptive_rmsnorm), the same torch ops as written here elsewhere."""
        scale1, shift, gate = self.terms(cond)
        return adaptive_rmsnorm(x, scale1, shift, self.eps), gate


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (B, 1, T, D) at integer positions (B, T) for `apply_rope`: cos, and sin with
    its first half negated (rotate-half's sign lives in the table, built once per sequence,
    instead of a negation and a concatenation in every layer)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[..., None] * inv
    sin = ang.sin()
    return torch.cat([ang, ang], dim=-1)[:, None].cos().to(dtype), torch.cat([-sin, sin], dim=-1)[:, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, x * cos + rotate_half(x) * sin, with the tables of `rope_cos_sin`:
    rotate_half(x) * sin == roll(x, D/2) * signed_sin exactly (negation commutes with the
    product), in four kernels instead of six."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


class GatedMLP(nn.Module):
    """GeGLU (Gemma) / SwiGLU (Llama, Qwen): down(act(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x): where quantized, one activation quantization and one GEMM whose
        epilogue writes the product (gated pairs); in float one GEMM over gate|up where it can."""
        pairs = _fused_gate_up(self)
        if pairs is not None:
            return pairs(x, act=self.act)
        y = _sibling_gemm(self, ("gate_proj", "up_proj"), "_float_gate_up", x)
        if y is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = y.split([self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
        return activation(self.act, gate) * up

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None
    ) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) (+ residual, times ``gate`` first where given: a gated
        residual; both in down's epilogue where quantized)."""
        return linear_residual(self.down_proj, self.hidden(x), residual, gate)

    def forward_normed(self, x: torch.Tensor, norm: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``self(norm(x)) (+ residual)``, with the norm fused into gate/up's activation
        quantization where the model is quantized (the norm's output feeds only this MLP)."""
        pairs = _fused_gate_up(self)
        if pairs is not None:
            h = _normed_fused(self, ("gate_proj", "up_proj"), norm, x, fused=pairs, act=self.act)
        else:
            y = _normed_fused(self, ("gate_proj", "up_proj"), norm, x)
            h = (
                None
                if y is None
                else activation(self.act, y[..., : self.gate_proj.out_features]) * y[..., self.gate_proj.out_features :]
            )
        if h is None:
            return self(norm(x), residual)
        return linear_residual(self.down_proj, h, residual)

    def forward_adanormed(self, x: torch.Tensor, norm: nn.Module, cond) -> torch.Tensor | None:
        """``x + self(h) * gate`` with ``h, gate = norm(x, cond)`` for an adaRMS ``norm`` (the
        MLP half of a pi0.5 layer), the norm inside gate/up's activation quantization (its
        (1 + scale) as the norm weight, its shift added before smoothing and rotation) and the
        gated residual in down's epilogue, or None where that does not run: a float model,
        a hooked norm, a condition without precomputed terms (training, tracing), more than one
        sample (one weight / shift vector per kernel call), a kernel without it (Triton's tile
        kernels: layers without a rotation of B >= 16). The norm's output feeds only this MLP."""
        pairs = _fused_gate_up(self)
        if (
            pairs is None
            or type(norm) is not AdaRMSNorm
            or norm._forward_hooks
            or norm._forward_pre_hooks
            or not isinstance(cond, Conditioning)
            or norm not in cond.norm_terms
        ):
            return None
        scale1, shift, gate = cond.norm_terms[norm]
        if scale1.shape[0] != 1:
            return None
        h = pairs.try_forward_rmsnorm(x, scale1.reshape(-1), norm.eps, 0.0, act=self.act, norm_shift=shift.reshape(-1))
        if h is None:
            return None
        return linear_residual(self.down_proj, h, x, gate)


class DecoderAttention(nn.Module):
    """GQA self-attention with RoPE; q/k/v/o names as in Gemma/Llama/Qwen."""

    attn_name = ""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)

    def to_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected (B, T, H*D) q/k/v -> per-head (B, H, T, D), RoPE on q and k. Subclasses with
        per-head norms (Qwen3) override this (`project_heads` then calls it), not the projections."""
        b, t, _ = q.shape
        q = q.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def project_heads(
        self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`to_heads` of one q|k|v projection output (B, T, (H + 2 Hkv) D): RoPE runs once over
        the q and k heads together (4 kernels per layer instead of 8), the same numbers."""
        if type(self).to_heads is not DecoderAttention.to_heads:
            return self.to_heads(*self._split_qkv(y), cos, sin)  # a subclass's own head transform
        b, t, _ = y.shape
        h, hk = self.heads, self.kv_heads
        y = y.reshape(b, t, h + 2 * hk, self.head_dim)
        qk = apply_rope(y[:, :, : h + hk], cos.transpose(1, 2), sin.transpose(1, 2))
        return qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2), y[:, :, h + hk :].transpose(1, 2)

    def _split_qkv(self, y: torch.Tensor):
        return y.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = _sibling_gemm(self, ("q_proj", "k_proj", "v_proj"), "_float_qkv", x)
        if y is not None:
            return self.project_heads(y, cos, sin)
        return self.to_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin)

    def qkv_normed(
        self, x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``self.qkv(norm(x), cos, sin)``, with the norm fused into the q/k/v activation
        quantization where the model is quantized (the norm's output feeds only q/k/v)."""
        y = _normed_fused(self, ("q_proj", "k_proj", "v_proj"), norm, x)
        if y is None:
            return self.qkv(norm(x), cos, sin)
        return self.project_heads(y, cos, sin)

    def attend(self, q, k, v, mask, residual: torch.Tensor | None = None) -> torch.Tensor:
        """o_proj(attention(q, k, v)) (+ residual, added in o_proj's epilogue where quantized)."""
        out = attention(q, k, v, mask, name=self.attn_name)
        b, _, t, _ = out.shape
        return linear_residual(self.o_proj, out.transpose(1, 2).reshape(b, t, -1), residual)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. With `cond_dim` the norms are adaRMS with gated residuals (pi0.5)."""

    def __init__(self, cfg: DecoderConfig, cond_dim: int | None = None, norm_offset: float = 1.0):
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        self.mlp = GatedMLP(cfg.width, cfg.mlp, cfg.act)
        self.adaptive = cond_dim is not None
        if self.adaptive:
            self.input_layernorm = AdaRMSNorm(cfg.width, cond_dim)
            self.post_attention_layernorm = AdaRMSNorm(cfg.width, cond_dim)
        else:
            self.input_layernorm = RMSNorm(cfg.width, offset=norm_offset)
            self.post_attention_layernorm = RMSNorm(cfg.width, offset=norm_offset)

    def norm(self, which: nn.Module, x: torch.Tensor, cond: torch.Tensor | None):
        if self.adaptive:
            return which(x, cond)
        return which(x), None

    def attn_qkv(self, x: torch.Tensor, cond: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        """(q, k, v, gate) of the attention half: input norm then q/k/v projections, the norm
        fused into their quantization where it can be (plain RMSNorm, quantized model)."""
        if self.adaptive:
            h, gate = self.norm(self.input_layernorm, x, cond)
            return (*self.self_attn.qkv(h, cos, sin), gate)
        return (*self.self_attn.qkv_normed(x, self.input_layernorm, cos, sin), None)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, gate1, cond) -> torch.Tensor:
        """Residual after attention, then the MLP half of the layer."""
        return self.mlp_half(x + attn_out if gate1 is None else gated_residual(x, attn_out, gate1), cond)

    def attend_finish(self, x: torch.Tensor, q, k, v, mask, gate1, cond) -> torch.Tensor:
        """``finish(x, self_attn.attend(q, k, v, mask), gate1, cond)``; without a gate the
        residual is added in o_proj's GEMM epilogue where o_proj is quantized."""
        if gate1 is None:
            return self.mlp_half(self.self_attn.attend(q, k, v, mask, residual=x), cond)
        return self.finish(x, self.self_attn.attend(q, k, v, mask), gate1, cond)

    def mlp_half(self, x: torch.Tensor, cond) -> torch.Tensor:
        """The MLP half of the layer on the attention half's output x (residual included)."""
        if self.adaptive:
            fused = self.mlp.forward_adanormed(x, self.post_attention_layernorm, cond)
            if fused is not None:  # the adaRMS norm inside gate/up's quantization
                return fused
            h, gate2 = self.norm(self.post_attention_layernorm, x, cond)
            return self.mlp(h, residual=x, gate=gate2)
        # the norm's output feeds only the MLP: fused into its quantization where it can be, and
        # the residual added in down_proj's epilogue
        return self.mlp.forward_normed(x, self.post_attention_layernorm, residual=x)


class Decoder(nn.Module):
    """A stack of decoder layers (`layers.N`) with a final `norm`; optional token embedding."""

    def __init__(self, cfg: DecoderConfig, embed: bool, cond_dim: int | None = None, norm_offset: float = 1.0):
        super().__init__()
        self.cfg = cfg
        if embed:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cond_dim, norm_offset) for _ in range(cfg.depth))
        self.norm = AdaRMSNorm(cfg.width, cond_dim) if cond_dim else RMSNorm(cfg.width, offset=norm_offset)

    def conditioning(self, cond: torch.Tensor | None):
        """``cond`` with every adaRMS norm's dense(cond) from one GEMM (see `conditioning`)."""
        if cond is None or not isinstance(self.norm, AdaRMSNorm):
            return cond
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms.append(self.norm)
        c = conditioning(self, cond, [n.dense for n in norms])
        if not isinstance(c, Conditioning):
            return c
        # every norm's (1 + scale) and shift in fp32 by two ops for the whole stack, as each norm
        # would form them (x + 1 == 1 + x; + 0 leaves shift and gate as they are)
        y = c.output  # every norm's dense(cond), in `norms` order
        terms = (y.float() + self._scale_ones(norms, y.device)).split([n.dense.out_features for n in norms], dim=-1)
        for n, t in zip(norms, terms):
            d = n.dense.out_features // 3
            c.norm_terms[n] = (t[:, None, :d], t[:, None, d : 2 * d], c.modulations[n.dense][:, None, 2 * d :])
        return c

    def _scale_ones(self, norms: list, device) -> torch.Tensor:
        """1 where a modulation output is an adaRMS scale, 0 elsewhere (cached)."""
        key = (tuple(n.dense.out_features for n in norms), device)
        cached = self.__dict__.get("_scale_ones_cache")
        if cached is None or cached[0] != key:
            parts = []
            for n in norms:
                d = n.dense.out_features // 3
                parts += [torch.ones(d, device=device), torch.zeros(2 * d, device=device)]
            cached = (key, torch.cat(parts))
            self.__dict__["_scale_ones_cache"] = cached
        return cached[1]

    def final_norm(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.norm(x, cond)[0] if cond is not None else self.norm(x)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        return_kv: bool = False,
    ):
        """Plain self-attention pass; with return_kv also the per-layer (K, V) (the prefix cache)."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_mask(mask, x.dtype)  # converted once for every layer
        kv = []
        for layer in self.layers:
            q, k, v, gate = layer.attn_qkv(x, cond, cos, sin)
            if return_kv:
                kv.append((k, v))
            x = layer.attend_finish(x, q, k, v, mask, gate, cond)
        return (x, kv) if return_kv else x


class Attention(nn.Module):
    """diffusers-style attention (to_q, to_k, to_v, to_out.0) used by SigLIP-free DiT blocks."""

    attn_name = ""

    def __init__(self, width: int, heads: int, head_dim: int, kv_dim: int | None = None, bias: bool = True):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(width, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim or width, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim or width, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, width, bias=bias)])

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.to_k(context)), self.split(self.to_v(context))

    def self_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v of self-attention (all three read x): one GEMM over to_q|to_k|to_v -
        one activation quantization where they are quantized - or three where that does not apply."""
        names = ("to_q", "to_k", "to_v")
        y = _sibling_gemm(self, names, "_float_qkv", x)
        if y is None:
            return (self.split(self.to_q(x)), *self.kv(x))
        return tuple(self.split(t) for t in y.split([getattr(self, n).out_features for n in names], dim=-1))

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if kv is None:
            q, k, v = self.self_qkv(x)
        else:
            q, (k, v) = self.split(self.to_q(x)), kv
        out = attention(q, k, v, mask, name=self.attn_name)
        b, _, t, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """diffusers FeedForward naming: ff.net.0.proj (in, GELU-tanh) and ff.net.2 (out)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(width, hidden)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(hidden, width)])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """net.2(gelu(net.0.proj(x))) (+ residual): GELU and residual in the GEMM epilogues where
        the layers are quantized."""
        proj = _epilogue_layer(self.net[0].proj)
        h = proj(x, act="gelu_tanh") if proj is not None else F.gelu(self.net[0].proj(x), approximate="tanh")
        return linear_residual(self.net[2], h, residual)


def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """pi0's sine-cosine embedding of the flow time t in [0, 1]; t (B,) -> (B, dim) fp32."""
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    ang = (2 * math.pi / period)[None] * t.double()[:, None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).float()
