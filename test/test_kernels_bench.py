"""benchmarks/kernels.py runs end to end on the CPU and writes a table and JSON we can read back."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_benchmark_cpu_one_iteration(tmp_path, capsys):
    bench = _load_bench()
    result = bench.main(["--device", "cpu", "--iters", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["device_type"] == "cpu"
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    methods = {r["method"] for r in data["rows"]}
    assert {"fp32", "int_mm", "w8a8", "w4a8_g128", "lin_w8a8", "lin_w4a8_g128"} <= methods
    for r in data["rows"]:
        assert r["us"] > 0 and r["tops"] > 0
        if "relerr" in r:  # our kernels against a float reference of the same integer codes
            assert r["relerr"] < 1e-3, r
        assert "WRONG" not in r["note"] and "failed" not in r["note"]
    table = (tmp_path / "table.txt").read_text()
    assert "tiny_up" in table and "w4a8_g128" in table
    # the table is the last thing printed
    assert printed.rstrip().endswith(table.strip().splitlines()[-1].rstrip())


def test_targets_evaluated_from_rows():
    bench = _load_bench()
    rows = [
        dict(layer="backbone_up", M=1, K=2048, N=16384, method=m, us=us, bytes=1, ops=1.0, note="")
        for m, us in (("bf16", 27.0), ("int_mm", 17.5), ("w8a8", 13.0), ("w4a8_g128", 10.0))
    ]
    bench.derive(rows, bench.CEILINGS["H100"])
    t = {x["target"]: x for x in bench.check_targets(rows)}
    assert t["backbone_up M=1 w8a8 >= 1.8x bf16"]["met"] is True
    assert t["backbone_up M=1 w4a8 >= 3x bf16"]["met"] is False
    assert t["backbone_up M=1 w8a8 not slower than int_mm"]["met"] is True


def test_gpu_check_runs_on_the_cpu_under_the_interpreter(capsys):
    """The GPU script's correctness step, on tiny shapes with the Triton interpreter: it runs
    end to end, and passes (Triton vs the exact CPU path, q/k/v fusion bit for bit)."""
    import importlib.util

    from quantvla_kernels.dispatch import triton_interpreting

    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # 3 shapes x (w8a8, w4a8, w4a4) + w4a8 with float group scales on the first 2 + the adaptive norm
    assert "GPU CHECK PASSED" in out and out.count(" ok") == 12


def test_gpu_all_script_is_valid_bash():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_all.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
