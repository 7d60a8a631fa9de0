"""pi0 / pi0.5 weights (openpi PyTorch and LeRobot layouts) -> PI0Model, and the model config
derived from the tensors themselves.

Why derive sizes from tensors: the config files name a Gemma *variant* ("gemma_2b",
"gemma_300m") but not the vocabulary, the vision tower or the number of layers, and a
fine-tuned or pruned checkpoint is what its tensors say. Head counts cannot be read from shapes
alone; they follow the real architectures (Gemma: 1 KV head; SigLIP So400m: head_dim 72).
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import CheckpointError
from ..config import DecoderConfig, ModelConfig, VisionConfig
from .keymap import Rule, count_layers, need

PG = "paligemma_with_expert.paligemma"
VISION = f"{PG}.model.vision_tower.vision_model"
PROJ = f"{PG}.model.multi_modal_projector.linear"
LM = f"{PG}.model.language_model"
EXPERT = "paligemma_with_expert.gemma_expert.model"
_PG = r"paligemma_with_expert\.paligemma\."

# openpi get_config(): width, depth, mlp, heads, kv_heads, head_dim
GEMMA_VARIANTS = {"gemma_2b": (2048, 18, 16384, 8, 1, 256), "gemma_300m": (1024, 18, 4096, 8, 1, 256)}
SIGLIP_SO400M_HEAD_DIM = 72

RULES = [
    Rule(r".*vision_model\.head\..+", None),  # SigLIP pooling head: PaliGemma uses the patch tokens
    # vision tower and projector (transformers >= 4.52 puts them under `model.`)
    Rule(_PG + r"(?:model\.)?vision_tower\.(.+)", PG + r".model.vision_tower.\1"),
    Rule(_PG + r"(?:model\.)?multi_modal_projector\.(.+)", PG + r".model.multi_modal_projector.\1"),
    # Gemma backbone: `model.language_model.X` (new) or `language_model.model.X` (old)
    Rule(_PG + r"model\.language_model\.((?:embed_tokens|layers|norm)\..+)", PG + r".model.language_model.\1"),
    Rule(_PG + r"language_model\.model\.((?:embed_tokens|layers|norm)\..+)", PG + r".model.language_model.\1"),
    Rule(_PG + r"(?:language_model\.)?lm_head\.weight", None),  # tied to embed_tokens, never called
    Rule(r"paligemma_with_expert\.gemma_expert\.model\.((?:layers|norm)\..+)", EXPERT + r".\1"),
    Rule(r"paligemma_with_expert\.gemma_expert\.(?:lm_head\.weight|model\.embed_tokens\.weight)", None),
    Rule(
        r"((?:state_proj|action_in_proj|action_out_proj|action_time_mlp_in|action_time_mlp_out|time_mlp_in"
        r"|time_mlp_out)\.(?:weight|bias))",
        r"\1",
    ),
    Rule(r".*\.position_ids", None),  # non-persistent index buffers some exports contain
    Rule(r"(?:normalize_inputs|normalize_targets|unnormalize_outputs)\..+", None),  # LeRobot <= 0.3 stats
]


def is_pi05(tensors: dict[str, torch.Tensor]) -> bool:
    """pi0.5's expert norms are adaRMS (`...input_layernorm.dense.weight`); pi0's are plain."""
    return any(k.endswith("input_layernorm.dense.weight") and "gemma_expert" in k for k in tensors)


def normalise_variants(tensors: dict[str, torch.Tensor], pi05: bool) -> dict[str, torch.Tensor]:
    """Known alternative spellings: pi0 saved with `time_mlp_*` names; a tied embedding saved only
    as the lm_head (safetensors `save_model` keeps one name of a shared tensor)."""
    out = dict(tensors)
    if not pi05:
        for k in list(out):
            if k.startswith(("time_mlp_in.", "time_mlp_out.")):
                out["action_" + k] = out.pop(k)
    has_embed = any(k.endswith("embed_tokens.weight") and "gemma_expert" not in k for k in out)
    for head in (f"{PG}.lm_head.weight", f"{PG}.language_model.lm_head.weight"):
        if not has_embed and head in out:
            out[f"{PG}.model.language_model.embed_tokens.weight"] = out[head]
            has_embed = True
    return out


def _decoder(
    m: dict[str, torch.Tensor], prefix: str, kv_heads: int, vocab: int, what: str, source: str
) -> DecoderConfig:
    depth = count_layers(m, f"{prefix}.layers")
    if depth == 0:
        raise CheckpointError(f"{source}: no {what} layers ({prefix}.layers.N.*) in the checkpoint")
    q = need(m, f"{prefix}.layers.0.self_attn.q_proj.weight", source, what)
    k = need(m, f"{prefix}.layers.0.self_attn.k_proj.weight", source, what)
    gate = need(m, f"{prefix}.layers.0.mlp.gate_proj.weight", source, what)
    if k.shape[0] % kv_heads:
        raise CheckpointError(
            f"{source}: {what} k_proj has {k.shape[0]} outputs, not a multiple of {kv_heads} KV heads"
        )
    head_dim = k.shape[0] // kv_heads
    if q.shape[0] % head_dim:
        raise CheckpointError(f"{source}: {what} q_proj outputs {q.shape[0]}, not a multiple of head_dim {head_dim}")
    return DecoderConfig(
        width=q.shape[1],
        depth=depth,
        mlp=gate.shape[0],
        heads=q.shape[0] // head_dim,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        act="gelu_tanh",
    )


def siglip_config(m: dict[str, torch.Tensor], prefix: str, head_dim: int, source: str, fmt: str) -> VisionConfig:
    patch = need(m, f"{prefix}.embeddings.patch_embedding.weight", source, fmt)
    pos = need(m, f"{prefix}.embeddings.position_embedding.weight", source, fmt)
    fc1 = need(m, f"{prefix}.encoder.layers.0.mlp.fc1.weight", source, fmt)
    width, p = patch.shape[0], patch.shape[-1]
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:
        raise CheckpointError(f"{source}: vision position embedding has {pos.shape[0]} rows, not a square grid")
    heads = width // head_dim if width % head_dim == 0 and width >= head_dim else 1
    return VisionConfig(
        image_size=side * p,
        patch_size=p,
        width=width,
        depth=count_layers(m, f"{prefix}.encoder.layers"),
        heads=heads,
        mlp=fc1.shape[0],
    )


def derive_config(
    m: dict[str, torch.Tensor],
    *,
    pi05: bool,
    source: str,
    fmt: str,
    horizon: int,
    num_steps: int,
    max_cameras: int,
    max_text_tokens: int,
    state_dim: int,
    variants: tuple[str, str] | None,
    name: str,
) -> tuple[ModelConfig, list[str]]:
    """ModelConfig from mapped tensors (our names) + notes on how it differs from the named variants."""
    embed = need(m, f"{LM}.embed_tokens.weight", source, fmt)
    kv = 1  # Gemma 2B / 300M are multi-query
    backbone = _decoder(m, LM, kv, embed.shape[0], "backbone", source)
    expert = _decoder(m, EXPERT, kv, embed.shape[0], "action expert", source)
    vision = siglip_config(m, VISION, SIGLIP_SO400M_HEAD_DIM, source, fmt)
    action_in = need(m, "action_in_proj.weight", source, fmt)
    if not pi05:
        state_dim = need(m, "state_proj.weight", source, fmt).shape[1]
    notes: list[str] = []
    if variants is not None:
        for which, dec, var in (
            ("paligemma_variant", backbone, variants[0]),
            ("action_expert_variant", expert, variants[1]),
        ):
            if var not in GEMMA_VARIANTS:
                raise CheckpointError(
                    f"{source}: unsupported {which} {var!r}; accepted: "
                    f"{', '.join(GEMMA_VARIANTS)} (LoRA variants must be merged first)"
                )
            got = (dec.width, dec.depth, dec.mlp, dec.heads, dec.kv_heads, dec.head_dim)
            if got != GEMMA_VARIANTS[var]:
                notes.append(
                    f"{which} {var} is {GEMMA_VARIANTS[var]} (width, depth, mlp, heads, kv, head_dim) "
                    f"but the tensors give {got}; the tensors' sizes are used"
                )
    cfg = ModelConfig(
        arch="pi05" if pi05 else "pi0",
        name=name,
        vision=vision,
        backbone=backbone,
        expert=expert,
        action_dim=action_in.shape[1],
        state_dim=state_dim,
        horizon=horizon,
        num_steps=num_steps,
        max_cameras=max_cameras,
        max_text_tokens=max_text_tokens,
    )
    return cfg, notes
