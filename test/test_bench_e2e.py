"""The end-to-end benchmark: every entry point runs on `tiny` for one iteration and prints every
column; the runner computes the same chunk as Policy.predict; the quick quantizer deploys the
same layer structure as the PTQ pipeline; memory accounting from shapes matches a real model and
the quantization report. No timing assertions (this machine is shared)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantvla_bench.bench import TABLE_COLUMNS
from quantvla_bench.runs import observation as _observation
from quantvla_bench.bench import main as bench_main
from quantvla_bench.chunk_timing import ChunkRunner, stage_names
from quantvla_bench.variants import (
    PEERS,
    apply_ao_dynamic_int8,
    build_fp_model,
    check_peers,
    peer_available,
    quick_quantize,
    with_activation_bits,
)
from quantvla_core.config import preset
from quantvla_core.memory_accounting import account, meta_model
from quantvla_core.policy import Policy
from quantvla_core.quant import layout as L
from quantvla_core.quant.layer_plan import plan_layers
from quantvla_core.quant.qlinear import QuantLinear
from quantvla_core.quant.quantize import QuantConfig, quantize
from quantvla_core.quant.report import memory_report

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("fp", "w8a8", "w4a8", "w4a4")


def _check_result_files(out: Path, cameras: list[int], schemes=SCHEMES, steps: int = 3) -> dict:
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    assert res["format"] == "quantvla-bench-e2e"
    env = res["environment"]
    for key in ("date_utc", "command", "torch", "cpu", "device"):
        assert env[key], key
    got = {(r["cameras"], r["variant"]) for r in res["rows"]}
    assert got == {(c, s) for c in cameras for s in schemes}, (got, res["notes"])
    for r in res["rows"]:
        m = r["median_ms"]
        for stage in stage_names(steps) + ["denoise", "total", "step", "total@cpu"]:
            assert stage in m and m[stage] >= 0, stage
        assert m["denoise"] == pytest.approx(sum(m[f"denoise_step_{i}"] for i in range(steps)))
        assert r["speedup_vs_fp"]["total"] > 0
        if r["variant"] == "fp":
            assert r["speedup_vs_fp"]["total"] == pytest.approx(1.0)
    mem = res["memory"]["tiny"]
    assert set(mem) == set(schemes)
    assert mem["w4a8"]["total"]["bytes"] < mem["w8a8"]["total"]["bytes"] < mem["fp"]["total"]["bytes"]
    txt = files[0].with_suffix(".txt").read_text()
    assert "command:" in txt and "whole model" in txt
    png = files[0].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return res


def _check_printed_table(text: str, cameras: list[int], schemes=SCHEMES) -> None:
    header = next(line for line in text.splitlines() if line.startswith("preset"))
    for col in TABLE_COLUMNS:
        assert col in header, col
    rows = [line.split() for line in text.splitlines() if line.startswith("tiny ")]
    assert {(int(r[1]), r[3]) for r in rows} == {(c, s) for c in cameras for s in schemes}
    for r in rows:  # 16 columns; on the CPU only peak memory is '-'
        assert len(r) == len(TABLE_COLUMNS), r
        assert all(v != "-" for v in r[:-1]), r
        assert float(r[5]) > 0 and r[6].endswith("x")


def test_quantvla_bench_cli_on_tiny(tmp_path, capsys):
    out = tmp_path / "res"
    rc = bench_main(
        ["--preset", "tiny", "--cameras", "1,2", "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-progress"]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    _check_printed_table(printed, [1, 2])
    res = _check_result_files(out, [1, 2])
    assert not res["notes"]


def test_e2e_script_on_tiny(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "e2e.py"),
            "--preset",
            "tiny",
            "--cameras",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--quick",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    _check_printed_table(r.stdout, [1])
    res = _check_result_files(out, [1])
    assert "benchmarks/e2e.py" in res["environment"]["command"] and res["options"]["quick"]
    assert "-quick" in next(out.glob("*.json")).name


def test_calibrated_quantizer_and_smooth_only_entry_points(tmp_path, capsys):
    for extra in (["--quantizer", "calib"], ["--transforms", "smooth"]):
        out = tmp_path / extra[1]
        rc = bench_main(
            [
                "--preset",
                "tiny",
                "--schemes",
                "fp,w8a8",
                "--cameras",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--out",
                str(out),
                "--no-progress",
                "--no-png",
            ]
            + extra
        )
        assert rc == 0
        _check_printed_table(capsys.readouterr().out, [1], ("fp", "w8a8"))
        res = json.loads(next(out.glob("*.json")).read_text())
        assert {r["scheme"] for r in res["rows"]} == {"fp32", "w8a8"}
        assert res["options"][extra[0][2:]] == (extra[1] if extra[1] == "calib" else ["smooth"])


def test_memory_only_accounts_full_size_presets_from_shapes(tmp_path, capsys):
    rc = bench_main(["--memory-only", "--preset", "pi05-3b", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    assert "weight memory, pi05-3b" in capsys.readouterr().out
    res = json.loads(next(tmp_path.glob("e2e-memory-*-pi05-3b.json")).read_text())
    assert res["rows"] == []
    mem = res["memory"]["pi05-3b"]
    # integer layers at W4A8: int4 codes + one uint8 group multiplier per 128 weights
    # (0.25 + 1/256 of FP16) + one fp32 scale per output channel (4 bytes per row of K >= 1024
    # weights: at most 4/2048 more)
    t = mem["w4a8"]["total"]
    ratio = t["quantized_bytes"] / t["quantized_fp16_bytes"]
    assert 0.25 + 1 / 256 < ratio < 0.25 + 1 / 256 + 4 / 2048
    assert mem["w8a8"]["components"]["vision"] == mem["fp"]["components"]["vision"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--preset", "nope"], "accepted"),
        (["--schemes", "w3a3"], "accepted"),
        (["--exec", "graph", "--device", "cpu"], "CUDA"),
        (["--cameras", "0"], "positive"),
        (["--peers", "tensorrt"], "accepted"),
        (["--peers", "compile,bf17"], "bf17"),
        (["--census-backend", "triton"], "--census"),
        (["--census", "--memory-only"], "accepted"),
        (["--census", "--peers", "bf16"], "accepted"),
        (["--transforms", "permute"], "smooth"),
    ],
)
def test_bad_arguments_name_what_is_accepted(argv, needle, capsys, tmp_path):
    rc = bench_main(["--out", str(tmp_path), "--no-progress"] + argv)
    assert rc == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_runner_times_the_chunk_policy_predict_computes(dtype):
    """The bench times the deployed path: the batch Policy.predict feeds the model (an absent
    camera and the padding tokens left out), the fp32 integration of the network run in the
    policy dtype, the same de-normalisation. One camera fewer than the model reads and bf16
    make any difference in those show in the actions."""
    cfg = preset("tiny")
    obs = _observation(cfg, cfg.max_cameras - 1)
    for scheme in ("fp", "w8a8"):
        model = build_fp_model(cfg, torch.device("cpu"), torch.float32)
        if scheme != "fp":
            quick_quantize(model, cfg.arch, scheme)
        pol = Policy(model, cfg, device="cpu", dtype=dtype, scheme=scheme)
        runner = ChunkRunner(pol, obs, exec_mode="eager", seed=3)
        t = runner.run()
        expected = pol.predict(obs, seed=3).actions
        np.testing.assert_array_equal(runner.last_actions, expected)
        assert set(stage_names(cfg.num_steps)) <= set(t)
        batch, _noise = runner._inputs()  # the vision tower and the backbone see no blank input
        assert batch.images.shape[1] == len(obs.images) and bool(batch.token_mask.all())
        seen = []

        @contextlib.contextmanager
        def record(name):
            seen.append(name)
            yield
            seen.append("/" + name)

        np.testing.assert_array_equal(runner.run_staged(record), expected)  # what the census counts
        assert seen == [x for n in stage_names(cfg.num_steps) for x in (n, "/" + n)]
    with pytest.raises(ValueError, match="CUDA"):
        ChunkRunner(pol, obs, exec_mode="graph")


def _same_structure(quick: dict, pipeline: dict) -> None:
    """Same integer layers, shapes, bit widths, groups, bias, static scales; rotation where the
    pipeline rotates (its per-group search may drop a rotation the quick path keeps: the quick
    structure is then the costlier one). In-kernel smoothing is not compared: the pipeline now
    keeps it where its traced fold check fails on the calibration data."""
    assert quick.keys() == pipeline.keys()
    fixed = ("in_features", "out_features", "w_bits", "a_bits", "group_size", "bias", "permute", "static_act")
    for n, q in quick.items():
        p = pipeline[n]
        assert {k: q[k] for k in fixed} == {k: p[k] for k in fixed}, n
        assert p["rotation_block"] in (0, q["rotation_block"]), n


@pytest.mark.parametrize("name", ["tiny", "tiny-groot"])
def test_quick_quantizer_deploys_the_pipelines_layer_structure(name):
    """Same integer layers, bit widths, groups and (at most the same) rotation as quantize()."""
    cfg = preset(name)
    for scheme in ("w8a8", "w4a8", "w4a4"):
        teacher = Policy.load(name, device="cpu", dtype="fp32")
        qc = QuantConfig(scheme=scheme, calib_samples=2, batch_size=2, atm=False, ohb=False, heldout_fraction=0.0)
        student = quantize(teacher, qc, "synthetic", report=False, progress=False)
        model = build_fp_model(cfg, torch.device("cpu"), torch.float32)
        quick_quantize(model, cfg.arch, scheme)
        quick = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        _same_structure(quick, student.meta["modules"])


def test_quick_quantizer_without_rotation_matches_the_pipeline_smooth_only():
    cfg = preset("tiny-pi05")
    teacher = Policy.load("tiny-pi05", device="cpu", dtype="fp32")
    qc = QuantConfig(
        scheme="w8a8", transforms=("smooth",), calib_samples=2, batch_size=2, atm=False, ohb=False, heldout_fraction=0.0
    )
    student = quantize(teacher, qc, "synthetic", report=False, progress=False)
    model = quick_quantize(
        build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch, "w8a8", transforms=("smooth",)
    )
    quick = {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    _same_structure(quick, student.meta["modules"])
    assert all(s["rotation_kind"] is None for s in quick.values())
    assert all(s["rotation_kind"] is None for s in student.meta["modules"].values())
    with pytest.raises(ValueError, match="accepted"):
        quick_quantize(model, cfg.arch, "w8a8", transforms=("permute",))


def test_w4a4_from_w4a8_equals_a_fresh_w4a4():
    cfg = preset("tiny")
    a = quick_quantize(build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch, "w4a8")
    b = with_activation_bits(a, 4)
    c = quick_quantize(build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch, "w4a4")
    sb, sc = b.state_dict(), c.state_dict()
    assert sb.keys() == sc.keys()
    for k in sb:
        assert torch.equal(sb[k], sc[k]), k
    x = torch.randn(3, 64)
    ql_b = b.get_submodule("paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj")
    ql_c = c.get_submodule("paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj")
    assert ql_b.a_bits == 4
    torch.testing.assert_close(ql_b(x), ql_c(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_memory_from_shapes_matches_a_real_model_and_the_quant_report(name):
    cfg = preset(name)
    teacher = build_fp_model(cfg, torch.device("cpu"), torch.float32)
    assert account(meta_model(cfg, "fp")) == account(teacher)
    for scheme in ("w8a8", "w4a8"):
        student = quick_quantize(build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch, scheme)
        acc = account(student)
        assert acc == account(meta_model(cfg, scheme))
        rep = memory_report(student, teacher)  # independent code in quant/report.py
        assert acc["total"]["quantized_bytes"] == rep["quantized_components_bytes"]
        assert acc["total"]["quantized_fp16_bytes"] == rep["quantized_components_fp16_bytes"]
        assert acc["total"]["bytes"] == rep["model_bytes"]
        assert account(teacher)["total"]["bytes"] == rep["model_fp16_bytes"]
        # per component: components without integer layers are unchanged
        fp = account(teacher)["components"]
        assert acc["components"]["vision"] == fp["vision"]
        assert acc["components"]["backbone"]["bytes"] < fp["backbone"]["bytes"]


def test_plan_keeps_vision_and_expert_attention_float():
    cfg = preset("tiny")
    names = [p.name for p in plan_layers(meta_model(cfg, "fp"), cfg.arch, "w4a8")]
    assert names and not any("vision_tower" in n or "gemma_expert.model.layers.0.self_attn" in n for n in names)
    assert any("gemma_expert" in n and "mlp" in n for n in names)


# ---- peers on the CPU ------------------------------------------------------------------------------


def test_cpu_peers_build_run_and_print_a_row(tmp_path, capsys):
    """compile, bf16 and ao-dynamic-int8 are timed by the same runner as FP; torchao is skipped
    with a note where it is not installed."""
    from torch._dynamo.utils import counters

    out = tmp_path / "res"
    counters.clear()
    rc = bench_main(
        [
            "--preset",
            "tiny",
            "--cameras",
            "1",
            "--schemes",
            "fp",
            "--repeats",
            "1",
            "--quick",
            "--peers",
            "all",
            "--out",
            str(out),
            "--no-progress",
            "--no-png",
        ]
    )
    assert rc == 0
    # the compile peer really ran compiled stage functions (the runner calls sample_actions,
    # which must reach them)
    assert counters["frames"]["ok"] >= 3, dict(counters["frames"])
    printed = capsys.readouterr().out
    res = json.loads(next(out.glob("*.json")).read_text())
    torchao = all(peer_available(p)[0] for p in ("torchao-int8dq", "torchao-int4wo"))
    cpu_peers = ["compile", "bf16", "fp32-blas", "ao-dynamic-int8"] + (
        ["torchao-int8dq", "torchao-int4wo"] if torchao else []
    )
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"fp", *cpu_peers}, res["notes"]
    _check_printed_table(printed, [1], ["fp"] + cpu_peers)
    for name in cpu_peers:
        r = rows[name]
        assert r["exec"] == "eager" and r["repeats"] == 1 and r["speedup_vs_fp"]["total"] > 0
        assert r["median_ms"]["total"] > 0 and r["warmup_s"] >= 0
    assert rows["bf16"]["scheme"] == "bf16" and rows["fp"]["scheme"] == "fp32"
    # torch.compile compiles in its (untimed) first chunks, and says how long that took
    assert rows["compile"]["warmup_s"] > rows["fp"]["warmup_s"]
    assert any("compile + warm-up" in n for n in res["notes"])
    if not torchao:
        assert any("torchao-int8dq skipped: torchao not importable" in n for n in res["notes"])
    assert "DeprecationWarning" not in printed


@pytest.mark.parametrize("name", ["tiny", "tiny-pi05", "tiny-groot"])
def test_ao_dynamic_int8_replaces_exactly_the_layouts_integer_linears(name):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    cfg = preset(name)
    reference = build_fp_model(cfg, torch.device("cpu"), torch.float32)
    modules = dict(reference.named_modules())
    expected = {
        e.name
        for e in L.plan_model(reference, cfg.arch, "quantvla")
        if e.integer and isinstance(modules[e.name], torch.nn.Linear)
    }
    assert expected
    model = apply_ao_dynamic_int8(build_fp_model(cfg, torch.device("cpu"), torch.float32), cfg.arch)
    dynamic = {n for n, m in model.named_modules() if isinstance(m, DynamicLinear)}
    assert dynamic == expected
    floats = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert floats == {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)} - expected
    assert len(dynamic) == len([p for p in plan_layers(reference, cfg.arch, "w8a8")])
    pol = Policy(model, cfg, device="cpu", dtype="fp32", scheme="ao-dynamic-int8")
    runner = ChunkRunner(pol, _observation(cfg, 1))
    runner.run()
    assert np.all(np.isfinite(runner.last_actions))


def test_peer_availability_names_why():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert peer_available("compile", cpu) == (True, "")
    assert peer_available("bf16", cpu, "fp32") == (True, "")
    ok, why = peer_available("bf16", cuda, "bf16")
    assert not ok and "already" in why
    ok, why = peer_available("ao-dynamic-int8", cuda, "bf16")
    assert not ok and "CPU only" in why
    assert peer_available("ao-dynamic-int8", cpu, "fp32")[0]
    assert peer_available("fp32-blas", cpu, "fp32")[0]
    for why in (peer_available("fp32-blas", cuda, "bf16")[1], peer_available("fp32-blas", cpu, "bf16")[1]):
        assert why
    assert not peer_available("ao-dynamic-int8", cpu, "bf16")[0]
    assert check_peers(["all"]) == list(PEERS)
    assert check_peers(["bf16", "all"])[0] == "bf16" and len(check_peers(["bf16", "all"])) == len(PEERS)


def test_default_output_folder_is_runs_bench_under_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = bench_main(["--memory-only", "--preset", "tiny", "--no-progress"])
    assert rc == 0
    files = list((tmp_path / "runs" / "bench").glob("e2e-memory-*-tiny.*"))
    assert {f.suffix for f in files} == {".json", ".txt"}
    assert "runs/bench" in capsys.readouterr().out


def test_installed_packages_hold_no_benchmark_code():
    """The benchmark runs from a checkout: setup.py installs none of it, and no installed module
    imports it (the library's own needs, such as the layer plan, live in the library)."""
    import ast
    import re

    setup = (ROOT / "setup.py").read_text()
    packages = re.search(r"packages=\[(.*?)\]", setup, re.S).group(1)
    assert "bench" not in packages
    for pkg in ("quantvla_core", "quantvla_ros", "kernels"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.split(".")[0] in ("quantvla_bench", "benchmarks") for n in names), path
    assert not [
        p.name
        for p in (ROOT / "quantvla_core").glob("*.py")
        if p.stem in ("bench", "bench_variants", "census", "chunk_timing")
    ]
    from quantvla_core.cli import build_parser

    with pytest.raises(SystemExit):  # no `quantvla bench`: the script is the one way to run it
        build_parser().parse_args(["bench", "--preset", "tiny"])


def test_fp32_blas_peer_runs_f_linear_where_fp_runs_onednn():
    """The fp32-blas peer is the FP model with PyTorch's own fp32 GEMM: same parameters, its
    chunks launch no oneDNN linear, FP's do, and both predict the same actions (to GEMM rounding)."""
    import argparse

    from test_models_cpu_linear import OpNames as Ops

    from quantvla_bench.bench import BenchOptions, add_arguments
    from quantvla_bench.runs import Variants

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = preset("small")  # tiny's layers are below oneDNN's size threshold
    variants = Variants(cfg, BenchOptions.from_args(p.parse_args(["--preset", "small"])))
    runs = {}
    for name in ("fp", "fp32-blas"):
        runner = ChunkRunner(variants.build(name), _observation(cfg, 1))
        with Ops() as ops:
            runner.run()
        runs[name] = (ops.names, runner.last_actions)
    assert any("mkldnn._linear_pointwise" in n for n in runs["fp"][0])
    assert not any("mkldnn._linear_pointwise" in n for n in runs["fp32-blas"][0])
    np.testing.assert_allclose(runs["fp32-blas"][1], runs["fp"][1], rtol=1e-4, atol=1e-4)
    assert variants.build("fp32-blas").model.action_in_proj.weight is variants.fp().model.action_in_proj.weight


def test_model_bytes_counts_tensor_subclass_weights_by_their_inner_tensors():
    """A peer whose weights are tensor subclasses (torchao) has no plain storage: its bytes are
    those of the inner tensors (here an fp32 copy: the same as the dense weight)."""
    from quantvla_bench.chunk_timing import model_bytes
    from test_models_cpu_linear import _Wrapped
    from torch import nn

    lin = nn.Linear(64, 32)
    dense = model_bytes(lin)
    lin.weight = nn.Parameter(_Wrapped(lin.weight.detach().clone()), requires_grad=False)
    assert model_bytes(lin) == dense == (64 * 32 + 32) * 4
