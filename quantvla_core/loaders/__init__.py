"""Real checkpoint formats -> our reference modules and the checkpoint's IO conventions.

`read_external(dir)` recognises:
- LeRobot policy directories (config.json `"type"`: pi0, pi05, smolvla, groot = GR00T N1.5);
- openpi PyTorch checkpoints (config.json with `paligemma_variant` / `action_horizon`, written by
  openpi's convert_jax_model_to_pytorch, + assets/<asset_id>/norm_stats.json), pi0 and pi0.5.
Weights are mapped by name (keymap.Rule lists per format), the model size is derived from the
tensors, and the returned ExternalCheckpoint's `io` (an ExternalIO) applies the original tokenizer /
prompt format, resize-with-pad and normalisation once a Policy holds it. `Policy.load(dir)` calls
this for any directory that has a model.safetensors but no quantvla manifest.json; this package
never imports the Policy (the dependency points one way: policy -> loaders).
"""

from __future__ import annotations

from pathlib import Path


from ..checkpoint import CheckpointError, MODEL_FILE, load_tensors, read_json
from ..models import build_model
from . import groot, paligemma, smolvla
from .external import IO_FILE, ExternalCheckpoint, ExternalIO, read_io
from .keymap import load_mapped, map_keys, strip_prefix
from .lerobot import LEROBOT_TYPES, read_lerobot_config, lerobot_normalizers
from .normalization import FeatureNormalizer, groot_processor, openpi_norm_stats
from .robots import ROBOTS, robot_from_asset, robot_transform
from .text import find_tokenizer_file

__all__ = ["read_external", "detect_format", "ExternalCheckpoint", "ExternalIO", "read_io", "IO_FILE", "FORMATS"]

FORMATS = ("lerobot/pi0", "lerobot/pi05", "lerobot/smolvla", "lerobot/groot", "openpi/pi0", "openpi/pi05")

COMMON_NOTES = [
    "one dtype for the whole model (the originals keep the vision tower, projector and norms in fp32 "
    "under bf16): use fp32 for bit-level comparisons",
    "attention defaults to SDPA; quantvla_core.models.attention.attention_impl('eager') gives the originals' "
    "eager path (logits materialised, softmax in fp32, mask value -2.38e38)",
]

GROOT_MAX_TEXT_TOKENS = 128  # the Eagle template around str([task]) takes ~25 + 7 per camera tokens
GROOT_NOTES = [
    "GR00T prompt: Eagle 2.5's chat template, each present camera's image tokens in place of its "
    "<IMG_CONTEXT> run (as the original); the prompt budget is 128 tokens besides the placeholders (the "
    "original has no limit)",
    "GR00T images: Eagle's processor (stretch to 224, bicubic antialiased, uint8 rounding, mean/std 0.5) from "
    "uint8 frames; LeRobot's float->uint8 truncation of dataset frames and its alphabetical camera-key order "
    "are up to the caller",
    "GR00T N1.5 sizes not stored in the files are assumed: DiT head_dim 48, SigLIP head_dim 72, Qwen3 RoPE "
    "base 1e6, VL features from the last kept LLM layer after the final norm",
    "GR00T N1.5 in bf16/fp16: fp32 islands as under the original's bf16 autocast (norms, adaLN modulation, "
    "encodings, embodiment biases and residual streams in fp32), but the parameters themselves are stored in "
    "the model dtype (the original keeps them fp32)",
]


def detect_format(directory: str | Path) -> str:
    """'lerobot/<type>' or 'openpi/<pi0|pi05>'; CheckpointError naming what is accepted otherwise."""
    directory = Path(directory)
    cfg = read_json(directory / "config.json", "policy config")
    if isinstance(cfg, dict) and "type" in cfg:
        if cfg["type"] not in LEROBOT_TYPES:
            raise CheckpointError(
                f"{directory / 'config.json'}: unsupported LeRobot policy type {cfg['type']!r}; "
                f"accepted: {', '.join(LEROBOT_TYPES)}"
            )
        return f"lerobot/{cfg['type']}"
    if isinstance(cfg, dict) and "paligemma_variant" in cfg and "action_horizon" in cfg:
        tensors_pi05 = _peek_pi05(directory / MODEL_FILE)
        return "openpi/pi05" if tensors_pi05 else "openpi/pi0"
    raise CheckpointError(
        f"{directory}: config.json is neither a LeRobot policy config (key 'type') nor an openpi "
        "PyTorch config (keys 'paligemma_variant', 'action_horizon'); accepted formats: "
        + ", ".join(FORMATS)
        + ", or a quantvla model directory with manifest.json"
    )


