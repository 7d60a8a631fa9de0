"""Closed-loop evaluation: scripted expert succeeds, noop fails, the paired test and intervals
match hand-computed values, reports are written, bad policies give clear errors."""

import json

import numpy as np
import pytest

from quantvla_core.sim.cli import main as sim_main
from quantvla_core.sim.demos import EnvSettings
from quantvla_core.sim.evaluate import EvalConfig, SimChunk, evaluate, parse_policy_specs
from quantvla_core.sim.stats import mcnemar_exact, wilson_interval

FAST = EnvSettings(image_size=32, max_steps=100)


def test_wilson_interval_matches_hand_computation():
    # 8/10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.41602 * sqrt(0.025604)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94332, abs=1e-4)
    # 0/10: upper bound z^2 / (n + z^2)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 3.84146 / 13.84146), abs=1e-5)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_mcnemar_exact_matches_binomial_tail():
    a = [True] * 2 + [False] * 8 + [True] * 5 + [False] * 3
    b = [False] * 2 + [True] * 8 + [True] * 5 + [False] * 3
    r = mcnemar_exact(a, b)
    assert (r["a_only"], r["b_only"], r["both"], r["neither"]) == (2, 8, 5, 3)
    assert r["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert mcnemar_exact([True, False], [False, True])["p_value"] == 1.0
    assert mcnemar_exact([True] * 4, [True] * 4)["p_value"] == 1.0
    assert mcnemar_exact([True] * 5, [False] * 5)["p_value"] == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_eval_cli_expert_succeeds_noop_fails_and_report_is_written(tmp_path, capsys):
    rc = sim_main(
        [
            "eval",
            "--sim",
            "mt10",
            "--policy",
            "expert",
            "--policy",
            "idle=noop",
            "--tasks",
            "reach-v3",
            "--episodes",
            "2",
            "--workers",
            "1",
            "--image-size",
            "32",
            "--max-steps",
            "100",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    expert, idle = report["variants"]["expert"], report["variants"]["idle"]
    assert (expert["successes"], expert["episodes"]) == (2, 2)
    assert (idle["successes"], idle["episodes"]) == (0, 2)
    assert expert["mean_steps"] < 100 and idle["mean_steps"] == 100
    assert idle["latency_ms"]["calls"] == 2 * 13  # 100 steps in chunks of 8: 13 inferences
    pair = report["paired"][0]
    assert (pair["a_only"], pair["b_only"], pair["p_value"]) == (2, 0, 0.5)
    # both variants ran exactly the same held-out starts
    starts = lambda v: [tuple(e[:3]) for e in v["episode_outcomes"]]  # noqa: E731
    assert starts(expert) == starts(idle) == [("reach-v3", 1000, 0), ("reach-v3", 1000, 1)]
    assert (tmp_path / "eval.png").stat().st_size > 5000
    assert "McNemar expert vs idle" in (tmp_path / "eval.txt").read_text()
    # traces: success in reach means the fingers came within 5 cm of the goal; idling never does
    assert all(t[0] <= 0.05 and t[1] is None for t in expert["episode_traces"])
    assert all(t[0] > 0.05 and t[2] > 0.05 for t in idle["episode_traces"])
    assert idle["tasks"]["reach-v3"]["failures"]["count"] == 2
    assert "reach-v3" in (tmp_path / "eval.txt").read_text().split("failed episodes")[1]
    assert "MEAN success" in capsys.readouterr().out


def test_eval_cli_runs_validation_seeds_and_refuses_training_seeds(tmp_path, capsys):
    rc = sim_main(
        [
            "eval",
            "--sim",
            "mt10",
            "--policy",
            "noop",
            "--tasks",
            "reach-v3",
            "--episodes",
            "2",
            "--workers",
            "1",
            "--image-size",
            "32",
            "--max-steps",
            "20",
            "--eval-seeds",
            "1002",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["config"]["eval_seeds"] == [1002]
    assert [tuple(e[:3]) for e in report["variants"]["noop"]["episode_outcomes"]] == [
        ("reach-v3", 1002, 0),
        ("reach-v3", 1002, 1),
    ]
    rc = sim_main(
        ["eval", "--sim", "mt10", "--policy", "noop", "--eval-seeds", "1002", "3", "--out", str(tmp_path / "refused")]
    )
    assert rc == 2 and "--eval-seeds [3] are demo (training) seeds" in capsys.readouterr().err
    rc = sim_main(
        [
            "eval",
            "--sim",
            "mt10",
            "--policy",
            "noop",
            "--eval-seeds",
            "1002",
            "1002",
            "--out",
            str(tmp_path / "refused"),
        ]
    )
    assert rc == 2 and "give distinct seeds >= 0" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


class _WrongShape:
    def predict(self, obs, seed=None):
        assert obs.images[0].shape == (32, 32, 3) and obs.state.shape == (4,)
        return SimChunk(np.zeros((8, 7), np.float32))


def test_policy_object_with_wrong_action_dim_is_rejected():
    cfg = EvalConfig(tasks=("reach-v3",), episodes_per_task=1, workers=1, settings=FAST)
    with pytest.raises(ValueError, match=r"MT10 needs \(horizon >= 1, 4\)"):
        evaluate([("wrong", _WrongShape())], cfg, progress=False)
    with pytest.raises(ValueError, match="neither 'expert'"):
        parse_policy_specs(["fp=/no/such/model"])
    with pytest.raises(ValueError, match="given twice"):
        parse_policy_specs(["expert", "expert"])
    with pytest.raises(ValueError, match="episodes_per_task"):
        evaluate(["expert"], EvalConfig(episodes_per_task=0), progress=False)


def test_runtime_policy_runs_in_the_loop():
    """The project's own Policy (random tiny weights) drives the env through its real API."""
    cfg = EvalConfig(
        tasks=("push-v3",),
        episodes_per_task=1,
        workers=1,
        replan_steps=4,
        settings=EnvSettings(image_size=32, max_steps=12),
    )
    report = evaluate(["tiny"], cfg, progress=False)
    v = report["variants"]["tiny"]
    assert v["episodes"] == 1 and v["latency_ms"]["calls"] == 3 and v["describe"]["name"]


@pytest.mark.slow
def test_parallel_workers_give_the_same_outcomes_as_serial():
    cfg = dict(tasks=("reach-v3", "drawer-close-v3"), episodes_per_task=2, settings=FAST)
    serial = evaluate(["expert"], EvalConfig(workers=1, **cfg), progress=False)
    parallel = evaluate(["expert"], EvalConfig(workers=2, **cfg), progress=False)
    assert serial["variants"]["expert"]["episode_outcomes"] == parallel["variants"]["expert"]["episode_outcomes"]


def test_failure_traces_tell_an_untouched_object_from_a_moved_one(tmp_path):
    """push-v3: the expert moves the puck onto the goal, idling never moves it; the report
    counts idle's failures as 'object never moved'."""
    from quantvla_core.sim.evaluate import OBJECT_MOVED_M
    from quantvla_core.sim.report import format_table

    cfg = EvalConfig(
        tasks=("push-v3",), episodes_per_task=2, workers=1, settings=EnvSettings(image_size=32, max_steps=120)
    )
    report = evaluate(["expert", "idle=noop"], cfg, progress=False)
    expert, idle = report["variants"]["expert"], report["variants"]["idle"]
    assert expert["successes"] == 2
    for closest, moved, final in expert["episode_traces"]:
        assert moved > 0.05 and final <= 0.05 and closest < 0.05
    for closest, moved, final in idle["episode_traces"]:
        assert moved < OBJECT_MOVED_M and final > 0.05
    assert idle["tasks"]["push-v3"]["failures"] == {
        "count": 2,
        "object_not_moved": 2,
        "median_min_hand_target_m": pytest.approx(np.median([t[0] for t in idle["episode_traces"]])),
        "median_final_goal_m": pytest.approx(np.median([t[2] for t in idle["episode_traces"]])),
    }
    assert "push-v3" in format_table(report).split("failed episodes")[1]


def _synthetic_report(n_variants: int, seeds=(1000, 1001)) -> dict:
    from quantvla_core.sim.env import TASKS as tasks

    variants = {
        f"v{i}": {
            "mean_success": 0.5,
            "mean_ci95": [0.3, 0.7],
            "tasks": {t: {"rate": 0.5, "ci95": [0.3, 0.7]} for t in tasks},
        }
        for i in range(n_variants)
    }
    return {"config": {"tasks": list(tasks), "episodes_per_task": 4, "eval_seeds": list(seeds)}, "variants": variants}


def test_plot_title_names_the_starts_it_ran():
    """Candidates chosen on validation starts must not be plotted as 'held-out'."""
    from quantvla_core.sim.report import starts_label

    assert starts_label(_synthetic_report(1)) == "held-out"
    assert starts_label(_synthetic_report(1, seeds=(1002,))) == "validation"
    assert starts_label(_synthetic_report(1, seeds=(1002, 1003))) == "validation"
    assert starts_label(_synthetic_report(1, seeds=(1000, 1002))) == "seed 1000,1002"


def test_many_variants_get_one_mean_bar_each(tmp_path):
    """An ablation's dozens of variants: one row per variant (the figure grows with them)
    instead of per-task groups too thin to read; a few variants keep the per-task groups."""
    from PIL import Image

    from quantvla_core.sim.report import MAX_GROUPED_VARIANTS, plot

    sizes = {}
    for n in (3, MAX_GROUPED_VARIANTS + 2, 2 * MAX_GROUPED_VARIANTS + 4):
        with Image.open(plot(_synthetic_report(n), tmp_path / f"{n}.png")) as im:
            sizes[n] = im.size
    few, many, more = sizes.values()
    assert few[0] > many[0]  # grouped bars: wide, one group per task
    assert many[0] == more[0] and more[1] > many[1]  # mean bars: one row per variant
    assert not list(tmp_path.glob("*.tmp.png"))
