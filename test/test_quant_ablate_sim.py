"""`quantvla ablate --sim mt10`: every saved variant runs in paired closed loop with FP."""

import json

from quantvla_core.cli import main


def test_ablate_runs_variants_in_closed_loop_and_reports_success(tmp_path, capsys):
    out = tmp_path / "ablate.json"
    rc = main(
        [
            "ablate",
            "tiny",
            "--schemes",
            "w8a8",
            "--layouts",
            "llm",
            "--variants",
            "none",
            "--samples",
            "3",
            "--no-progress",
            "--save-dir",
            str(tmp_path / "arts"),
            "--out",
            str(out),
            "--sim",
            "mt10",
            "--episodes",
            "1",
            "--tasks",
            "reach-v3",
            "--workers",
            "1",
            "--max-steps",
            "24",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "closed loop, MT10 held-out starts, 1 episodes per task" in text
    rows = json.loads(out.read_text())["rows"]
    # Table 1 row (llm) and the selective layout Table 2 starts from (llm+dit-mlp)
    assert [(r["layout"], r["variant"]) for r in rows] == [("llm", "none"), ("llm+dit-mlp", "none")]
    assert all(0.0 <= r["success"] <= 1.0 and r["mcnemar_p_vs_fp"] is not None for r in rows)
    report = json.loads((tmp_path / "arts" / "eval" / "eval.json").read_text())
    assert set(report["variants"]) == {"fp", "w8a8_llm_none", "w8a8_llm-dit-mlp_none"}
    assert report["config"]["settings"]["max_steps"] == 24
    starts = [[o[:3] for o in v["episode_outcomes"]] for v in report["variants"].values()]
    assert all(st == [["reach-v3", 1000, 0]] for st in starts)  # the same held-out start for all


def test_ablate_sim_needs_a_save_dir(capsys):
    assert main(["ablate", "tiny", "--sim", "mt10", "--no-progress"]) == 2
    assert "--save-dir" in capsys.readouterr().err
