"""LeRobot policy directories: config.json (`"type": "pi0" | "pi05" | "smolvla" | "groot"`),
model.safetensors (the policy's inner module saved under `model.`), and the normalisation
statistics of `policy_preprocessor.json` / `policy_postprocessor.json` (+ their
`*_normalizer_processor.safetensors` state files), or, for LeRobot <= 0.3, the stats buffers
inside model.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError, read_json
from .normalization import FeatureNormalizer, lerobot_buffer_stats, lerobot_mode, lerobot_processor_stats

LEROBOT_TYPES = ("pi0", "pi05", "smolvla", "groot")
STATE_KEY, ACTION_KEY = "observation.state", "action"


@dataclass
class LeRobotConfig:
    """The fields of a LeRobot config.json that inference depends on."""

    raw: dict[str, Any]
    path: Path

    @property
    def type(self) -> str:
        return self.raw.get("type", "")

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def features(self, kind: str) -> dict[str, list[int]]:
        feats = {**(self.raw.get("input_features") or {}), **(self.raw.get("output_features") or {})}
        out = {}
        for k, v in feats.items():
            if isinstance(v, dict) and v.get("type") == kind:
                out[k] = list(v.get("shape") or [])
        return out

    def dim(self, kind: str, key: str, default: int) -> int:
        feats = self.features(kind)
        if key in feats and feats[key]:
            return int(feats[key][-1])
        return default

    @property
    def cameras(self) -> int:
        return len(self.features("VISUAL")) + int(self.raw.get("empty_cameras", 0) or 0)

    def refuse_if(self, key: str, bad, why: str) -> None:
        value = self.raw.get(key)
        if value is not None and (value in bad if isinstance(bad, tuple) else bad(value)):
            raise CheckpointError(f"{self.path}: unsupported variant {key}={value!r} ({why})")


def read_lerobot_config(directory: Path) -> LeRobotConfig:
    raw = read_json(directory / "config.json", "LeRobot policy config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / 'config.json'}: must be a JSON object")
    cfg = LeRobotConfig(raw, directory / "config.json")
    if cfg.type not in LEROBOT_TYPES:
        raise CheckpointError(
            f"{cfg.path}: unsupported LeRobot policy type {cfg.type!r}; accepted: {', '.join(LEROBOT_TYPES)}"
        )
    cfg.refuse_if("use_relative_actions", (True,), "actions relative to the state are not converted back")
    cfg.refuse_if("use_visual_memory", (True,), "pi0.5 memory frames are not implemented")
    cfg.refuse_if("use_proprioceptive_memory", (True,), "pi0.5 proprioceptive memory is not implemented")
    cfg.refuse_if("adapt_to_pi_aloha", (True,), "the Aloha gripper space conversion is not implemented")
    cfg.refuse_if("n_obs_steps", lambda v: v != 1, "only single-frame observations are supported")
    return cfg


def lerobot_normalizers(
    directory: Path, cfg: LeRobotConfig, tensors: dict, state_dim: int, action_dim: int
) -> tuple[FeatureNormalizer, FeatureNormalizer, str]:
    """(state, action) normalisers from the processor files, else from model buffers."""
    found = lerobot_processor_stats(directory)
    norm_map = dict(cfg.get("normalization_mapping") or {})
    eps = 1e-8
    if found is not None:
        stats, file_map, eps = found
        norm_map.update(file_map)
        where = "policy_preprocessor.json / policy_postprocessor.json"
    else:
        stats = lerobot_buffer_stats(tensors)
        where = "normalisation buffers in model.safetensors"
    out = []
    for kind, key, dim in (("STATE", STATE_KEY, state_dim), ("ACTION", ACTION_KEY, action_dim)):
        mode = lerobot_mode(norm_map.get(kind, "IDENTITY"), str(cfg.path))
        have = {k: np.asarray(v, dtype=np.float32) for k, v in stats.get(key, {}).items()}
        if mode != "identity" and not have:
            raise CheckpointError(
                f"{directory}: {kind} uses {mode} normalisation but no statistics for {key!r} "
                f"were found (looked in {where}); accepted: a LeRobot policy directory as "
                "saved by save_pretrained, with its processor files"
            )
        out.append(FeatureNormalizer(what=key, dim=dim, mode=mode, stats=have, convention="lerobot", eps=eps))
    return out[0], out[1], where
