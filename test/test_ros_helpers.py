"""The policy node's helpers without DDS: stamp matching, chunk merging, burst logging, input
checks, power meters (on sysfs trees written here) and parameter descriptors."""

import math

import numpy as np
import pytest

pytest.importorskip("rclpy")

from quantvla_ros.burst_log import BurstLogger  # noqa: E402
from quantvla_ros.chunk_aggregation import ChunkAggregator  # noqa: E402
from quantvla_ros.diagnostics import LatencyStats, RateMeter, make_status, status_values  # noqa: E402
from quantvla_ros.frame_sync import FrameStore  # noqa: E402
from quantvla_ros.input_validation import (  # noqa: E402
    InputError,
    check_stamp,
    clean_instruction,
    joint_state_vector,
)
from quantvla_ros.power import EnergyMeter, Ina3221Source, RaplSource, detect_power_source  # noqa: E402


def _img(v):
    return np.full((2, 2, 3), v, np.uint8)


def test_frame_store_keeps_newest_reference_and_matches_by_stamp():
    fs = FrameStore(2, queue_size=3)
    fs.put(1, 0.98, _img(10))
    fs.put(1, 1.10, _img(11))
    fs.put(0, 1.00, _img(0))
    fs.put(0, 1.11, _img(1))  # replaces the unused 1.00 frame: one drop
    assert fs.dropped == [1, 0]
    m, reason = fs.take_matched(0.02)
    assert reason == "" and m.stamp_s == 1.11 and m.images[1][0, 0, 0] == 11
    assert abs(m.skew_s - 0.01) < 1e-9
    assert fs.take_matched(0.02) == (None, "no_new_frame")
    fs.put(0, 1.50, _img(2))
    m, reason = fs.take_matched(0.02)
    assert m is None and reason == "unmatched:1"
    gen = fs.generation
    assert not fs.wait_for_new(0.01, after_generation=gen)  # nothing new since the miss
    fs.put(1, 1.505, _img(12))
    assert fs.wait_for_new(0.01, after_generation=gen)
    m, _ = fs.take_matched(0.02)
    assert m.stamp_s == 1.50 and m.images[1][0, 0, 0] == 12


def test_weighted_average_aligns_by_stamp_and_latest_only_replaces():
    agg = ChunkAggregator("weighted_average", weight_new=0.7, dt=0.1)
    old = np.arange(8, dtype=np.float32)[:, None].repeat(2, 1)
    merged, blended = agg.merge(old, t_start=10.0)
    assert blended == 0 and np.array_equal(merged, old)
    new = np.full((8, 2), 100.0, np.float32)
    merged, blended = agg.merge(new, t_start=10.3)  # old steps 3..7 overlap new steps 0..4
    assert blended == 5
    expect = new.copy()
    expect[:5] = 0.7 * 100 + 0.3 * old[3:8]
    np.testing.assert_allclose(merged, expect, rtol=1e-6)
    agg2 = ChunkAggregator("latest_only", dt=0.1)
    agg2.merge(old, 0.0)
    merged, blended = agg2.merge(new, 0.1)
    assert blended == 0 and np.array_equal(merged, new)
    with pytest.raises(ValueError, match="latest_only"):
        ChunkAggregator("average")


def test_burst_logger_logs_once_per_burst():
    now = [0.0]
    lines = []
    log = BurstLogger(lines.append, quiet_s=5.0, clock=lambda: now[0])
    for i in range(30):
        now[0] = i * 0.03
        log.report("camera0", "truncated", "bad frame")
    assert len(lines) == 1
    now[0] = 20.0
    log.report("camera0", "truncated", "bad frame")
    log.report("camera0", "other", "another problem")
    assert len(lines) == 3 and "29 more suppressed" in lines[1]


@pytest.mark.parametrize(
    "text,code",
    [
        ("", "instruction_empty"),
        ("   \n\t ", "instruction_empty"),
        ("x" * 513, "instruction_too_long"),
        ("pick \u202eup", "instruction_bad_char"),
        ("pick\x00up", "instruction_bad_char"),
        ("pick \ue000", "instruction_bad_char"),
    ],
)
def test_instruction_refusals(text, code):
    with pytest.raises(InputError) as err:
        clean_instruction(text, 512)
    assert err.value.code == code


