"""The benchmark's `--census` (benchmarks/e2e.py): launch and byte counts per stage. The counter is checked against
hand counts on modules whose kernels are known, view ops are free, every stage of a tiny policy
launches work, and the Triton census counts one launch per kernel (quantization + GEMM per
integer linear of a denoising step) without the interpreter's own aten ops."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

from quantvla_bench import census as C
from quantvla_bench.runs import observation as _observation
from quantvla_bench.bench import main as bench_main
from quantvla_bench.chunk_timing import ChunkRunner
from quantvla_bench.variants import build_fp_model, quick_quantize
from quantvla_core.config import preset
from quantvla_core.policy import Policy
from quantvla_core.quant.qlinear import QuantLinear


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("inference", [False, True])
def test_linear_gelu_linear_counts_its_three_kernels_and_their_bytes(inference):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    census = C.OpCensus(seq)
    with torch.inference_mode(inference), census, census.stage("all"):
        y = seq(x)
    s = census.stats["all"]
    # 2-D input with bias: t (a view) + addmm; then gelu; then t + addmm
    assert s.launches == 3, s.ops
    assert s.ops == {"aten.addmm.default": 2, "aten.gelu.default": 1}
    h = torch.empty(2, 16)
    act = (_nbytes(x) + _nbytes(h)) + (_nbytes(h) + _nbytes(h)) + (_nbytes(h) + _nbytes(y))
    weights = sum(_nbytes(p) for p in seq.parameters())
    assert s.act_bytes == act
    assert s.act_read_bytes == _nbytes(x) + 2 * _nbytes(h)
    assert s.weight_bytes == weights
    assert s.triton_launches == 0


def test_view_ops_are_not_launches_but_copies_and_in_place_ops_are():
    x = torch.randn(4, 6, 8)
    census = C.OpCensus()
    with torch.inference_mode(), census:
        with census.stage("views"):
            x.view(24, 8).t().transpose(0, 1).unsqueeze(0).squeeze(0)
            x.permute(2, 0, 1).select(0, 1)[1:3].expand(2, 2, 6)
            x.split(2, dim=0), x.chunk(3, dim=1), x.unbind(0)
            x.reshape(-1), x.flatten(1), x.detach(), x.as_strided((2, 2), (1, 1)), x[..., None]
            x.contiguous(), x.to(torch.float32)  # already so: no copy
        with census.stage("copies"):
            x.transpose(0, 1).reshape(-1)  # not viewable: one copy
            x.add_(1.0)  # in place: writes x
            x.sum().item()  # a reduction, then a device->host read
    assert "views" not in census.stats or census.stats["views"].launches == 0
    s = census.stats["copies"]
    assert s.launches == 4, s.ops
    assert s.ops["aten.add_.Tensor"] == 1 and s.ops["aten._local_scalar_dense.default"] == 1
    # the copy and the in-place add each read and write x's bytes
    assert s.act_read_bytes >= 2 * _nbytes(x) and s.act_written_bytes >= 2 * _nbytes(x)


def test_expanded_inputs_count_their_distinct_elements_once():
    bias = torch.randn(16)
    assert C.tensor_bytes(bias.expand(1000, 16)) == _nbytes(bias)
    assert C.tensor_bytes(torch.empty(3, 0)) == 0


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05"])
def test_tiny_census_every_stage_of_every_variant_does_work(name, tmp_path, capsys):
    rc = bench_main(["--census", "--preset", name, "--cameras", "1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "launches per denoise step" in printed
    header = next(line for line in printed.splitlines() if line.startswith("preset"))
    assert all(col in header for col in ("stage", "launches", "act MiB", "weight MiB"))
    res = json.loads(next(tmp_path.glob(f"census-cpu-*-{name}.json")).read_text())
    assert res["format"] == "quantvla-bench-census"
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp", "bf16", "w8a8", "w4a8", "w4a4"}, res["notes"]
    for r in rows.values():
        st = r["stages"]
        for stage in ("vision", "prefix", "step", "denoise", "chunk"):
            assert st[stage]["launches"] > 0 and st[stage]["act_bytes"] > 0 and st[stage]["weight_bytes"] > 0, (
                r["variant"],
                stage,
            )
        steps = [st[f"denoise_step_{i}"]["launches"] for i in range(r["steps"])]
        assert len(set(steps)) == 1, steps  # every step runs the same kernels
        assert st["denoise"]["launches"] == sum(steps)
        parts = ("vision", "prefix", "denoise")
        assert st["chunk"]["launches"] >= sum(st[k]["launches"] for k in parts)
        assert r["kernel_backend"].startswith("cpu") or r["variant"] in ("fp", "bf16")
    # bf16 reads about half of fp32's weight bytes
    assert rows["bf16"]["stages"]["step"]["weight_bytes"] < 0.6 * rows["fp"]["stages"]["step"]["weight_bytes"]
    # integer layers read int8 / int4 codes where FP reads fp32 weights
    assert rows["w8a8"]["stages"]["step"]["weight_bytes"] < rows["fp"]["stages"]["step"]["weight_bytes"]
    assert (tmp_path / next(tmp_path.glob("census-*.json")).with_suffix(".txt").name).exists()


class _Kernels:
    """Stands in for a kernels module: count_triton_launches patches the kernels it holds."""


@triton.jit
def add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


_Kernels.add_one_kernel = add_one_kernel


def test_a_triton_launch_is_one_launch_and_the_interpreters_aten_ops_are_not_counted():
    from quantvla_kernels.ops import triton_interpreting

    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    x = torch.zeros(10)
    census = C.OpCensus()
    with C.count_triton_launches(census, [_Kernels]) as names, census, census.stage("k"):
        add_one_kernel[(1,)](x, 10, BLOCK=16)
    assert names == ["add_one_kernel"]
    assert torch.equal(x, torch.ones(10))
    s = census.stats["k"]
    assert (s.launches, s.triton_launches) == (1, 1), s.ops
    assert s.ops == {"triton:add_one_kernel": 1}
    assert s.act_read_bytes == _nbytes(x)
    assert "run" not in vars(add_one_kernel)  # restored


def test_triton_census_launches_a_quantization_and_a_gemm_per_integer_linear_of_a_step():
    from quantvla_kernels.ops import triton_interpreting

    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    cfg = preset("tiny")
    model = quick_quantize(build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch, "w8a8")
    pol = Policy(model, cfg, device="cpu", dtype="fp32", scheme="w8a8")
    obs = _observation(cfg, 1)
    # independent count: QuantLinear forwards per stage (a global hook also sees fused copies
    # of sibling layers that are not submodules)
    current, calls = [None], {}

    def hook(module, args, out):
        if isinstance(module, QuantLinear):
            calls[current[0]] = calls.get(current[0], 0) + 1

    @contextlib.contextmanager
    def stage(name):
        current[0] = name
        yield

    import quantvla_kernels

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        with quantvla_kernels.backend_scope("triton"):
            ChunkRunner(pol, obs, cfg.num_steps).run_staged(stage)
    finally:
        handle.remove()
    stats = C.census_policy(pol, obs, cfg.num_steps, backend="triton", warmup=False)
    step = stats["denoise_step_0"]
    n = calls["denoise_step_0"]
    assert n > 0
    quant = sum(c for k, c in step.ops.items() if k in ("triton:row_quant_kernel", "triton:norm_quant_kernel"))
    gemm = sum(c for k, c in step.ops.items() if k == "triton:w8a8_kernel")
    assert quant >= n and gemm >= n, (n, step.ops)
    assert step.triton_launches == sum(c for k, c in step.ops.items() if k.startswith("triton:"))
    assert step.launches > step.triton_launches  # float parts of the step are aten ops
    assert stats["vision"].triton_launches == 0  # the vision tower stays float in the layout


def test_census_backend_triton_without_the_interpreter_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import quantvla_kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)
    rc = bench_main(
        [
            "--census",
            "--census-backend",
            "triton",
            "--preset",
            "tiny",
            "--cameras",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET=1" in err and "accepted" in err
    assert not list(tmp_path.glob("*.json"))


def test_census_backend_needs_census(tmp_path, capsys):
    rc = bench_main(["--census-backend", "triton", "--preset", "tiny", "--out", str(tmp_path)])
    assert rc == 2
    assert "--census" in capsys.readouterr().err
