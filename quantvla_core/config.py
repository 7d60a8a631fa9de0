"""Model configuration as plain dataclasses, and the named presets.

Sizes of the real presets follow ../shared/docs/architectures.md so that parameter and memory
accounting (and the layout rules) hold for the real pi0 / pi0.5 / GR00T N1.5 checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("pi0", "pi05", "groot", "smolvla")
# Computation variants of an arch with the same parameter names: "" = the reference model,
# "n15" = GR00T N1.5 as the real checkpoints compute it (models/groot_n15.py).
VARIANTS = {"": ARCHS, "n15": ("groot",)}


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    heads: int = 16
    mlp: int = 4304
    pixel_shuffle: int = 1  # SmolVLM connector: merge f x f patches into one token (1 = none)


@dataclass
class DecoderConfig:
    """A Gemma / Llama / Qwen-style decoder (RMSNorm, RoPE, gated MLP, GQA)."""

    width: int = 2048
    depth: int = 18
    mlp: int = 16384
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    rope_theta: float = 10000.0
    act: str = "gelu_tanh"  # GeGLU (Gemma) or "silu" (Llama/Qwen SwiGLU)


@dataclass
class DiTConfig:
    """GR00T-style action head: adaLN DiT with alternating cross / self attention."""

    width: int = 1536
    depth: int = 16
    heads: int = 32
    head_dim: int = 48
    mlp: int = 6144
    vl_self_attention_depth: int = 4
    num_future_tokens: int = 32
    num_embodiments: int = 32
    hidden: int = 1024  # state/action encoder width
    embodiment_id: int = 0  # which per-embodiment projector the policy runs (a robot's tag in N1.5)


@dataclass
class ModelConfig:
    arch: str = "pi0"
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    backbone: DecoderConfig = field(default_factory=DecoderConfig)
    expert: DecoderConfig | None = None  # pi0 / pi05
    dit: DiTConfig | None = None  # groot
    action_dim: int = 32
    state_dim: int = 32
    horizon: int = 50
    num_steps: int = 10
    max_cameras: int = 3
    max_text_tokens: int = 48
    # Normalisation statistics (lists of floats); None = identity.
    state_mean: list[float] | None = None
    state_std: list[float] | None = None
    action_mean: list[float] | None = None
    action_std: list[float] | None = None
    variant: str = ""  # see VARIANTS; recorded so that every rebuild gets the same structure
    # GR00T N1.5 only (variant "n15"): the <IMG_CONTEXT> placeholder id. When set, `tokens` is the
    # whole Eagle-templated prompt and each present camera's image tokens replace, in camera order,
    # the placeholders (as Eagle 2.5 does); max_text_tokens then counts the placeholders too. None:
    # image tokens first, then the text (reference models, presets, configs saved before the field).
    image_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; accepted: {', '.join(ARCHS)}")
        if self.variant not in VARIANTS or self.arch not in VARIANTS[self.variant]:
            ok = [repr(v) for v, archs in VARIANTS.items() if self.arch in archs]
            raise ValueError(
                f"variant {self.variant!r} does not exist for arch {self.arch!r}; accepted: {', '.join(ok)}"
            )
        if self.arch in ("pi0", "pi05", "smolvla") and self.expert is None:
            raise ValueError(f"arch {self.arch!r} needs an 'expert' DecoderConfig")
        if self.arch == "groot" and self.dit is None:
            raise ValueError("arch 'groot' needs a 'dit' DiTConfig")
        if self.dit is not None:
            e, n = self.dit.embodiment_id, self.dit.num_embodiments
            if not isinstance(e, int) or not 0 <= e < n:
                raise ValueError(f"dit.embodiment_id must be an integer in [0, {n}) (num_embodiments), got {e!r}")
        if self.image_token_id is not None:
            e = self.image_token_id
            if self.variant != "n15" or isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise ValueError(
                    "image_token_id (image tokens placed inside the prompt) needs variant 'n15' (GR00T "
                    f"N1.5) and a non-negative integer; got {e!r} with variant {self.variant!r}"
                )
        for k in ("action_dim", "state_dim", "horizon", "num_steps", "max_cameras", "max_text_tokens"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")

    @property
    def num_image_tokens(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.vision.pixel_shuffle**2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["image_token_id"] is None:  # only GR00T N1.5 checkpoints use it; older readers stay able to read
            del d["image_token_id"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; accepted: {sorted(known)}")
        try:
            if isinstance(d.get("vision"), dict):
                d["vision"] = VisionConfig(**d["vision"])
            if isinstance(d.get("backbone"), dict):
                d["backbone"] = DecoderConfig(**d["backbone"])
            if isinstance(d.get("expert"), dict):
                d["expert"] = DecoderConfig(**d["expert"])
            if isinstance(d.get("dit"), dict):
                d["dit"] = DiTConfig(**d["dit"])
        except TypeError as e:
            raise ValueError(f"bad model config: {e}") from None
        return cls(**d)


def _tiny_vision() -> VisionConfig:
    return VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp=128)


def _small_vision() -> VisionConfig:
    return VisionConfig(image_size=96, patch_size=12, width=256, depth=4, heads=4, mlp=768)


def _presets() -> dict[str, ModelConfig]:
    gemma2b = DecoderConfig(width=2048, depth=18, mlp=16384, heads=8, kv_heads=1, head_dim=256, vocab_size=257152)
    gemma300m = DecoderConfig(width=1024, depth=18, mlp=4096, heads=8, kv_heads=1, head_dim=256, vocab_size=257152)
    qwen3_12 = DecoderConfig(
        width=2048,
        depth=12,
        mlp=6144,
        heads=16,
        kv_heads=8,
        head_dim=128,
        vocab_size=151936,
        rope_theta=1e6,
        act="silu",
    )
    tiny_bb = DecoderConfig(width=64, depth=2, mlp=192, heads=4, kv_heads=1, head_dim=16, vocab_size=384)
    tiny_ex = DecoderConfig(width=48, depth=2, mlp=128, heads=4, kv_heads=1, head_dim=16, vocab_size=384)
    small_bb = DecoderConfig(width=384, depth=6, mlp=1536, heads=6, kv_heads=2, head_dim=64, vocab_size=384)
    small_ex = DecoderConfig(width=256, depth=6, mlp=1024, heads=6, kv_heads=2, head_dim=64, vocab_size=384)
    return {
        "tiny": ModelConfig(
            arch="pi0",
            name="tiny",
            vision=_tiny_vision(),
            backbone=tiny_bb,
            expert=tiny_ex,
            action_dim=4,
            state_dim=4,
            horizon=8,
            num_steps=3,
            max_cameras=2,
            max_text_tokens=32,
        ),
        "tiny-pi05": ModelConfig(
            arch="pi05",
            name="tiny-pi05",
            vision=_tiny_vision(),
            backbone=tiny_bb,
            expert=tiny_ex,
            action_dim=4,
            state_dim=4,
            horizon=8,
            num_steps=3,
            max_cameras=2,
            max_text_tokens=128,
        ),
        "tiny-groot": ModelConfig(
            arch="groot",
            name="tiny-groot",
            vision=_tiny_vision(),
            backbone=dataclasses.replace(tiny_bb, act="silu"),
            dit=DiTConfig(
                width=48,
                depth=4,
                heads=4,
                head_dim=12,
                mlp=128,
                vl_self_attention_depth=1,
                num_future_tokens=4,
                num_embodiments=2,
                hidden=32,
            ),
            action_dim=4,
            state_dim=4,
            horizon=8,
            num_steps=4,
            max_cameras=2,
            max_text_tokens=32,
        ),
        "small": ModelConfig(
            arch="pi0",
            name="small",
            vision=_small_vision(),
            backbone=small_bb,
            expert=small_ex,
            action_dim=4,
            state_dim=4,
            horizon=16,
            num_steps=10,
            max_cameras=2,
            max_text_tokens=32,
        ),
        "small-pi05": ModelConfig(
            arch="pi05",
            name="small-pi05",
            vision=_small_vision(),
            backbone=small_bb,
            expert=small_ex,
            action_dim=4,
            state_dim=4,
            horizon=16,
            num_steps=10,
            max_cameras=2,
            max_text_tokens=128,
        ),
        "small-groot": ModelConfig(
            arch="groot",
            name="small-groot",
            vision=_small_vision(),
            backbone=dataclasses.replace(small_bb, act="silu"),
            dit=DiTConfig(
                width=256,
                depth=6,
                heads=8,
                head_dim=32,
                mlp=1024,
                vl_self_attention_depth=2,
                num_future_tokens=8,
                num_embodiments=4,
                hidden=256,
            ),
            action_dim=4,
            state_dim=4,
            horizon=16,
            num_steps=4,
            max_cameras=2,
            max_text_tokens=32,
        ),
        # The built-in default policy: trained on Meta-World MT10 demos (96 px, 2 cameras) on a
        # 2-core CPU in about an hour; fp32 weights stay under 25 MB so they can be committed.
        "mt10": ModelConfig(
            arch="pi0",
            name="mt10",
            vision=VisionConfig(image_size=96, patch_size=16, width=192, depth=4, heads=3, mlp=576),
            backbone=DecoderConfig(width=256, depth=4, mlp=512, heads=4, kv_heads=1, head_dim=64, vocab_size=320),
            expert=DecoderConfig(width=192, depth=4, mlp=512, heads=4, kv_heads=1, head_dim=64, vocab_size=320),
            action_dim=4,
            state_dim=4,
            horizon=16,
            num_steps=10,
            max_cameras=2,
            max_text_tokens=48,
        ),
        "pi0-3b": ModelConfig(arch="pi0", name="pi0-3b", backbone=gemma2b, expert=gemma300m, max_text_tokens=48),
        "pi05-3b": ModelConfig(arch="pi05", name="pi05-3b", backbone=gemma2b, expert=gemma300m, max_text_tokens=200),
        # GR00T N1.5-3B as the released checkpoints are built (models/groot_n15.py, variant "n15"):
        # Eagle 2.5 = SigLIP2 So400m/14 at 224 px + pixel shuffle 2 (64 tokens per image) + the mlp1
        # projector (LayerNorm 4608, 4608 -> 2048, GELU, 2048 -> 2048), Qwen3-1.7B cut to 12 layers
        # (q/k norms), vlln + 4 vl_self_attention blocks, a 16-block DiT (32 x 48 heads), 4 flow
        # steps, chunk 16, state padded to 64 and actions to 32 (LeRobot max_state_dim /
        # max_action_dim), 32 embodiment projectors. test/test_loaders_groot.py checks the counts.
        # Prefix 3 x 64 image tokens + 64 text tokens = 256, what a loaded checkpoint's LLM reads for a
        # 3-camera Eagle prompt (~40 template tokens + str([task])) with the image tokens inside it;
        # image_token_id stays unset here (images first, same cost) because synthetic prompts (bench,
        # `quantvla run groot-n15`) come from the plain tokenizer, which has no <IMG_CONTEXT>.
        "groot-n15": ModelConfig(
            arch="groot",
            name="groot-n15",
            vision=VisionConfig(
                image_size=224, patch_size=14, width=1152, depth=27, heads=16, mlp=4304, pixel_shuffle=2
            ),
            backbone=qwen3_12,
            dit=DiTConfig(),
            action_dim=32,
            state_dim=64,
            horizon=16,
            num_steps=4,
            max_cameras=3,
            max_text_tokens=64,
            variant="n15",
        ),
    }


PRESETS = tuple(_presets())


def preset(name: str) -> ModelConfig:
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; accepted: {', '.join(presets)}")
    return copy.deepcopy(presets[name])