def test_instruction_accepts_any_script_and_normalises():
    assert clean_instruction("  pick   up\tthe cup ", 512) == "pick up the cup"
    assert clean_instruction("ramasse la tasse \u00e9\U0001f964", 512).endswith("\u00e9\U0001f964")
    assert clean_instruction("e\u0301", 512) == "\u00e9"  # NFC
    assert clean_instruction("把杯子拿起来", 512) == "把杯子拿起来"


def test_joint_state_vector_by_order_and_by_name():
    v = joint_state_vector(["a", "b"], [1.0, 2.0], 2, [])
    assert v.dtype == np.float32 and v.tolist() == [1.0, 2.0]
    assert joint_state_vector(["a", "b", "c"], [1, 2, 3], 2, ["c", "a"]).tolist() == [3.0, 1.0]
    for names, pos, wanted, code in (
        (["a"], [1.0], [], "joint_state_length"),
        (["a", "b"], [1.0, math.nan], [], "joint_state_nonfinite"),
        (["a", "b"], [1.0, math.inf], [], "joint_state_nonfinite"),
        (["a"], [1.0], ["a", "z"], "joint_state_missing"),
        (["a", "b"], [1.0], ["a", "b"], "joint_state_length"),
    ):
        with pytest.raises(InputError) as err:
            joint_state_vector(names, pos, 2, wanted)
        assert err.value.code == code


def test_stamp_checks():
    check_stamp(99.9, 100.0, 99.8, 1.0, 0.5)
    for args, code in (
        ((0.0, 100.0, None), "stamp_zero"),
        ((90.0, 100.0, None), "stamp_old"),
        ((101.0, 100.0, None), "stamp_future"),
        ((99.9, 100.0, 99.95), "stamp_out_of_order"),
    ):
        with pytest.raises(InputError) as err:
            check_stamp(*args, 1.0, 0.5)
        assert err.value.code == code


def test_stamp_checks_before_sim_clock_starts():
    check_stamp(1e9, 0.0, None, 1.0, 0.5)  # no /clock yet: neither "future" nor "old"
    with pytest.raises(InputError):
        check_stamp(5.0, 0.0, 6.0, 1.0, 0.5)


def test_latency_percentiles_and_rate():
    stats = LatencyStats(window=100)
    for v in range(1, 101):
        stats.add("total", float(v))
    pct = stats.percentiles("total")
    assert pct == {p: pytest.approx(np.percentile(np.arange(1, 101), p)) for p in (50, 90, 99)}
    assert stats.percentiles("missing") is None
    now = [0.0]
    rate = RateMeter(window_s=5.0, clock=lambda: now[0])
    for i in range(11):
        now[0] = i * 0.1
        rate.tick()
    assert rate.rate_hz() == pytest.approx(10.0)
    status = make_status("n", "cpu", 1, "msg", {"a": 1.5, "b": True, "c": "x"})
    assert status.level == b"\x01" and status_values(status) == {"a": "1.500", "b": "true", "c": "x"}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_rapl_energy_counter_unwraps(tmp_path):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(zone / "name", "package-0")
    _write(zone / "max_energy_range_uj", "1000000")
    _write(zone / "energy_uj", "900000")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5")  # subzone: ignored
    src = RaplSource(str(tmp_path))
    assert src.name == "rapl:package-0"
    clock = [0.0]
    meter = EnergyMeter(src, clock=lambda: clock[0])
    token = meter.start()
    _write(zone / "energy_uj", "100000")  # wrapped: +200000 uJ
    clock[0] = 0.5
    energy, power = meter.stop(token)
    assert energy == pytest.approx(0.2) and power == pytest.approx(0.4)


def test_ina3221_hwmon_prefers_vdd_in(tmp_path):
    hw = tmp_path / "sys/class/hwmon/hwmon3"
    _write(hw / "name", "ina3221")
    for ch, label, mv, ma in ((1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 400)):
        _write(hw / f"in{ch}_label", label)
        _write(hw / f"in{ch}_input", str(mv))
        _write(hw / f"curr{ch}_input", str(ma))
    src = Ina3221Source(str(tmp_path))
    assert src.name == "ina3221:VDD_IN" and src.power_w() == pytest.approx(6.0)
    source, note = detect_power_source("auto", "cpu", str(tmp_path))
    assert source.name == "ina3221:VDD_IN" and note == ""


