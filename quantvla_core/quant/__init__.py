"""QuantVLA post-training quantization: ``quantize_(model, QuantConfig(...), calib=..., spec=None)``
on any nn.Module, and ``quantize(policy, QuantConfig(...), calib)`` for the project's Policy.

Names are imported lazily so that loading a float policy never pays for the quantizer.
"""

from __future__ import annotations

_EXPORTS = {
    "quantize_": "api",
    "fold_smoothing_": "api",
    "quantized_copy": "api",
    "ArchSpec": "spec",
    "AttentionSpec": "spec",
    "quantize": "quantize",
    "QuantConfig": "config",
    "QuantResult": "quantize",
    "SCHEMES": "config",
    "QuantLinear": "qlinear",
    "quant_backend": "qlinear",
    "load_quantized": "artifact",
    "save_quantized": "artifact",
    "LAYOUTS": "layout",
    "RULES": "layout",
    "load_observations": "calibration",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
