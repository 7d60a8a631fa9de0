"""State / action normalisation exactly as each original policy defines it, and the files the
statistics come from.

Why two conventions: LeRobot and openpi write the same modes with different epsilons.
- LeRobot (NormalizerProcessorStep): mean_std (x - mean) / (std + eps), inverse x * std + mean;
  min_max and quantiles 2 (x - lo) / (hi - lo) - 1 with eps only where hi == lo; eps = 1e-8.
- openpi (transforms.Normalize): mean_std (x - mean) / (std + 1e-6), inverse x (std + 1e-6) + mean;
  quantiles (x - q01) / (q99 - q01 + 1e-6) * 2 - 1 and its exact inverse.
- GR00T (LeRobot's groot processor): min_max 2 (x - min) / (max - min) - 1, but 0 where
  max == min, and the inverse gives min there.
The robot's vectors are shorter than the model's (padded to 32 in pi0): `normalize` takes the
robot's dimension and `pad`s with zeros; `unnormalize` reads the first robot-dim entries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy

from ..checkpoint import CheckpointError

MODES = ("identity", "mean_std", "min_max", "quantiles", "quantile10")
STATS_FOR = {
    "mean_std": ("mean", "std"),
    "min_max": ("min", "max"),
    "quantiles": ("q01", "q99"),
    "quantile10": ("q10", "q90"),
    "identity": (),
}
CONVENTIONS = ("lerobot", "openpi", "groot")


@dataclass
class FeatureNormalizer:
    """One feature (state or action) of `dim` entries in the robot's units."""

    what: str
    dim: int
    mode: str = "identity"
    stats: dict | None = None  # name -> float32 (dim,)
    convention: str = "lerobot"
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CheckpointError(f"{self.what}: unsupported normalisation mode {self.mode!r}; accepted: {MODES}")
        if self.convention not in CONVENTIONS:
            raise CheckpointError(f"{self.what}: unknown convention {self.convention!r}; accepted: {CONVENTIONS}")
        stats = {}
        for name in STATS_FOR[self.mode]:
            if not self.stats or name not in self.stats:
                raise CheckpointError(
                    f"{self.what}: normalisation mode {self.mode} needs the statistic "
                    f"{name!r}, which the checkpoint's stats do not have "
                    f"(have: {sorted(self.stats or {})})"
                )
            v = np.asarray(self.stats[name], dtype=np.float32).reshape(-1)
            if v.shape != (self.dim,):
                raise CheckpointError(
                    f"{self.what}: statistic {name!r} has {v.size} entries; the checkpoint's "
                    f"{self.what} feature has {self.dim}"
                )
            if not np.all(np.isfinite(v)):
                raise CheckpointError(f"{self.what}: statistic {name!r} contains NaN or inf")
            stats[name] = v
        self.stats = stats

    def _lo_hi(self) -> tuple[np.ndarray, np.ndarray]:
        lo_name, hi_name = STATS_FOR[self.mode]
        return self.stats[lo_name], self.stats[hi_name]

    def normalize(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"{self.what} has {x.size} entries; this policy expects {self.dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{self.what} contains NaN or inf; accepted: {self.dim} finite numbers")
        if self.mode == "identity":
            return x.copy()
        if self.mode == "mean_std":
            mean, std = self.stats["mean"], self.stats["std"]
            denom = std + (1e-6 if self.convention == "openpi" else self.eps)
            return ((x - mean) / denom).astype(np.float32)
        lo, hi = self._lo_hi()
        if self.convention == "openpi":
            return ((x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0).astype(np.float32)
        if self.convention == "groot":  # GR00T: constant dimensions map to 0 (and back to min)
            d = hi - lo
            return np.where(d != 0, 2.0 * (x - lo) / np.where(d != 0, d, 1.0) - 1.0, 0.0).astype(np.float32)
        denom = np.where(hi - lo == 0, np.float32(self.eps), hi - lo)
        return (2.0 * (x - lo) / denom - 1.0).astype(np.float32)

    def unnormalize(self, y) -> np.ndarray:
        """y (..., >= dim) model output; returns (..., dim) in the robot's units."""
        y = np.asarray(y, dtype=np.float32)
        if y.shape[-1] < self.dim:
            raise ValueError(f"model output has {y.shape[-1]} {self.what} entries, fewer than {self.dim}")
        y = y[..., : self.dim]
        if self.mode == "identity":
            return y.copy()
        if self.mode == "mean_std":
            mean, std = self.stats["mean"], self.stats["std"]
            return (y * (std + 1e-6) + mean if self.convention == "openpi" else y * std + mean).astype(np.float32)
        lo, hi = self._lo_hi()
        if self.convention == "openpi":
            return ((y + 1.0) / 2.0 * (hi - lo + 1e-6) + lo).astype(np.float32)
        if self.convention == "groot":
            d = hi - lo
            return np.where(d != 0, (y + 1.0) * 0.5 * d + lo, lo).astype(np.float32)
        denom = np.where(hi - lo == 0, np.float32(self.eps), hi - lo)
        return ((y + 1.0) / 2.0 * denom + lo).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "dim": self.dim,
            "mode": self.mode,
            "convention": self.convention,
            "eps": self.eps,
            "stats": {k: v.tolist() for k, v in (self.stats or {}).items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureNormalizer":
        return cls(
            what=d["what"],
            dim=int(d["dim"]),
            mode=d["mode"],
            stats=d.get("stats"),
            convention=d.get("convention", "lerobot"),
            eps=float(d.get("eps", 1e-8)),
        )


def pad(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim` (openpi / LeRobot pad_vector)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] > dim:
        raise ValueError(f"vector of {x.shape[-1]} entries does not fit the model's {dim}")
    out = np.zeros(x.shape[:-1] + (dim,), dtype=np.float32)
    out[..., : x.shape[-1]] = x
    return out


# -- LeRobot ---------------------------------------------------------------------------------
LEROBOT_MODE_NAMES = {
    "IDENTITY": "identity",
    "MEAN_STD": "mean_std",
    "MIN_MAX": "min_max",
    "QUANTILES": "quantiles",
    "QUANTILE10": "quantile10",
}


def lerobot_mode(name: str, where: str) -> str:
    if name not in LEROBOT_MODE_NAMES:
        raise CheckpointError(
            f"{where}: unsupported normalization mode {name!r}; accepted: {', '.join(LEROBOT_MODE_NAMES)}"
        )
    return LEROBOT_MODE_NAMES[name]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


def _read_stats_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the processor config names it as the statistics file")
    try:
        return load_numpy(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def lerobot_processor_stats(directory: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str], float] | None:
    """Stats, norm_map and eps from `policy_preprocessor.json` / `policy_postprocessor.json`.

    Returns None when the directory has neither file (older checkpoints keep the statistics as
    buffers inside model.safetensors instead, see `lerobot_buffer_stats`).
    """
    stats: dict[str, dict[str, np.ndarray]] = {}
    norm_map: dict[str, str] = {}
    eps = 1e-8
    found = False
    for name, step_names in (
        ("policy_preprocessor.json", ("normalizer_processor",)),
        ("policy_postprocessor.json", ("unnormalizer_processor",)),
    ):
        path = directory / name
        if not path.is_file():
            continue
        found = True
        cfg = _read_json(path)
        for step in cfg.get("steps", []):
            if step.get("registry_name") not in step_names:
                continue
            conf = step.get("config", {})
            eps = float(conf.get("eps", eps))
            norm_map.update(conf.get("norm_map", {}))
            if step.get("state_file"):
                for flat, arr in _read_stats_file(directory / step["state_file"]).items():
                    feature, stat = flat.rsplit(".", 1)
                    stats.setdefault(feature, {})[stat] = arr
    return (stats, norm_map, eps) if found else None


def lerobot_buffer_stats(tensors: dict) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot <= 0.3 kept stats as `normalize_inputs.buffer_observation_state.mean` etc."""
    stats: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        for prefix in ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_"):
            if k.startswith(prefix):
                feature, stat = k[len(prefix) :].rsplit(".", 1)
                stats.setdefault(feature.replace("_", ".", 1) if feature.startswith("observation_") else feature, {})[
                    stat
                ] = v.float().numpy()
    return stats


# -- openpi ----------------------------------------------------------------------------------
def openpi_norm_stats(directory: Path) -> tuple[dict[str, dict[str, np.ndarray]], Path]:
    """`assets/<asset_id>/norm_stats.json` ({"norm_stats": {"state": {...}, "actions": {...}}})."""
    # the asset id may contain a slash (openpi uses the repo id, e.g. physical-intelligence/libero)
    candidates = sorted(directory.glob("assets/**/norm_stats.json")) + sorted(directory.glob("norm_stats.json"))
    if not candidates:
        raise CheckpointError(
            f"{directory}: no assets/<asset_id>/norm_stats.json; an openpi checkpoint "
            "keeps its normalisation statistics there (copy the training run's assets/)"
        )
    if len(candidates) > 1:
        raise CheckpointError(
            f"{directory}: several norm_stats.json files ({', '.join(str(c) for c in candidates)}); "
            "keep only the one of the robot you deploy on"
        )
    d = _read_json(candidates[0])
    raw = d.get("norm_stats") if isinstance(d, dict) else None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{candidates[0]}: expected an object with key 'norm_stats'")
    stats = {}
    for feature, s in raw.items():
        if not isinstance(s, dict):
            raise CheckpointError(f"{candidates[0]}: norm_stats[{feature!r}] must be an object of lists")
        stats[feature] = {k: np.asarray(v, dtype=np.float32) for k, v in s.items() if v is not None}
    return stats, candidates[0]


# -- GR00T (LeRobot) ---------------------------------------------------------------------------
def groot_processor(directory: Path) -> dict | None:
    """Stats, min-max switch and embodiment tag of LeRobot's groot pre/post-processor files."""
    path = directory / "policy_preprocessor.json"
    if not path.is_file():
        return None
    out: dict = {"stats": {}, "normalize_min_max": True, "embodiment_tag": None, "embodiment_mapping": None}
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        if not (directory / name).is_file():
            continue
        for step in _read_json(directory / name).get("steps", []):
            reg = step.get("registry_name", "")
            if not reg.startswith(("groot_pack_inputs", "groot_action_unpack_unnormalize")):
                continue
            conf = step.get("config", {})
            out["normalize_min_max"] = bool(conf.get("normalize_min_max", out["normalize_min_max"]))
            out["embodiment_tag"] = conf.get("embodiment_tag", out["embodiment_tag"])
            out["embodiment_mapping"] = conf.get("embodiment_mapping", out["embodiment_mapping"])
            if step.get("state_file"):
                for flat, arr in _read_stats_file(directory / step["state_file"]).items():
                    feature, stat = flat.rsplit(".", 1)
                    out["stats"].setdefault(feature, {})[stat] = arr
    return out
