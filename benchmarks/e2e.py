"""End-to-end chunk latency and memory, FP vs W8A8 / W4A8 / W4A4 (and peers): the same
benchmark as `quantvla bench`, runnable from a checkout that is not installed.

    python benchmarks/e2e.py --preset small --cameras 1,3                 # CPU
    python benchmarks/e2e.py --preset pi05-3b --cameras 3 --device cuda --quick
    bash benchmarks/e2e_gpu.sh                                            # the GPU run, one call

Results go to ./runs/bench under the current directory unless --out says otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

_root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_root))
try:
    import quantvla_kernels  # noqa: F401
except ImportError:  # not installed: kernels/ is the package
    import importlib.util

    _spec = importlib.util.spec_from_file_location("quantvla_kernels", _root / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(_root / "kernels")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["quantvla_kernels"] = _mod
    _spec.loader.exec_module(_mod)

from quantvla_core.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
