"""QuantVLA post-training quantization: ``quantize(policy, QuantConfig(...), calib)``.

Names are imported lazily so that loading a float policy never pays for the quantizer.
"""
from __future__ import annotations

_EXPORTS = {
    "quantize": "quantize", "QuantConfig": "quantize", "QuantResult": "quantize", "SCHEMES": "quantize",
    "QuantLinear": "qlinear", "quant_backend": "qlinear",
    "load_quantized": "artifact", "save_quantized": "artifact",
    "LAYOUTS": "layout", "RULES": "layout",
    "load_observations": "calibration",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
