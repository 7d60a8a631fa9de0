"""The fused CPU integer linear (cpu_int_linear.cpp), built on first use with the system C++
compiler and cached; without a compiler the torch-op lean path runs instead.

Why: on the CPU an integer linear's time at robot batch sizes is mostly the dozen eager ops
around ``torch._int_mm``; the extension does them in two loops (bit-identical numbers, see the
.cpp header). Building takes about a minute once per machine and torch version; the result is
cached under torch's extension folder (``TORCH_EXTENSIONS_DIR``, default ~/.cache).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("quantvla_kernels")

SOURCE = Path(__file__).with_name("cpu_int_linear.cpp")
# -fopenmp: ATen's parallel_for is a header template that runs serially unless the caller is
# compiled with OpenMP; the link resolves to the libgomp torch has already loaded (same soname).
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_module = None
_failed: str | None = None
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Use (True, default) or bypass (False) the extension; False selects the torch-op path,
    which computes the same numbers (benchmarks and tests compare the two)."""
    global _enabled
    _enabled = bool(enabled)


def failure() -> str | None:
    """Why the extension is not in use (None while it is, or before the first attempt)."""
    return _failed


def _build():
    import hashlib

    from torch.utils import cpp_extension

    try:  # the ninja wheel puts its binary next to the package, not necessarily on PATH
        import ninja

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    digest = hashlib.sha256(SOURCE.read_bytes() + repr(CFLAGS).encode()).hexdigest()[:12]
    return cpp_extension.load(
        name=f"quantvla_cpu_int_linear_{digest}",
        sources=[str(SOURCE)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        verbose=False,
    )


def module():
    """The compiled extension, or None (disabled, or the build failed: logged once with why)."""
    global _module, _failed
    if not _enabled:
        return None
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                _module = _build()
            except (OSError, RuntimeError, ImportError, SubprocessErrorTypes) as e:
                _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
                log.warning(
                    "fused CPU integer linear unavailable (%s); using the torch-op path (same numbers, slower)", _failed
                )
    return _module


try:
    from subprocess import CalledProcessError as _CPE

    SubprocessErrorTypes = _CPE
except ImportError:  # pragma: no cover
    SubprocessErrorTypes = RuntimeError
