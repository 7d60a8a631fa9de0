"""Demo shards: write/read round trip, folder concatenation, truncated files, and a real
expert recording through the generator (successes only, resumable)."""

import json
import os

import numpy as np
import pytest

from quantvla_core.sim.demos import EnvSettings, generate_demos
from quantvla_core.sim.shards import Episode, load_demos, read_shard, write_shard

META = {"image_size": 8, "max_steps": 10}


def _episode(task, length, value, index=0):
    rng = np.random.default_rng(value)
    return Episode(
        task,
        0,
        index,
        f"do {task} #{value}",
        rng.integers(0, 256, (length, 2, 8, 8, 3), dtype=np.uint8),
        rng.standard_normal((length, 4)).astype(np.float32),
        rng.uniform(-1, 1, (length, 4)).astype(np.float32),
    )


def test_shard_round_trip_keeps_every_array_and_boundary(tmp_path):
    eps = [_episode("reach-v3", 3, 1), _episode("drawer-close-v3", 5, 2, index=4)]
    path = write_shard(tmp_path / "a.npz", eps, ("corner", "topview"), META)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temp file left behind
    shard = read_shard(path)
    assert shard.num_episodes == 2 and shard.cameras == ("corner", "topview")
    assert shard.meta["image_size"] == 8 and shard.meta["format"] == "quantvla-mt10-demos"
    np.testing.assert_array_equal(shard.episode_starts, [0, 3, 8])
    for want, e in zip(eps, range(2)):
        got = shard.episode(e)
        assert (got.task, got.seed, got.index, got.instruction) == (want.task, want.seed, want.index, want.instruction)
        for k in ("images", "states", "actions"):
            np.testing.assert_array_equal(getattr(got, k), getattr(want, k))


def test_folder_concatenation_offsets_episode_boundaries(tmp_path):
    write_shard(tmp_path / "a.npz", [_episode("reach-v3", 3, 1)], ("corner", "topview"), META)
    write_shard(
        tmp_path / "b.npz", [_episode("push-v3", 4, 2), _episode("push-v3", 2, 3, 1)], ("corner", "topview"), META
    )
    demos = load_demos(tmp_path)
    np.testing.assert_array_equal(demos.episode_starts, [0, 3, 7, 9])
    np.testing.assert_array_equal(demos.episode(2).actions, _episode("push-v3", 2, 3, 1).actions)
    assert [str(s) for s in demos.episode_instruction] == ["do reach-v3 #1", "do push-v3 #2", "do push-v3 #3"]