def test_no_meter_is_named_unavailable(tmp_path):
    source, note = detect_power_source("auto", "cpu", str(tmp_path))
    assert source.name == "unavailable" and "rapl" in note and "nvml" in note
    assert EnergyMeter(source).start() is None
    with pytest.raises(ValueError, match="auto"):
        detect_power_source("watts", "cpu", str(tmp_path))


def test_parameter_descriptors_have_descriptions_and_ranges():
    from quantvla_ros import params as P

    names = [s.name for s in P.SPECS]
    assert len(names) == len(set(names))
    for required in (
        "model",
        "device",
        "dtype",
        "camera_topics",
        "camera_types",
        "instruction_topic",
        "joint_state_topic",
        "trajectory_topic",
        "joint_names",
        "action_dt",
        "replan_rate_hz",
        "actions_per_chunk",
        "chunk_aggregation",
        "action_min",
        "action_max",
        "clip_actions",
        "dry_run",
        "image_timeout_s",
        "instruction_timeout_s",
        "joint_state_timeout_s",
        "warmup_count",
        "diagnostics_period_s",
        "autostart",
    ):
        assert required in names
    for spec in P.SPECS:
        d = P.descriptor(spec)
        assert d.description
        if spec.lo is not None:
            assert d.floating_point_range or d.integer_range


@pytest.fixture
def param_node(monkeypatch):
    """A plain rclpy node in its own context (loopback discovery, a domain of this test's own)."""
    import os

    import rclpy
    from rclpy.parameter import Parameter

    # the run's domain (CI / a developer's, else conftest's per-run one)
    domain = int(os.environ.get("ROS_DOMAIN_ID") or 100 + (os.getpid() * 7 + 41) % 100)
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    nodes = []

    def make(**overrides):
        node = rclpy.create_node(
            f"param_node_{len(nodes)}",
            context=ctx,
            parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
        )
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.destroy_node()
    rclpy.try_shutdown(context=ctx)


def test_params_keep_blank_camera_types_but_drop_other_blanks(param_node):
    from quantvla_ros import params as P
    from quantvla_ros.policy_node import camera_kinds

    node = param_node(
        camera_topics=["/a/image_raw", "/b/image_raw/compressed"],
        camera_types=["", "compressed"],
        joint_names=["j0", "", "j1"],
    )
    P.declare_all(node)
    v = P.values(node)
    assert v["camera_types"] == ["", "compressed"]  # positional: "" = infer from the topic
    assert camera_kinds(v["camera_topics"], v["camera_types"]) == ["raw", "compressed"]
    assert v["joint_names"] == ["j0", "j1"]
    assert v["action_min"] == [] and v["state_joint_names"] == []  # unset typed lists


