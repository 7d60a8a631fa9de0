"""Calibration from robot recordings: topic choice, streaming, spread, held-out spans, errors, CLI.

The recordings are written here (``write_synthetic_recording``) with the topic mix of a real
robot: two colour cameras (rgb8 Image + JPEG CompressedImage), a 16UC1 depth stream, the URDF
on /robot_description, the instruction String and joint states.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from quantvla_core.config import preset
from quantvla_core.quant.calibration import CalibrationSource, load_observations, split_buffer
from quantvla_core.recordings import RecordingError, write_synthetic_recording

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = preset("tiny")  # 2 cameras, state_dim 4


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "robot.mcap"
    info = write_synthetic_recording(path, seconds=8, rate_hz=15, episodes=2)
    return path, info


def test_auto_selection_skips_depth_and_urdf_and_says_what_it_chose(bag, capsys):
    path, info = bag
    obs = load_observations(path, TINY, n=8)
    err = capsys.readouterr().err
    assert "cameras /cam_high/image_raw, /cam_wrist/image_raw/compressed" in err
    assert "instruction /instruction" in err and "state /joint_states" in err
    assert "/cam_high/depth/image_raw (encoding 16UC1)" in err  # named as not a camera
    assert "/robot_description (XML / JSON content)" in err
    assert len(obs) == 8
    for o in obs:
        assert len(o.images) == 2 and all(im.dtype == np.uint8 and im.shape == (96, 128, 3) for im in o.images)
        assert o.instruction in ("open the drawer", "push the button")  # never the URDF
        assert o.state.shape == (4,) and np.all(np.isfinite(o.state))
    # the rgb8 camera is returned as written; the wrist camera (flipped, JPEG) close to it
    o = obs[0]
    np.testing.assert_allclose(o.images[1].astype(float).mean(), o.images[0].astype(float).mean(), atol=3)


def test_samples_spread_over_the_recording_and_heldout_is_other_spans(bag):
    path, info = bag
    obs = load_observations(path, TINY, n=16)
    times = np.asarray(obs.times_ns)
    first, last = info["times_ns"][1], info["times_ns"][-1]
    assert np.all(np.diff(times) > 0)
    assert times[0] - first < 2e8 and last - times[-1] < 2e8  # from the start to the end
    gaps = np.diff(times)
    assert gaps.max() < 4 * np.median(gaps) + 2.5e9  # no big unsampled stretch (the 2 s pause aside)
    assert {o.instruction for o in obs} == {"open the drawer", "push the button"}  # both episodes
    calib, held = split_buffer(obs, 0.25)
    assert len(held) == 4 and len(calib) == 12
    held_ids = {id(o) for o in held}
    held_pos = [i for i, o in enumerate(obs) if id(o) in held_ids]
    # held-out frames come as stretches, never single frames wedged between calibration frames
    runs = np.split(np.asarray(held_pos), np.flatnonzero(np.diff(held_pos) > 1) + 1)
    assert all(len(r) >= 2 for r in runs)
    # with four episodes, whole episodes are held out
    path4 = path.parent / "four.mcap"
    write_synthetic_recording(path4, seconds=8, rate_hz=15, episodes=4, instructions=("a", "b", "c", "d"))
    obs4 = load_observations(path4, TINY, n=16)
    calib, held = split_buffer(obs4, 0.25)
    assert {o.instruction for o in held}.isdisjoint({o.instruction for o in calib}) and held
    # plain lists keep the old rule (last fraction held out)
    assert split_buffer(list(range(8)), 0.25) == ([0, 1, 2, 3, 4, 5], [6, 7])


def test_named_topics_flags_and_yaml(bag, tmp_path, capsys):
    path, info = bag
    one = load_observations(
        CalibrationSource(
            path, camera_topics=["cam_wrist/image_raw/compressed"], instruction_topic="/instruction", state_topic="none"
        ),
        TINY,
        n=4,
    )
    assert len(one[0].images) == 1 and not one[0].state.any()
    spec = tmp_path / "calib.yaml"
    spec.write_text(
        f"source: {path}\ncamera_topics: [/cam_wrist/image_raw/compressed, /cam_high/image_raw]\n"
        "instruction: stack the cups\n"
    )
    obs = load_observations(spec, TINY, n=4)
    assert [o.instruction for o in obs] == ["stack the cups"] * 4
    assert "cameras /cam_wrist/image_raw/compressed, /cam_high/image_raw" in capsys.readouterr().err
    with pytest.raises(
        ValueError,
        match=r"camera topic '/cam/missing' \(--camera-topics\) is not in the "
        r"recording; found: .*/cam_high/image_raw",
    ):
        load_observations(CalibrationSource(path, camera_topics=["/cam/missing"]), TINY, n=4)
    with pytest.raises(ValueError, match="is not a colour camera"):
        load_observations(CalibrationSource(path, camera_topics=["/cam_high/depth/image_raw"]), TINY, n=4)
    with pytest.raises(ValueError, match="is std_msgs/msg/String, accepted: sensor_msgs/msg/JointState"):
        load_observations(CalibrationSource(path, state_topic="/robot_description"), TINY, n=4)
    spec.write_text("camera_topics: [/a]\n")
    with pytest.raises(ValueError, match="needs a 'source' key"):
        load_observations(spec, TINY, n=4)


def test_ambiguous_or_missing_topics_are_named(tmp_path):
    from mcap_ros2.writer import Writer

    from quantvla_core.recordings import MSGDEFS, TEXT

    p = tmp_path / "two_strings.mcap"
    write_synthetic_recording(p, seconds=2, rate_hz=10, episodes=1)
    # a second short String topic: which is the instruction must be named
    q = tmp_path / "extra.mcap"
    with open(q, "wb") as f:
        w = Writer(f)
        w.write_message("/task_description", w.register_msgdef(TEXT, MSGDEFS[TEXT]), {"data": "wipe"}, 1, 1)
        w.finish()
    bagdir = tmp_path / "bagdir"
    bagdir.mkdir()
    os.replace(p, bagdir / "a_0.mcap")
    os.replace(q, bagdir / "a_1.mcap")
    with pytest.raises(ValueError, match=r"several String topics could be the instruction .*--instruction-topic"):
        load_observations(bagdir, TINY, n=4)
    assert len(load_observations(CalibrationSource(bagdir, instruction_topic="instruction"), TINY, n=4)) == 4


def test_truncated_and_foreign_files_get_clear_errors(bag, tmp_path):
    path, _ = bag
    data = path.read_bytes()
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        RecordingError,
        match=r"cut.mcap: the recording ends early after \d+ readable messages "
        r"\(truncated.*mcap recover",
    ):
        load_observations(cut, TINY, n=4)
    junk = tmp_path / "junk.mcap"
    junk.write_bytes(b"SQLite format 3\0" + bytes(100))
    with pytest.raises(RecordingError, match="not an MCAP file"):
        load_observations(junk, TINY, n=4)


def test_streaming_memory_is_bounded_by_the_samples_kept(tmp_path):
    path = tmp_path / "long.mcap"
    write_synthetic_recording(
        path,
        seconds=40,
        rate_hz=10,
        size=(120, 160),
        episodes=2,
        depth=False,
        wrist_compressed=False,
        compression="none",
    )
    frame = 120 * 160 * 3
    total = 400 * 2 * frame  # 46 MB of camera frames in the recording
    tracemalloc.start()
    try:
        obs = load_observations(path, TINY, n=6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(obs) == 6
    assert peak < 12 * 2**20 < total / 3, peak  # a few 1 MiB chunks + 6 samples, not the recording


def test_quantize_cli_from_a_recording_with_topic_flags(bag, tmp_path, capsys):
    from quantvla_core.cli import main

    path, _ = bag
    out = tmp_path / "art"
    old = os.umask(0o027)
    try:
        rc = main(
            [
                "quantize",
                "tiny",
                "--scheme",
                "w8a8",
                "--calib",
                str(path),
                "--samples",
                "6",
                "--camera-topics",
                "/cam_high/image_raw,/cam_wrist/image_raw/compressed",
                "--instruction-topic",
                "/instruction",
                "--state-topic",
                "/joint_states",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
    finally:
        os.umask(old)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "cameras /cam_high/image_raw, /cam_wrist/image_raw/compressed" in cap.err
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["calibration"]["source"] == str(path) and meta["calibration"]["samples"] == 6
    # files and the artifact directory follow the umask (0027 here), not a fixed 0600/0644
    assert (out / "report.json").stat().st_mode & 0o777 == 0o640
    assert out.stat().st_mode & 0o777 == 0o750
    rc = main(
        [
            "quantize",
            "tiny",
            "--calib",
            str(path),
            "--camera-topics",
            "/nope",
            "--no-progress",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'/nope' (--camera-topics) is not in the" in err


def test_progress_bar_and_no_ros_import(bag):
    path, _ = bag
    code = (
        "import sys; from quantvla_core.config import preset; "
        "from quantvla_core.quant.calibration import CalibrationSource, load_observations; "
        f"load_observations(CalibrationSource({str(path)!r}, progress=True), preset('tiny'), n=3); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'quantvla_ros', 'cv_bridge')]; "
        "print('ROS' if bad else 'clean', bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("clean"), r.stdout
    assert "sampling recording" in r.stderr and "scanning recording" in r.stderr


def test_bag_directory_files_in_recording_order(tmp_path):
    from quantvla_core.recordings import recording_files

    for name in ("bag_10.mcap", "bag_2.mcap", "bag_0.mcap", "bag_1.mcap", "metadata.yaml"):
        (tmp_path / name).write_bytes(b"")
    assert [f.name for f in recording_files(tmp_path)] == ["bag_0.mcap", "bag_1.mcap", "bag_2.mcap", "bag_10.mcap"]
    with pytest.raises(RecordingError, match="no .mcap files"):
        (tmp_path / "empty").mkdir()
        recording_files(tmp_path / "empty")
