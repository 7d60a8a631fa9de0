"""Calibration buffers: where the unlabeled observations come from, and how they are replayed.

Sources (``load_observations(spec, ...)``):
- ``synthetic[:N]``: procedurally drawn camera frames, instructions and states (seeded);
- a folder with ``observations.jsonl``: one JSON object per line,
  ``{"images": ["relative/or/absolute.png", ...], "instruction": "...", "state": [floats]}``
  (images: anything OpenCV reads; 1..max_cameras per line);
- a rosbag2 recording (``.mcap`` file, or a bag directory holding ``.mcap`` files), read
  streaming by ``quantvla_core.recordings``: the named topics, or else the colour cameras
  (Image rgb8/bgr8/rgba8/bgra8, JPEG/PNG CompressedImage; depth and mono streams are skipped),
  the std_msgs/String topic that holds short instructions (a URDF string is skipped) and the
  JointState topic. ``n`` frames of the first camera spread evenly over the recording, each
  paired with the latest message of every other topic at that time;
- a YAML spec naming one of the above as ``source`` plus the recording's topics.

Replay (``CalibrationRun``): observations are preprocessed exactly like ``Policy.predict``,
batched, and every batch gets flow-matching noise drawn once from a seeded generator, so the
teacher and the student see identical inputs and identical noise at every denoising step.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

INSTRUCTIONS = (
    "pick up the red block",
    "open the drawer",
    "close the drawer",
    "push the button",
    "put the cup on the plate",
    "turn the faucet left",
    "slide the puck to the goal",
    "press the green button",
    "move the arm to the left",
    "stack the blue block on the red one",
    "reach the target",
    "open the window",
    "close the window",
    "pull the handle",
)


def synthetic_observations(n: int, image_size: int, cameras: int, state_dim: int, seed: int = 0) -> list:
    """Seeded smooth scenes (gradients + a few coloured boxes), random instructions and states."""
    from ..policy import Observation

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(image_size - 1, 1)
    for _ in range(n):
        images = []
        for _c in range(cameras):
            base = rng.uniform(0, 255, size=3)
            grad = rng.uniform(-80, 80, size=(2, 3))
            img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
            for _b in range(int(rng.integers(1, 4))):
                x0, y0 = rng.integers(0, image_size, size=2)
                w, h = rng.integers(image_size // 8 + 1, image_size // 3 + 2, size=2)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, size=3)
            img += rng.normal(0, 4, size=img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
        instr = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        out.append(
            Observation(images=images, instruction=instr, state=rng.normal(0, 0.5, size=state_dim).astype(np.float32))
        )
    return out


def folder_observations(folder: Path, state_dim: int) -> list:
    """Observations listed in ``<folder>/observations.jsonl`` (see the module docstring)."""
    import cv2

    from ..policy import Observation

    index = folder / "observations.jsonl"
    if not index.is_file():
        raise ValueError(
            f"{folder}: a calibration folder must contain observations.jsonl (one JSON "
            "object per line with keys images, instruction, state)"
        )
    out = []
    for lineno, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{index}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not {"images", "instruction", "state"} <= set(rec):
            raise ValueError(f"{where}: needs keys images (list of paths), instruction (string), state (list)")
        if not isinstance(rec["images"], list) or not rec["images"]:
            raise ValueError(f"{where}: images must be a non-empty list of image paths")
        images = []
        for p in rec["images"]:
            path = Path(p) if Path(p).is_absolute() else folder / p
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{where}: cannot read image {path} (missing or not an image file)")
            images.append(np.ascontiguousarray(bgr[..., ::-1]))
        state = np.asarray(rec["state"], dtype=np.float32)
        if state.shape != (state_dim,) or not np.all(np.isfinite(state)):
            raise ValueError(f"{where}: state must be {state_dim} finite numbers, got shape {state.shape}")
        if not isinstance(rec["instruction"], str):
            raise ValueError(f"{where}: instruction must be a string")
        out.append(Observation(images=images, instruction=rec["instruction"], state=state))
    if not out:
        raise ValueError(f"{index}: contains no observations")
    return out


class RecordingSamples(list):
    """Observations read from a recording, in time order, with each one's time and episode
    (``split_buffer`` holds out whole time spans with them)."""

    times_ns: list
    episodes: list
    summary: dict

    def copy_with(self, items: list, times_ns: list, episodes: list) -> "RecordingSamples":
        out = RecordingSamples(items)
        out.times_ns, out.episodes, out.summary = list(times_ns), list(episodes), dict(self.summary)
        return out


class CalibrationSource(str):
    """A calibration source string with options for recordings (topics, progress bar).

    ``quantize`` passes its ``calib`` argument on to ``load_observations`` unchanged, so a
    ``CalibrationSource("robot.mcap", camera_topics=[...])`` reaches the reader with its options
    while reports still record the plain path.
    """

    options: dict

    def __new__(cls, source, **options):
        obj = super().__new__(cls, str(source))
        obj.options = {k: v for k, v in options.items() if v is not None}
        return obj


RECORDING_OPTIONS = ("camera_topics", "instruction_topic", "state_topic", "instruction", "progress")
# With no sample count asked for, a recording gives at most this many observations (spread over
# it): a whole recording decoded at once would need gigabytes.
DEFAULT_RECORDING_SAMPLES = 64


def read_source_yaml(path: Path) -> CalibrationSource:
    """A calibration spec in YAML: ``source`` (relative to the YAML's folder) and the recording
    options ``camera_topics`` (list or comma string), ``instruction_topic``, ``state_topic``
    (``none``: zero states), ``instruction`` (fixed text instead of a topic)."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or "source" not in spec:
        raise ValueError(
            f"{path}: a calibration YAML needs a 'source' key (a .mcap file, bag directory or "
            f"folder) and may set {', '.join(RECORDING_OPTIONS[:-1])}"
        )
    unknown = sorted(set(spec) - {"source", *RECORDING_OPTIONS})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; accepted: source, {', '.join(RECORDING_OPTIONS[:-1])}")
    src = Path(str(spec.pop("source")))
    if not src.is_absolute() and not str(src).startswith("synthetic"):
        src = path.parent / src
    cams = spec.get("camera_topics")
    if isinstance(cams, str):
        spec["camera_topics"] = [c.strip() for c in cams.split(",") if c.strip()]
    elif cams is not None and not (isinstance(cams, list) and all(isinstance(c, str) for c in cams)):
        raise ValueError(f"{path}: camera_topics must be a list of topic names")
    for k in ("instruction_topic", "state_topic", "instruction"):
        if k in spec and spec[k] is not None and not isinstance(spec[k], str):
            raise ValueError(f"{path}: {k} must be a string")
    return CalibrationSource(src, **spec)


def merge_options(source: str | Path, **options) -> str | Path:
    """``source`` with command-line recording options added (they win over a YAML's)."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return source
    base = getattr(source, "options", {})
    return CalibrationSource(source, **{**base, **options})


_CACHE: dict = {}


def _cache_key(files: list[Path], options: dict, n, state_dim: int, max_cameras: int):
    stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    opts = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k != "progress"))
    return stats, opts, n, state_dim, max_cameras


def mcap_observations(
    path: Path,
    state_dim: int,
    max_cameras: int,
    limit: int | None = None,
    camera_topics: list[str] | None = None,
    **options,
) -> RecordingSamples:
    """Observations from a rosbag2 .mcap file or bag directory (see ``quantvla_core.recordings``):
    ``limit`` frames spread evenly over the recording, in time order. The last read is cached
    (``quantize --smooth-strength auto`` and ``ablate`` read the same buffer many times)."""
    from ..policy import Observation
    from ..recordings import read_samples, recording_files

    opts = dict(options, camera_topics=camera_topics) if camera_topics else dict(options)
    files = recording_files(path)
    key = _cache_key(files, opts, limit, state_dim, max_cameras)
    hit = _CACHE.get(key)
    if hit is None:
        progress = opts.pop("progress", None)
        if progress is None:
            progress = sys.stderr.isatty()
        text = opts.pop("instruction", None)
        samples, _sel, summary = read_samples(
            path, state_dim, max_cameras, limit, progress=progress, instruction_text=text, **opts
        )
        hit = RecordingSamples(Observation(images=r.images, instruction=r.instruction, state=r.state) for r in samples)
        hit.times_ns = [r.time_ns for r in samples]
        hit.episodes = [r.episode for r in samples]
        hit.summary = summary
        _CACHE.clear()
        _CACHE[key] = hit
    return hit.copy_with(list(hit), hit.times_ns, hit.episodes)


def load_observations(
    spec: str | Path, config, n: int | None = None, seed: int = 0, state_dim: int | None = None
) -> list:
    """Calibration observations from ``synthetic[:N]``, a folder, a .mcap recording, or a YAML
    calibration spec (``read_source_yaml``); ``spec`` may be a ``CalibrationSource`` carrying
    recording options.

    ``state_dim``: the robot's state size (a real checkpoint's may differ from the model's
    padded ``config.state_dim``); defaults to ``config.state_dim``.
    """
    options = dict(getattr(spec, "options", {}))
    s = str(spec)
    state_dim = state_dim or config.state_dim
    if s == "synthetic" or s.startswith("synthetic:"):
        count = n or 32
        if s.startswith("synthetic:"):
            try:
                count = int(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad calibration source {s!r}; accepted: synthetic, synthetic:N") from None
        if count < 1:
            raise ValueError(f"synthetic calibration needs at least 1 observation, got {count}")
        return synthetic_observations(count, max(64, config.vision.image_size), config.max_cameras, state_dim, seed)
    p = Path(s)
    if not p.exists():
        raise ValueError(
            f"calibration source {s!r} not found; accepted: synthetic[:N], a folder with "
            "observations.jsonl, a rosbag2 .mcap file or bag directory, a calibration .yaml"
        )
    if p.suffix in (".yaml", ".yml") and p.is_file():
        inner = read_source_yaml(p)
        return load_observations(merge_options(inner, **options), config, n, seed, state_dim)
    if p.suffix == ".mcap" or (p.is_dir() and any(p.glob("*.mcap"))):
        return mcap_observations(
            p, state_dim, config.max_cameras, limit=n if n else DEFAULT_RECORDING_SAMPLES, **options
        )
    topic_opts = sorted(set(options) - {"progress"})
    if topic_opts:
        raise ValueError(f"{p}: {', '.join(topic_opts)} apply to .mcap recordings only")
    if p.is_dir():
        obs = folder_observations(p, state_dim)
    else:
        raise ValueError(
            f"{p}: unsupported calibration file; accepted: synthetic[:N], a folder with "
            "observations.jsonl, a rosbag2 .mcap file or bag directory, a calibration .yaml"
        )
    return obs[:n] if n else obs


def _heldout_positions(count: int, k: int, episodes: list) -> list[int]:
    """Which of ``count`` time-ordered samples to hold out: ``k`` of them, as whole episodes
    where the recording has several, else as contiguous stretches of time, never as single
    frames between calibration frames."""
    ep = np.asarray(episodes)
    ids = list(dict.fromkeys(ep.tolist()))
    if len(ids) >= 2:
        # whole episodes, from every other position so they spread over the recording, until
        # at least k samples; used when that is at most 1.5 k (calibration keeps its size)
        chosen: list[int] = []
        for e in ids[1::2][::-1] + ids[0::2][::-1]:
            if len(chosen) >= k:
                break
            chosen += np.flatnonzero(ep == e).tolist()
        if len(chosen) <= k + max(1, k // 2) and len(chosen) < count:
            return sorted(chosen)
    # one episode (or none fits): up to two stretches, centred at 1/4 and 3/4 of the recording
    runs = 2 if k >= 4 else 1
    sizes = [k // runs + (1 if j < k % runs else 0) for j in range(runs)]
    out: list[int] = []
    for j, size in enumerate(sizes):
        centre = (j + 0.5) / runs if runs > 1 else 1.0
        start = int(round(centre * count - size / 2)) if runs > 1 else count - size
        start = min(max(start, 0), count - size)
        out += list(range(start, start + size))
    return sorted(set(out))


def split_buffer(obs: list, heldout_fraction: float) -> tuple[list, list]:
    """(calibration, held-out): with one item both share it. Plain lists: the last fraction is
    held out. Recordings (``RecordingSamples``): the held-out samples are whole episodes or
    stretches of time of their own (``_heldout_positions``), not frames next to calibration ones."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout fraction must lie in [0, 1), got {heldout_fraction}")
    if len(obs) < 2 or heldout_fraction == 0:
        return obs, obs
    k = max(1, int(math.floor(len(obs) * heldout_fraction)))
    episodes = getattr(obs, "episodes", None)
    if episodes is None or len(episodes) != len(obs):
        return obs[:-k], obs[-k:]
    held = set(_heldout_positions(len(obs), k, episodes))
    return ([o for i, o in enumerate(obs) if i not in held], [o for i, o in enumerate(obs) if i in held])


