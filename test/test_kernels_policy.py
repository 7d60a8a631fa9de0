"""A quantized `tiny` policy run through the kernel dispatch path agrees with the reference.

`reference` is QuantLinear's float64 oracle (dequantize, matmul); `cpu` and `triton` run the
integer kernels of quantvla_kernels (Triton under the interpreter here).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from quantvla_kernels.ops import triton_interpreting  # noqa: E402

import quantvla_core.quant.quantize as quant  # noqa: E402
from quantvla_core import Observation, Policy  # noqa: E402
from quantvla_core.quant.qlinear import quant_backend  # noqa: E402

TRITON_OK = triton_interpreting() or torch.cuda.is_available()


@pytest.fixture(scope="module")
def quantized_tiny():
    torch.manual_seed(0)
    policy = Policy.load("tiny", dtype="fp32")
    qc = quant.QuantConfig(scheme="w4a8", calib_samples=3, batch_size=3, transforms=("smooth", "rotate"))
    return quant.quantize(policy, qc, "synthetic", progress=False).policy


def _obs():
    rng = np.random.default_rng(7)
    return Observation(
        images=[rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)],
        instruction="pick up the cup",
        state=rng.normal(size=4).astype(np.float32),
    )


def test_quantized_tiny_policy_dispatch_matches_reference(quantized_tiny):
    obs = _obs()
    with quant_backend("reference"):
        ref = quantized_tiny.predict(obs, seed=1).actions
    with quant_backend("cpu"):
        cpu = quantized_tiny.predict(obs, seed=1).actions
    assert np.isfinite(ref).all() and ref.shape == cpu.shape
    # Integer GEMM + fp32 epilogue vs the float64 oracle of the same codes: rounding-level only
    # (a code can flip at a rounding boundary, so not bit-exact).
    np.testing.assert_allclose(cpu, ref, rtol=0, atol=2e-3 * max(1.0, float(np.abs(ref).max())))
    if TRITON_OK:
        with quant_backend("triton"):
            tri = quantized_tiny.predict(obs, seed=1).actions
        np.testing.assert_allclose(tri, cpu, rtol=0, atol=1e-5 * max(1.0, float(np.abs(cpu).max())))
