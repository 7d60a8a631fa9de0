"""The ablation study as a library (quant/ablation.py), called without the command line."""

from __future__ import annotations

import pytest

from quantvla_core import Policy
from quantvla_core.quant.ablation import (
    ablation_combos,
    closed_loop_ablation,
    render_ablation,
    render_closed_loop,
    run_ablation,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_combos_are_the_two_tables_or_the_full_product():
    combos = ablation_combos(["w8a8", "w4a8"], ["llm", "llm+dit-mlp"], ["none", "atm"])
    # Table 1: each layout without ATM/OHB; Table 2: the other variants on the selective layout,
    # its "none" row shared with Table 1 (not run twice).
    assert combos == [
        ("w8a8", "llm", "none"),
        ("w8a8", "llm+dit-mlp", "none"),
        ("w4a8", "llm", "none"),
        ("w4a8", "llm+dit-mlp", "none"),
        ("w8a8", "llm+dit-mlp", "atm"),
        ("w4a8", "llm+dit-mlp", "atm"),
    ]
    full = ablation_combos(["w8a8"], ["llm", "dit-mlp"], ["none", "ohb"], full=True)
    assert full == [
        ("w8a8", "llm", "none"),
        ("w8a8", "llm", "ohb"),
        ("w8a8", "dit-mlp", "none"),
        ("w8a8", "dit-mlp", "ohb"),
    ]


def _row(scheme, layout, variant, cos, mem=0.5):
    return {
        "scheme": scheme,
        "layout": layout,
        "variant": variant,
        "cosine_mean": cos,
        "rel_l2_mean": 1 - cos,
        "memory_ratio": mem,
        "alpha_changed": 3 if "atm" in variant else 0,
        "beta_changed": 2 if "ohb" in variant else 0,
        "artifact": None,
    }


def test_render_puts_layouts_in_table_1_and_variants_in_table_2_with_gaps_marked():
    rows = [
        _row("w8a8", "llm", "none", 0.999),
        _row("w4a8", "llm", "none", 0.99),
        _row("w8a8", "llm+dit-mlp", "none", 0.998),
        _row("w8a8", "llm+dit-mlp", "atm+ohb", 0.9995),
    ]
    lines = render_ablation(rows).splitlines()
    t2 = lines.index("Table 2 shape: ATM / OHB on the selective layout (LLM + DiT MLP)")
    table1, table2 = lines[:t2], lines[t2:]
    # columns: schemes sorted (w4a8 first); the w4a8 run of llm+dit-mlp is missing -> dashes
    assert table1[1].split()[:3] == ["layout", "w4a8", "cos"]
    llm = next(ln for ln in table1 if ln.startswith("llm "))
    assert llm.split() == ["llm", "0.99000", "0.0100", "50.0%", "0.99900", "0.0010", "50.0%"]
    sel = next(ln for ln in table1 if ln.startswith("llm+dit-mlp"))
    assert sel.split()[1:4] == ["-", "-", "-"]
    both = next(ln for ln in table2 if ln.startswith("atm+ohb"))
    assert both.split()[-1] == "3/2"
    # without any ATM/OHB variant there is no Table 2
    assert "Table 2" not in render_ablation(rows[:3])


def test_run_ablation_on_tiny_saves_each_variant_and_reports_fidelity(tmp_path):
    policy = Policy.load("tiny", dtype="fp32")
    combos = [("w8a8", "llm", "none"), ("w8a8", "llm+dit-mlp", "ohb")]
    rows = run_ablation(policy, "synthetic", combos, {"calib_samples": 3}, progress=False, save_dir=tmp_path)
    assert [(r["scheme"], r["layout"], r["variant"]) for r in rows] == combos
    for r in rows:
        assert 0.9 < r["cosine_mean"] <= 1.0 + 1e-9 and 0.3 < r["memory_ratio"] < 0.6
    assert rows[0]["artifact"] == str(tmp_path / "w8a8_llm_none")
    saved = Policy.load(rows[1]["artifact"]).quant_meta["config"]
    assert (saved["layout"], saved["atm"], saved["ohb"], saved["calib_samples"]) == ("llm+dit-mlp", False, True, 3)
    assert "Table 2" in render_ablation(rows)


def test_closed_loop_needs_saved_variants_and_renders_success_against_fp():
    with pytest.raises(ValueError, match="w8a8_llm_none.*save_dir"):
        closed_loop_ablation("tiny", [_row("w8a8", "llm", "none", 0.99)], "unused")
    rows = [{**_row("w8a8", "llm", "none", 0.99), "success": 0.6, "mcnemar_p_vs_fp": 0.5}]
    report = {
        "config": {"episodes_per_task": 4},
        "variants": {"fp": {"mean_success": 0.75, "mean_ci95": [0.5, 0.9]}},
    }
    lines = render_closed_loop(rows, report).splitlines()
    assert lines[0] == "closed loop, MT10 held-out starts, 4 episodes per task (FP 75.0%, 95% CI 50.0%-90.0%)"
    assert lines[2].split() == ["w8a8", "llm", "none", "60.0%", "-15.0p", "0.500", "0.99000", "50.0%"]
