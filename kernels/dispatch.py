"""Backend choice for the integer ops, the lazy Triton import and small launch-grid helpers.

Which backend an op runs on (``backend=`` keyword, :func:`set_default_backend`,
:func:`backend_scope`, else by device) and the import of the Triton kernel modules on first
use.  The backends themselves and the math they share are described in ops.py.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("triton", "cpu", "reference")

_state = threading.local()
_global_default: str | None = None


# ----------------------------------------------------------------------------- backend choice
def set_default_backend(name: str | None) -> None:
    """Force every op (unless given ``backend=``) onto one backend; None restores dispatch."""
    global _global_default
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS} or None")
    _global_default = name


@contextlib.contextmanager
def backend_scope(name: str | None) -> Iterator[None]:
    """Context manager: ops inside run on ``name`` (thread-local); lets a whole Policy be
    compared between backends without touching its modules."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS} or None")
    prev = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = prev


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend an op will use for tensors on ``device``."""
    name = backend or getattr(_state, "backend", None) or _global_default
    if name is None:
        return "triton" if device.type == "cuda" else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; accepted: {BACKENDS}")
    return name


def triton_interpreting() -> bool:
    """Whether Triton kernels defined now run in the interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton: the flag is the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_modules(device: torch.device):
    """Import the Triton kernels lazily (the interpreter flag is read at import time)."""
    interpreted = triton_interpreting()
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "backend='triton' got CPU tensors but the Triton interpreter is off: set "
            "TRITON_INTERPRET=1 before importing quantvla_kernels' Triton kernels, or use "
            "backend='cpu' / 'reference'")
    from . import triton_gemm, triton_quant

    return triton_gemm, triton_quant



# ----------------------------------------------------------------------------- grid helpers
def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