def test_truncated_or_foreign_shard_gives_clear_error(tmp_path):
    path = write_shard(tmp_path / "a.npz", [_episode("reach-v3", 3, 1)], ("corner", "topview"), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_shard(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="lacks keys"):
        read_shard(tmp_path / "other.npz")
    for name in ("dup/a.npz", "dup/b.npz"):  # the same start recorded by two runs
        write_shard(tmp_path / name, [_episode("reach-v3", 2, 5)], ("corner", "topview"), META)
    with pytest.raises(ValueError, match="is in both"):
        load_demos(tmp_path / "dup")
    with pytest.raises(ValueError, match="no demo shards"):
        load_demos(tmp_path / "empty")


def test_inconsistent_episode_is_refused_at_write(tmp_path):
    bad = _episode("reach-v3", 3, 1)
    bad.actions = bad.actions[:2]
    with pytest.raises(ValueError, match="lengths differ"):
        write_shard(tmp_path / "bad.npz", [bad], ("corner", "topview"), META)
    assert not list(tmp_path.iterdir())


def test_generator_records_expert_successes_and_resumes(tmp_path):
    settings = EnvSettings(image_size=32, max_steps=80)
    index = generate_demos(tmp_path, ["reach-v3"], per_task=2, workers=1, settings=settings, progress=False)
    assert index["episodes"] == 2 and index["tasks"]["reach-v3"]["expert_success"] == 1.0
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk["shards"] == ["reach-v3__s0_i00-01.npz"]
    demos = load_demos(tmp_path)
    assert demos.images.shape[1:] == (2, 32, 32, 3) and demos.images.mean() > 40
    assert np.all(np.abs(demos.actions) <= 1) and demos.states.shape[1] == 4
    lengths = np.diff(demos.episode_starts)
    assert np.all((lengths > 5) & (lengths < 80))  # ended at success, before the limit
    mtime = os.path.getmtime(tmp_path / on_disk["shards"][0])
    again = generate_demos(tmp_path, ["reach-v3"], per_task=2, workers=1, settings=settings, progress=False)
    assert again["episodes"] == 2
    assert os.path.getmtime(tmp_path / on_disk["shards"][0]) == mtime  # reused, not redone
    # A larger per_task with another chunking tops the folder up with new starts only (before,
    # the new jobs' shards repeated the first starts and the folder could no longer be read).
    more = generate_demos(tmp_path, ["reach-v3"], per_task=3, workers=1, settings=settings, chunk=5, progress=False)
    assert more["episodes"] == 3
    assert more["shards"] == ["reach-v3__s0_i00-01.npz", "reach-v3__s0_i02-02.npz"]
    assert os.path.getmtime(tmp_path / on_disk["shards"][0]) == mtime
    assert sorted(load_demos(tmp_path).episode_index.tolist()) == [0, 1, 2]


def _smooth_episode(task, length, index, size=32):
    """Images that change slowly in time (like rendered frames), so a video codec applies."""
    yy, xx = np.mgrid[0:size, 0:size]
    imgs = np.zeros((length, 2, size, size, 3), np.uint8)
    for t in range(length):
        for c in range(2):
            imgs[t, c, ..., 0] = (xx * 6 + t * 3 + c * 40) % 256
            imgs[t, c, ..., 1] = (yy * 5 + index * 20) % 256
            imgs[t, c, 8 + t % 8 : 16 + t % 8, 10:18, 2] = 220
    rng = np.random.default_rng(index)
    return Episode(
        task,
        0,
        index,
        f"do {task}",
        imgs,
        rng.standard_normal((length, 4)).astype(np.float32),
        rng.uniform(-1, 1, (length, 4)).astype(np.float32),
    )


@pytest.mark.parametrize("codec", ["jpeg", "video"])
def test_compact_bundle_keeps_actions_exact_and_images_close(tmp_path, codec):
    from quantvla_core.sim.compact import read_bundle, write_bundle

    eps = [_smooth_episode("reach-v3", 7, 0), _smooth_episode("drawer-close-v3", 5, 1)]
    write_shard(tmp_path / "demos" / "a.npz", eps, ("corner", "topview"), {"image_size": 32})
    info = write_bundle(tmp_path / "demos", tmp_path / "b.npz", every=3, codec=codec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz", "demos"]  # nothing half-written
    demo, rows = read_bundle(tmp_path / "b.npz", workers=2)
    full = load_demos(tmp_path / "demos")
    np.testing.assert_array_equal(demo.actions, full.actions)
    np.testing.assert_array_equal(demo.states, full.states)
    np.testing.assert_array_equal(demo.episode_starts, full.episode_starts)
    if codec == "video":  # every 3rd step of each episode, first frame kept: 0,3,6 | 7,10
        np.testing.assert_array_equal(rows, [0, 3, 6, 7, 10])
    assert info["rows"] == len(rows) == len(demo.images)
    err = np.abs(demo.images.astype(int) - full.images[rows].astype(int)).mean()
    assert err < 12, err  # lossy, but the same pictures


def test_compact_bundle_refuses_foreign_and_corrupt_files(tmp_path):
    from quantvla_core.sim.compact import read_bundle, write_bundle

    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a compact demo bundle"):
        read_bundle(tmp_path / "x.npz")
    write_shard(
        tmp_path / "demos" / "a.npz", [_smooth_episode("reach-v3", 6, 0)], ("corner", "topview"), {"image_size": 32}
    )
    write_bundle(tmp_path / "demos", tmp_path / "b.npz", every=2, codec="video")
    with np.load(tmp_path / "b.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["jpeg"] = arrays["jpeg"][: len(arrays["jpeg"]) // 3]  # a truncated video stream
    arrays["jpeg_offsets"] = np.minimum(arrays["jpeg_offsets"], len(arrays["jpeg"]))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="video stream episode 0 camera"):
        read_bundle(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="codec"):
        write_bundle(tmp_path / "demos", tmp_path / "c.npz", codec="png")


def test_bundle_parts_join_into_the_whole_and_overlaps_are_refused(tmp_path):
    """Two parts (split by episode) read together equal one bundle of all the episodes."""
    from quantvla_core.sim.compact import read_bundle, read_bundles, write_bundle

    eps = [
        _smooth_episode("reach-v3", 7, 0),
        _smooth_episode("drawer-close-v3", 5, 1),
        _smooth_episode("push-v3", 6, 2),
    ]
    write_shard(tmp_path / "all" / "a.npz", eps, ("corner", "topview"), {"image_size": 32})
    write_shard(tmp_path / "p1" / "a.npz", eps[:1], ("corner", "topview"), {"image_size": 32})
    write_shard(tmp_path / "p2" / "a.npz", eps[1:], ("corner", "topview"), {"image_size": 32})
    for name in ("all", "p1", "p2"):
        write_bundle(tmp_path / name, tmp_path / f"{name}.npz", every=3, codec="video")
    whole, whole_rows = read_bundle(tmp_path / "all.npz")
    joined, rows = read_bundles([tmp_path / "p1.npz", tmp_path / "p2.npz"])
    np.testing.assert_array_equal(rows, whole_rows)  # 0,3,6 | 7,10 | 12,15
    np.testing.assert_array_equal(rows, [0, 3, 6, 7, 10, 12, 15])
    for k in ("actions", "states", "episode_starts", "episode_task", "episode_index"):
        np.testing.assert_array_equal(getattr(joined, k), getattr(whole, k))
    assert np.abs(joined.images.astype(int) - whole.images.astype(int)).mean() < 3
    with pytest.raises(ValueError, match="seed 0 index 0 is in both"):
        read_bundles([tmp_path / "p1.npz", tmp_path / "all.npz"])
    import torch

    from quantvla_core.config import preset
    from quantvla_core.sim.train import DemoDataset

    cfg = preset("tiny")
    data = DemoDataset([tmp_path / "p1.npz", tmp_path / "p2.npz"], cfg)
    assert len(data) == 7 and data.num_episodes == 3
    idx = torch.tensor([6, 7, 15])  # the last row of episode 0 and the first rows of 1 and 2
    _, actions = data.batch(idx, torch.Generator().manual_seed(0), shift=0)
    expect = (whole.actions[[6, 7, 15]] - data.action_mean) / data.action_std
    np.testing.assert_allclose(actions[:, 0].numpy(), expect, rtol=1e-5, atol=1e-5)


def test_recording_can_go_on_past_the_first_success():
    """Demos end on the success radius; after_success=K keeps K + 1 more expert actions."""
    from quantvla_core.sim.demos import record_episode
    from quantvla_core.sim.env import StartState
    from quantvla_core.sim.expert import ScriptedExpert

    env = EnvSettings(image_size=32, max_steps=150).make("reach-v3")
    expert, start = ScriptedExpert("reach-v3"), StartState("reach-v3", 0, 0)
    try:
        usual, ok = record_episode(env, expert, start)
        longer, ok_longer = record_episode(env, expert, start, after_success=3)
        assert ok and ok_longer and env.stop_at_success
        assert len(longer.actions) == len(usual.actions) + 4
        np.testing.assert_array_equal(longer.actions[: len(usual.actions)], usual.actions)
    finally:
        env.close()
