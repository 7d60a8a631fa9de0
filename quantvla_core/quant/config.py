"""`QuantConfig`: every setting that decides a quantized model (stored in quantization.json).

Its own module because both entry points read it: ``quantize()`` (quantize.py, the Policy API)
and ``quantize_`` / ``quantize_core`` (api.py, any nn.Module); quantize.py calls into api.py,
so the config cannot live in either without an import cycle. quantize.py re-exports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import layout as L
from .transforms import ROTATIONS, TRANSFORM_NAMES

SCHEMES: dict[str, tuple[int, int | None]] = {
    "w8a8": (8, 8),
    "w4a8": (4, 8),
    "w4a4": (4, 4),
    "w8a16": (8, None),
    "w4a16": (4, None),
}
ORDERS = ("sequential", "joint")


@dataclass
class QuantConfig:
    """Everything that decides the quantized model (stored in quantization.json)."""

    scheme: str = "w4a8"
    layout: str = "quantvla"
    group_size: int | None = 128  # int4 weights only; int8 weights are per output channel
    # int4 group scales as integer multiples (1..18) of one float scale per channel: the GEMM
    # then sums all groups in one int32 accumulator (W8A8's main loop); False: a float per group
    int_group_scales: bool = True
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
    activation: str = "dynamic"  # per-token dynamic, or "static" per-tensor from a percentile
    percentile: float = 99.9
    transforms: tuple[str, ...] = ("smooth", "rotate")
    smooth_strength: float = 0.5  # the strength used when smooth_search is off (also always tried)
    # Per layer group, pick the smoothing strength (0 = no smoothing) and, when "rotate" is among
    # the transforms, whether to rotate, by the group's output error on the calibration tokens.
    smooth_search: bool = False  # per-group grid search: opt-in (measured below fixed 0.5, docs)
    smooth_grid: tuple[float, ...] = (0.0, 0.15, 0.3, 0.5, 0.7, 0.85)
    search_rotation: bool = True
    rotation: str = "hadamard"
    rotation_block: int = 64
    fold_smoothing: bool = True  # into the preceding norm / producer linear where one exists
    atm: bool = True
    atm_backbone: bool = False
    atm_clamp: tuple[float, float] = (0.7, 1.4)
    atm_dead_zone: float = 0.02
    ohb: bool = True
    ohb_mlp: bool = False
    ohb_log_clamp: float = 0.30
    ohb_dead_zone: float = 0.03
    order: str = "sequential"
    calib_samples: int = 32
    heldout_fraction: float = 0.25
    batch_size: int = 8
    seed: int = 0
    token_samples: int = 512  # teacher input tokens kept per layer (per-layer error, static scales)

    def __post_init__(self) -> None:
        self.transforms = tuple(self.transforms)
        self.clip_grid = tuple(self.clip_grid)
        self.smooth_grid = tuple(float(g) for g in self.smooth_grid)
        if isinstance(self.layout, list):
            self.layout = tuple(self.layout)
        if any(not 0 <= g <= 1 for g in self.smooth_grid):
            raise ValueError(f"smooth_grid values must lie in [0, 1] (0 = no smoothing), got {list(self.smooth_grid)}")
        self.atm_clamp = tuple(self.atm_clamp)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; accepted: {', '.join(SCHEMES)}")
        L.check_layout(self.layout)
        bad = [t for t in self.transforms if t not in TRANSFORM_NAMES]
        if bad:
            raise ValueError(f"unknown transforms {bad}; accepted: {', '.join(TRANSFORM_NAMES)}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; accepted: {', '.join(ROTATIONS)}")
        if self.activation not in ("dynamic", "static"):
            raise ValueError(f"activation must be 'dynamic' or 'static', got {self.activation!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group_size must be an even number >= 2 or None, got {self.group_size}")
        if not (0 < self.atm_clamp[0] <= 1 <= self.atm_clamp[1]):
            raise ValueError(f"atm_clamp must bracket 1, got {self.atm_clamp}")
        for k in ("calib_samples", "batch_size", "token_samples"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")

    @property
    def bits(self) -> tuple[int, int | None]:
        return SCHEMES[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)