def test_write_params_is_atomic_and_reads_back(tmp_path):
    import yaml

    from quantvla_ros.node_process import write_params

    path = tmp_path / "params.yaml"
    write_params(str(path), {"n": {"camera_types": ["", "compressed"], "action_dt": 0.05}})
    assert yaml.safe_load(path.read_text()) == {
        "n": {"ros__parameters": {"camera_types": ["", "compressed"], "action_dt": 0.05}}
    }
    before = path.read_bytes()
    with pytest.raises(UnicodeEncodeError):  # a name that cannot be written as UTF-8
        write_params(str(path), {"n": {"bad\ud800": 1}})
    assert path.read_bytes() == before  # the old file stands, no temp file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def _load_script(name):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", root / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_node_overhead_json_write_leaves_no_temp_file_on_failure(tmp_path):
    import json

    bench = _load_script("node_overhead")
    path = tmp_path / "result.json"
    bench._write_json(str(path), {"p99_ms": 4.5, "n": 3})
    assert json.loads(path.read_text()) == {"p99_ms": 4.5, "n": 3}
    with pytest.raises(TypeError):  # not JSON-serialisable half way through
        bench._write_json(str(path), {"ok": 1, "bad": object()})
    assert json.loads(path.read_text()) == {"p99_ms": 4.5, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_kernel_bench_text_write_leaves_no_temp_file_on_failure(tmp_path):
    bench = _load_script("kernels")
    path = tmp_path / "out" / "table.txt"
    bench._atomic_write(path, "layer  us\n")
    assert path.read_text() == "layer  us\n"
    with pytest.raises(UnicodeEncodeError):
        bench._atomic_write(path, "bad \ud800")
    assert path.read_text() == "layer  us\n"
    assert [p.name for p in path.parent.iterdir()] == ["table.txt"]


def test_crossfade_and_inpaint_start_on_the_committed_actions():
    from quantvla_ros.chunk_aggregation import crossfade_weights, inpaint_weights

    old = np.arange(8, dtype=np.float32)[:, None].repeat(2, 1)
    new = np.full((8, 2), 100.0, np.float32)
    for mode in ("crossfade", "inpaint"):
        agg = ChunkAggregator(mode, dt=0.1, smoothing_steps=3)
        agg.merge(old, 10.0)
        merged, blended = agg.merge(new, 10.2, delay_steps=2)  # old steps 2.. meet new 0..
        assert merged[0, 0] == old[2, 0]  # the boundary continues the committed plan
        assert np.all(np.diff(merged[:, 0]) >= 0)  # then moves monotonically to the new plan
        np.testing.assert_allclose(merged[5:], new[5:])  # the new plan beyond the smoothing
        assert 1 <= blended <= 5
    np.testing.assert_allclose(crossfade_weights(5, 4), [1.0, 0.75, 0.5, 0.25, 0.0])
    w = inpaint_weights(8, 2, 3)
    assert list(w[:2]) == [1.0, 1.0] and np.all(np.diff(w[1:6]) < 0) and np.all(w[5:] == 0)
    agg = ChunkAggregator("inpaint", dt=0.1)
    state = agg.snapshot()
    agg.merge(old, 1.0)
    agg.restore(state)  # a refused chunk leaves no trace
    merged, blended = agg.merge(new, 1.1)
    assert blended == 0 and np.array_equal(merged, new)


def test_stamps_joint_states_and_limits_are_checked_whole():
    from builtin_interfaces.msg import Time

    from quantvla_ros.input_validation import InputError, joint_state_vector, stamp_seconds
    from quantvla_ros.policy_node import limits_problem

    assert stamp_seconds(Time(sec=3, nanosec=500_000_000)) == pytest.approx(3.5)
    with pytest.raises(InputError, match="nanosec") as e:
        stamp_seconds(Time(sec=3, nanosec=1_000_000_000))
    assert e.value.code == "stamp_invalid"
    with pytest.raises(InputError, match="2 names but 4 positions"):
        joint_state_vector(["a", "b"], [0.0] * 4, 4, [])
    with pytest.raises(InputError, match="velocity"):
        joint_state_vector([], [0.0] * 4, 4, [], velocities=[0.0])
    assert joint_state_vector([], [0.0] * 4, 4, []).shape == (4,)
    assert limits_problem([1.0, 0.0], [0.0, 1.0], 2).startswith("action_min must be < action_max")
    assert "finite" in limits_problem([float("nan")], [1.0], None)
    assert limits_problem([-1.0, -1.0], [], 2) is None and limits_problem([], [], 2) is None
    assert "3 action dimensions" in limits_problem([0.0] * 2, [1.0] * 2, 3)


def test_output_gate_and_deadline_monitor():
    from quantvla_ros.publishing import DeadlineMonitor, OutputGate

    sent = []

    class Pub:
        def publish(self, msg):
            sent.append(msg)

    gate = OutputGate()
    assert gate.publish(Pub(), 1) and not gate.publish(None, 2)
    gate.close()
    assert not gate.publish(Pub(), 3) and sent == [1]
    now = [0.0]
    d = DeadlineMonitor(clock=lambda: now[0])
    assert not d.record(50.0, 100.0) and d.record(150.0, 100.0) and d.record(120.0, 100.0)
    v = d.values()
    assert (v["deadline_misses"], v["deadline_misses_consecutive"]) == (2, 2)
    assert v["last_chunk_latency_ms"] == 120.0 and v["last_chunk_within_budget"] is False
    assert v["deadline_miss_ratio"] == pytest.approx(2 / 3) and d.missed_within(1.0)
    now[0] = 10.0
    assert not d.missed_within(1.0)
