"""The kernels' fallbacks: each catches only what says "this Triton / card cannot build the
variant" (triton_build_errors), logs the reason once, and computes the same numbers with the
kernel it falls back to; anything else propagates.  Under the Triton interpreter nothing is
built, so there every failure is a bug and propagates too.

A real build failure needs a GPU whose Triton rejects a kernel; here it is injected at the
launch (the kernel object raises before running), and the fallback's consequence (the other
kernel, the log line) runs for real.
"""

import logging
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import quantvla_kernels as qk  # noqa: E402
from quantvla_kernels import dispatch, gemm, quantize  # noqa: E402
from quantvla_kernels.ops import triton_interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1 (CPU run)")

W4_SWAPPED = dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_K=1, SWAP=True)


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """Forget which fallbacks were logged (the set is per process) and capture the log."""
    monkeypatch.setattr(dispatch, "_logged_fallbacks", set())
    caplog.set_level(logging.INFO, logger="quantvla_kernels")
    return caplog


def _hadamard(b):
    from quantvla_core.quant.transforms import hadamard

    return hadamard(b).to(torch.float32)


def _build_error():
    """What a failing MLIR pass of Triton's GPU backend raises."""
    return RuntimeError("PassManager::run failed")


class _FailsWhen:
    """Stands in for a Triton kernel: ``[grid](...)`` raises ``error`` when ``when(kwargs)``,
    else launches the real kernel."""

    def __init__(self, real, error, when=lambda kw: True):
        self.real, self.error, self.when, self.calls = real, error, when, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(kw)
            if self.when(kw):
                raise self.error
            return self.real[grid](*args, **kw)

        return launch


def test_log_fallback_once_logs_each_reason_once(fresh_log):
    for _ in range(3):
        dispatch.log_fallback_once(
            "building kernel A", RuntimeError("too much shared memory\nneeds 300 KB"), "using kernel B"
        )
    dispatch.log_fallback_once("building kernel A", RuntimeError("ptxas crashed"), "using kernel B")
    lines = [r.getMessage() for r in fresh_log.records]
    assert lines == [
        "building kernel A failed (RuntimeError: needs 300 KB); using kernel B",
        "building kernel A failed (RuntimeError: ptxas crashed); using kernel B",
    ]
    assert all(r.levelno == logging.WARNING for r in fresh_log.records)


def test_build_errors_are_triton_and_runtime_errors_only():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    caught = dispatch.triton_build_errors()
    for err in (RuntimeError("x"), OutOfResources(300_000, 232_448, "shared memory")):
        assert isinstance(err, caught)
    assert issubclass(CompilationError, caught)
    for err in (TypeError("x"), KeyError("BLOCK_M"), ValueError("x"), AssertionError("x")):
        assert not isinstance(err, caught)


# ---------------------------------------------------------------- row-wise quantization kernel
@pytest.mark.parametrize("error", [_build_error(), TypeError("unexpected keyword argument 'CHUNK'")])
def test_row_kernel_failure_in_the_interpreter_propagates(monkeypatch, fresh_log, error):
    """No silent switch to the tile kernel where nothing is built: a failure is a bug."""
    from quantvla_kernels import triton_quant

    monkeypatch.setattr(quantize, "_ROW_BROKEN", False)
    monkeypatch.setattr(triton_quant, "row_quant_kernel", _FailsWhen(triton_quant.row_quant_kernel, error))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    with pytest.raises(type(error)):
        qk.quantize_per_token(x, 8, None, _hadamard(64), backend="triton")
    assert quantize._ROW_BROKEN is False and not fresh_log.records


def test_row_kernel_fallback_logs_once_and_gives_the_same_codes(monkeypatch, fresh_log):
    monkeypatch.setattr(quantize, "_ROW_BROKEN", False)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(2)) * 3
    want = qk.quantize_per_token(x, 8, None, _hadamard(64), backend="triton")
    for _ in range(2):
        quantize._disable_row_kernel(_build_error())
    assert len(fresh_log.records) == 1
    msg = fresh_log.records[0].getMessage()
    assert "row-wise quantization kernel" in msg and "PassManager::run failed" in msg and "tile kernel" in msg
    spy = []
    real = quantize._launch_row_quant
    monkeypatch.setattr(quantize, "_launch_row_quant", lambda *a, **kw: spy.append(1) or real(*a, **kw))
    got = qk.quantize_per_token(x, 8, None, _hadamard(64), backend="triton")
    assert spy == []  # the tile kernel ran
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------- swapped W4 GEMM
def _w4_operands(seed=3, m=5, k=256, n=64):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    xs = torch.rand(m, generator=g) + 0.5
    wq = qk.pack_int4(torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8))
    ws = torch.rand(n, generator=g) + 0.5
    return xq, xs, wq, ws


@pytest.mark.parametrize("error", [_build_error(), KeyError("SWAP")])
def test_swapped_w4_failure_in_the_interpreter_propagates(monkeypatch, fresh_log, error):
    """Before, any exception of the swapped launch switched to the unswapped kernel, also in the
    interpreter, where it can only be a bug in the swapped kernel."""
    from quantvla_kernels import triton_gemm

    monkeypatch.setattr(gemm, "_W4_SWAP_BROKEN", False)
    failing = _FailsWhen(triton_gemm.w4_kernel, error, when=lambda kw: kw["SWAP"])
    monkeypatch.setattr(triton_gemm, "w4_kernel", failing)
    with pytest.raises(type(error)):
        qk.gemm_w4a8(*_w4_operands(), backend="triton", config=W4_SWAPPED)
    assert [kw["SWAP"] for kw in failing.calls] == [True]  # no second, unswapped launch
    assert gemm._W4_SWAP_BROKEN is False and not fresh_log.records


def test_swapped_w4_fallback_logs_once_and_gives_the_same_output(monkeypatch, fresh_log):
    from quantvla_kernels import triton_gemm

    monkeypatch.setattr(gemm, "_W4_SWAP_BROKEN", False)
    ops = _w4_operands()
    want = qk.gemm_w4a8(*ops, backend="cpu")
    for _ in range(2):
        gemm._disable_w4_swap(_build_error())
    assert len(fresh_log.records) == 1
    assert "swapped W4 GEMM kernel" in fresh_log.records[0].getMessage()
    spy = _FailsWhen(triton_gemm.w4_kernel, None, when=lambda kw: False)
    monkeypatch.setattr(triton_gemm, "w4_kernel", spy)
    got = qk.gemm_w4a8(*ops, backend="triton", config=W4_SWAPPED)
    assert [kw["SWAP"] for kw in spy.calls] == [False]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
