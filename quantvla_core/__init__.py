"""quantvla core library (no ROS imports): reference VLAs, quantization, runtime policy API."""

from .config import PRESETS, ModelConfig, preset
from .policy import ActionChunk, Observation, Policy

__all__ = [
    "Policy",
    "Observation",
    "ActionChunk",
    "ModelConfig",
    "preset",
    "PRESETS",
    "quantize",
    "QuantConfig",
    "quantize_",
    "ArchSpec",
]


def __getattr__(name):  # the quantizer is imported on first use: it pulls in the kernels
    if name in ("quantize", "QuantConfig", "quantize_", "ArchSpec"):
        from . import quant

        return getattr(quant, name)
    raise AttributeError(name)
