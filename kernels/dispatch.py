"""Backend choice for the integer ops, the lazy Triton import and small launch-grid helpers.

Which backend an op runs on (``backend=`` keyword, :func:`set_default_backend`,
:func:`backend_scope`, else by device) and the import of the Triton kernel modules on first
use.  The backends themselves and the math they share are described in ops.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

import torch

BACKENDS = ("triton", "cpu", "reference")

_state = threading.local()
_global_default: str | None = None
log = logging.getLogger("quantvla_kernels")


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
            "backend='cpu' / 'reference'"
        )
    from . import triton_gemm, triton_quant

    return triton_gemm, triton_quant


# ----------------------------------------------------------------------------- fallbacks
def triton_build_errors() -> tuple[type[BaseException], ...]:
    """What Triton raises when this toolchain or card cannot build or launch a kernel variant:
    its own errors (compilation, out of shared memory / registers, ptxas) and the RuntimeError
    of a failing MLIR pass or driver launch. Anything else (TypeError, KeyError, ...) is a bug
    in the launcher and must propagate, not switch kernels."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as runtime_errors

    try:
        from triton.errors import TritonError  # the common base in recent Triton
    except ImportError:  # older Triton: the classes one by one
        TritonError = CompilationError
    extra = tuple(getattr(runtime_errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(runtime_errors, n))
    return (TritonError, CompilationError, RuntimeError, *extra)


_logged_fallbacks: set = set()


def log_fallback_once(what: str, err: BaseException, instead: str, level: int = logging.WARNING) -> None:
    """Log that ``what`` failed (with the exception as the reason) and ``instead`` runs; once
    per (what, reason) in a process, so a fallback taken on every call logs one line."""
    text = str(err).strip()
    reason = f"{type(err).__name__}: {text.splitlines()[-1][:300] if text else ''}"
    if (what, reason) in _logged_fallbacks:
        return
    _logged_fallbacks.add((what, reason))
    log.log(level, "%s failed (%s); %s", what, reason, instead)


# ----------------------------------------------------------------------------- grid helpers
def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