@dataclass
class CalibrationRun:
    """Preprocessed batches + fixed noise; ``run(model)`` replays them through sample_actions."""

    batches: list
    noises: list[torch.Tensor]
    num_steps: int | None = None

    @classmethod
    def build(cls, policy, observations: list, batch_size: int = 8, seed: int = 1234) -> "CalibrationRun":
        from ..models.base import Batch

        if not observations:
            raise ValueError("calibration needs at least one observation")
        gen = torch.Generator().manual_seed(seed)
        batches, noises = [], []
        for i in range(0, len(observations), batch_size):
            items = [policy.preprocess(o) for o in observations[i : i + batch_size]]
            batches.append(
                Batch(
                    *(
                        torch.cat([getattr(b, f) for b in items], 0)
                        for f in ("images", "image_mask", "tokens", "token_mask", "state")
                    )
                )
            )
            noises.append(policy.model.sample_noise(len(items), gen).to(policy.device))
        return cls(batches, noises)

    def __len__(self) -> int:
        return sum(n.shape[0] for n in self.noises)

    def run(self, model: nn.Module, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """All batches through ``model.sample_actions`` with the stored noise; returns actions."""
        outs = []
        with torch.no_grad():
            for i, (b, n) in enumerate(zip(self.batches, self.noises)):
                outs.append(model.sample_actions(b, n, num_steps=self.num_steps).float().cpu())
                if on_batch:
                    on_batch(i)
        return torch.cat(outs, 0)

    def __call__(self, model: nn.Module) -> None:
        self.run(model)