def _peek_pi05(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return paligemma.is_pi05(dict.fromkeys(f.keys()))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def _finish(model, mapped, cfg, source: str, fmt: str):
    """Check every tensor against the model built on the meta device, then materialise from the file."""
    load_mapped(model, mapped, source, fmt)
    return _check_materialised(model, source)


def _check_materialised(model, source: str):
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if bad:
        raise CheckpointError(f"{source}: tensors not provided by the file: {', '.join(bad[:10])}")
    return model


def _build(cfg):
    return build_model(cfg, device="meta")


def read_external(
    path: str | Path, tokenizer: str | Path | None = None, robot: str | None = None
) -> ExternalCheckpoint:
    """Convert a LeRobot or openpi checkpoint directory (see module docstring); `Policy.load(path,
    tokenizer=..., robot=...)` is the way to get a Policy from it.

    `robot` (openpi only): the robot's data transforms, one of robots.ROBOTS ("libero", "droid", "aloha",
    "aloha_sim", "none"); default $QUANTVLA_ROBOT, else from the asset id of the published checkpoints
    ("trossen" -> aloha, "droid" -> droid, "physical-intelligence/libero" -> libero), else "none"."""
    directory = Path(path)
    fmt = detect_format(directory)
    source = str(directory / MODEL_FILE)
    tensors = load_tensors(directory / MODEL_FILE)
    if fmt.startswith("openpi/"):
        return _load_openpi(directory, fmt, tensors, source, tokenizer, robot)
    if robot not in (None, "none"):
        raise CheckpointError(f"{directory}: robot transforms are openpi's; a {fmt} checkpoint takes robot=None")
    cfg = read_lerobot_config(directory)
    if cfg.type == "groot":
        return _load_groot(directory, cfg, tensors, source, tokenizer)
    t, original = strip_prefix(tensors, "model.")
    if cfg.type in ("pi0", "pi05"):
        pi05 = cfg.type == "pi05"
        if paligemma.is_pi05(t) != pi05:
            raise CheckpointError(
                f"{directory}: config.json says type {cfg.type!r} but the expert norms are "
                f"{'adaRMS (pi0.5)' if not pi05 else 'plain RMSNorm (pi0)'}"
            )
        mapped = map_keys(paligemma.normalise_variants(t, pi05), paligemma.RULES, original)
        mcfg, notes = paligemma.derive_config(
            mapped.tensors,
            pi05=pi05,
            source=source,
            fmt=fmt,
            horizon=int(cfg.get("chunk_size", 50)),
            num_steps=int(cfg.get("num_inference_steps", 10)),
            max_cameras=max(1, cfg.cameras),
            max_text_tokens=int(cfg.get("tokenizer_max_length", 200 if pi05 else 48)),
            state_dim=int(cfg.get("max_state_dim", 32)),
            variants=(cfg.get("paligemma_variant", "gemma_2b"), cfg.get("action_expert_variant", "gemma_300m")),
            name=directory.name,
        )
        res = cfg.get("image_resolution") or [mcfg.vision.image_size] * 2
        pad, style, tok_name = "center", ("pi05" if pi05 else "lerobot-pi0"), "tokenizer.model"
    else:  # smolvla
        cfg.refuse_if("attention_mode", lambda v: v != "cross_attn", "only cross_attn is implemented")
        cfg.refuse_if("self_attn_every_n_layers", lambda v: v != 2, "only every-2 self-attention is implemented")
        cfg.refuse_if("add_image_special_tokens", (True,), "image special tokens are not implemented")
        mapped = map_keys(t, smolvla.RULES, original)
        mcfg = smolvla.derive_config(
            mapped.tensors,
            source=source,
            horizon=int(cfg.get("chunk_size", 50)),
            num_steps=int(cfg.get("num_steps", 10)),
            max_cameras=max(1, cfg.cameras),
            max_text_tokens=int(cfg.get("tokenizer_max_length", 48)),
            name=directory.name,
        )
        if cfg.get("num_vlm_layers") not in (None, mcfg.backbone.depth):
            raise CheckpointError(
                f"{directory}: config num_vlm_layers={cfg.get('num_vlm_layers')} but the file has "
                f"{mcfg.backbone.depth} backbone layers"
            )
        if mcfg.expert.depth != mcfg.backbone.depth:
            raise CheckpointError(
                f"{directory}: unsupported variant: {mcfg.expert.depth} expert layers for "
                f"{mcfg.backbone.depth} backbone layers (only one expert layer per VLM layer)"
            )
        notes = []
        res = cfg.get("resize_imgs_with_padding") or [mcfg.vision.image_size] * 2
        pad, style, tok_name = "top_left", "smolvla", "tokenizer.json"
    if list(res) != [mcfg.vision.image_size] * 2:
        raise CheckpointError(
            f"{directory}: config resizes images to {list(res)} but the vision tower takes "
            f"{mcfg.vision.image_size}x{mcfg.vision.image_size}"
        )
    model = _finish(_build(mcfg), mapped, mcfg, source, fmt)
    state_dim = cfg.dim("STATE", "observation.state", mcfg.state_dim)
    action_dim = cfg.dim("ACTION", "action", mcfg.action_dim)
    if state_dim > mcfg.state_dim or action_dim > mcfg.action_dim:
        raise CheckpointError(
            f"{directory}: robot state/action ({state_dim}/{action_dim}) exceed the model's "
            f"padded sizes ({mcfg.state_dim}/{mcfg.action_dim})"
        )
    state_norm, action_norm, _ = lerobot_normalizers(directory, cfg, tensors, state_dim, action_dim)
    io = ExternalIO(
        format=fmt,
        prompt_style=style,
        tokenizer_name=tok_name,
        image_pad=pad,
        state_norm=state_norm,
        action_norm=action_norm,
        tokenizer_path=_tok_path(directory, tok_name, tokenizer),
        source=str(directory),
        notes=notes + COMMON_NOTES,
    )
    return ExternalCheckpoint(model, mcfg, io)


def _tok_path(directory: Path, name: str, explicit) -> str | None:
    p = find_tokenizer_file(directory, name, explicit)
    return str(p) if p is not None else None


def _load_openpi(directory: Path, fmt: str, tensors, source: str, tokenizer, robot=None) -> ExternalCheckpoint:
    cfg = read_json(directory / "config.json", "openpi config")
    pi05 = fmt == "openpi/pi05"
    mapped = map_keys(paligemma.normalise_variants(tensors, pi05), paligemma.RULES)
    stats, stats_path = openpi_norm_stats(directory)
    for key in ("state", "actions"):
        if key not in stats:
            raise CheckpointError(f"{stats_path}: no {key!r} statistics; accepted keys: state, actions")
    mode = "quantiles" if pi05 else "mean_std"  # openpi: quantile normalisation for every model but pi0
    try:
        state_dim = len(stats["state"]["mean"] if mode == "mean_std" else stats["state"]["q01"])
        action_dim = len(stats["actions"]["mean"] if mode == "mean_std" else stats["actions"]["q01"])
    except KeyError as e:
        raise CheckpointError(f"{stats_path}: {mode} normalisation needs statistic {e}") from None
    model_state = int(cfg.get("action_dim", 32))  # openpi pads state and actions to action_dim
    mcfg, notes = paligemma.derive_config(
        mapped.tensors,
        pi05=pi05,
        source=source,
        fmt=fmt,
        horizon=int(cfg.get("action_horizon", 50)),
        num_steps=10,
        max_cameras=3,
        max_text_tokens=200 if pi05 else 48,
        state_dim=model_state,
        variants=(cfg.get("paligemma_variant", "gemma_2b"), cfg.get("action_expert_variant", "gemma_300m")),
        name=directory.name,
    )
    if mcfg.action_dim != int(cfg.get("action_dim", mcfg.action_dim)):
        raise CheckpointError(
            f"{directory / 'config.json'}: action_dim {cfg.get('action_dim')} but action_in_proj "
            f"takes {mcfg.action_dim}"
        )
    asset_id = stats_path.parent.relative_to(directory / "assets").as_posix() if stats_path.parent != directory else ""
    how = "given"
    if robot is None:
        import os

        robot, how = (
            (os.environ["QUANTVLA_ROBOT"], "$QUANTVLA_ROBOT")
            if os.environ.get("QUANTVLA_ROBOT")
            else (robot_from_asset(asset_id), f"asset id {asset_id!r}")
        )
    if robot not in ROBOTS:
        raise CheckpointError(f"{directory}: unknown robot {robot!r}; accepted: {', '.join(ROBOTS)}")
    transform = robot_transform(robot, "pi05" if pi05 else "pi0")
    if transform is not None:
        transform.check(state_dim, action_dim, str(stats_path))
        robot_notes = [
            f"{transform.describe()} ({how}); the state added back to delta actions is the decoded "
            "robot state itself (openpi's is that state normalised and unnormalised again: "
            "equal up to float rounding)"
        ]
    else:
        robot_notes = [
            "no openpi robot transform (robot 'none'): actions are the unnormalised first N model "
            "dimensions and the state / cameras go in as given; accepted robots: " + ", ".join(ROBOTS)
        ]
    model = _finish(_build(mcfg), mapped, mcfg, source, fmt)
    io = ExternalIO(
        format=fmt,
        prompt_style="pi05" if pi05 else "openpi-pi0",
        tokenizer_name="tokenizer.model",
        image_pad="center",
        state_norm=FeatureNormalizer("state", state_dim, mode, stats["state"], "openpi"),
        action_norm=FeatureNormalizer("actions", action_dim, mode, stats["actions"], "openpi"),
        tokenizer_path=_tok_path(directory, "tokenizer.model", tokenizer),
        source=str(directory),
        notes=notes + COMMON_NOTES + robot_notes,
        robot=robot,
    )
    return ExternalCheckpoint(model, mcfg, io)


def _load_groot(directory: Path, cfg, tensors, source: str, tokenizer) -> ExternalCheckpoint:
    t, original = strip_prefix(tensors, "_groot_model.")
    if any(k.startswith("backbone.eagle_linear.") for k in t):
        raise CheckpointError(
            f"{directory}: unsupported variant: backbone.eagle_linear (project_to_dim) is set; "
            "GR00T N1.5 feeds the 2048-wide LLM features to the action head directly"
        )
    mapped = map_keys(t, groot.RULES, original)
    proc = groot_processor(directory) or {
        "stats": {},
        "normalize_min_max": True,
        "embodiment_tag": None,
        "embodiment_mapping": None,
    }
    tag = proc["embodiment_tag"] or cfg.get("embodiment_tag", "new_embodiment")
    mapping = proc["embodiment_mapping"] or groot.EMBODIMENTS
    if tag not in mapping:
        raise CheckpointError(f"{directory}: unknown embodiment_tag {tag!r}; accepted: {', '.join(mapping)}")
    mcfg = groot.derive_config(
        mapped.tensors,
        source=source,
        horizon=min(int(cfg.get("chunk_size", 16)), 16),
        num_steps=int(cfg.get("num_inference_timesteps") or 4),
        max_cameras=max(1, cfg.cameras),
        max_text_tokens=GROOT_MAX_TEXT_TOKENS,
        name=directory.name,
        embodiment_id=int(mapping[tag]),
        image_token_id=groot.EAGLE_IMAGE_TOKEN_ID,
    )
    model = _build(mcfg)  # variant "n15": the same model build_model gives a saved artifact of it
    load_mapped(model, mapped, source, "lerobot/groot")
    _check_materialised(model, source)
    state_dim = cfg.dim("STATE", "observation.state", mcfg.state_dim)
    action_dim = cfg.dim("ACTION", "action", mcfg.action_dim)
    mode = "min_max" if proc["normalize_min_max"] else "identity"
    norms = []
    for key, dim in (("observation.state", state_dim), ("action", action_dim)):
        have = proc["stats"].get(key, {})
        if mode == "min_max" and not have:
            raise CheckpointError(
                f"{directory}: GR00T min-max normalisation needs {key}.min / {key}.max in the "
                "groot processor state files (policy_preprocessor.json)"
            )
        norms.append(FeatureNormalizer(key, dim, mode, have, "groot"))
    io = ExternalIO(
        format="lerobot/groot",
        prompt_style="groot-eagle",
        tokenizer_name="tokenizer.json",
        image_pad="eagle",
        state_norm=norms[0],
        action_norm=norms[1],
        tokenizer_path=_tok_path(directory, "tokenizer.json", tokenizer),
        source=str(directory),
        notes=GROOT_NOTES + COMMON_NOTES,
    )
    return ExternalCheckpoint(model, mcfg, io)
