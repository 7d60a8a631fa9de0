"""End-to-end chunk latency and memory, FP vs W8A8 / W4A8 / W4A4 (and peers), from a checkout.

    python benchmarks/e2e.py --preset small --cameras 1,3                 # CPU
    python benchmarks/e2e.py --preset small --cameras 1 --census          # launches and bytes
    python benchmarks/e2e.py --preset pi05-3b --cameras 3 --device cuda --quick
    bash benchmarks/e2e_gpu.sh                                            # the GPU run, one call

The code is in benchmarks/quantvla_bench/. It times the quantvla_core and kernels/ of this
checkout (put first on the import path, so an installed copy does not shadow them). Results go
to ./runs/bench under the current directory unless --out says otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_checkout = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_checkout), str(_checkout / "benchmarks")]
if "quantvla_kernels" not in sys.modules:  # the checkout's kernels/ is the package quantvla_kernels
    _spec = importlib.util.spec_from_file_location(
        "quantvla_kernels",
        _checkout / "kernels" / "__init__.py",
        submodule_search_locations=[str(_checkout / "kernels")],
    )
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["quantvla_kernels"] = _mod
    _spec.loader.exec_module(_mod)

from quantvla_bench.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
