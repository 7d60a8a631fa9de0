"""The end-to-end benchmark with QuantLinear's lean CPU forward switched off, for a before/after
comparison on one commit: every integer layer then takes the general path
(``quantize_per_token`` + ``gemm_*`` with full checks, 4-bit weights unpacked on every call),
which is what the CPU path computed before the lean forward existed (same outputs, bit for bit).

    python benchmarks/e2e_cpu_general_path.py --preset small --cameras 1,3 --no-progress
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantvla_core.quant.qlinear import QuantLinear  # noqa: E402

_init = QuantLinear.__init__


def _general_only_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self._lean_cpu = False


if __name__ == "__main__":
    QuantLinear.__init__ = _general_only_init
    from quantvla_core.bench import main
    sys.exit(main(sys.argv[1:], prog="benchmarks/e2e_cpu_general_path.py"))
