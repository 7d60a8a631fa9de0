"""Calibration buffers: where the unlabeled observations come from, and how they are replayed.

Sources (``load_observations(spec, ...)``):
- ``synthetic[:N]``: procedurally drawn camera frames, instructions and states (seeded);
- a folder with ``observations.jsonl``: one JSON object per line,
  ``{"images": ["relative/or/absolute.png", ...], "instruction": "...", "state": [floats]}``
  (images: anything OpenCV reads; 1..max_cameras per line);
- a rosbag2 recording (``.mcap`` file, or a bag directory holding ``.mcap`` files), read with
  ``mcap`` / ``mcap-ros2-support``: every sensor_msgs/Image or CompressedImage topic is a
  camera, std_msgs/String is the instruction, sensor_msgs/JointState the state. One
  observation per frame of the first camera, paired with the latest message of every other
  topic at that time (frames before all topics have been seen are skipped).

Replay (``CalibrationRun``): observations are preprocessed exactly like ``Policy.predict``,
batched, and every batch gets flow-matching noise drawn once from a seeded generator, so the
teacher and the student see identical inputs and identical noise at every denoising step.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

INSTRUCTIONS = (
    "pick up the red block", "open the drawer", "close the drawer", "push the button",
    "put the cup on the plate", "turn the faucet left", "slide the puck to the goal",
    "press the green button", "move the arm to the left", "stack the blue block on the red one",
    "reach the target", "open the window", "close the window", "pull the handle",
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
                img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, size=3)
            img += rng.normal(0, 4, size=img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
        instr = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        out.append(Observation(images=images, instruction=instr,
                               state=rng.normal(0, 0.5, size=state_dim).astype(np.float32)))
    return out


def folder_observations(folder: Path, state_dim: int) -> list:
    """Observations listed in ``<folder>/observations.jsonl`` (see the module docstring)."""
    import cv2

    from ..policy import Observation
    index = folder / "observations.jsonl"
    if not index.is_file():
        raise ValueError(f"{folder}: a calibration folder must contain observations.jsonl (one JSON "
                         "object per line with keys images, instruction, state)")
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


IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
TEXT_TYPE = "std_msgs/msg/String"
STATE_TYPE = "sensor_msgs/msg/JointState"


def mcap_observations(path: Path, state_dim: int, max_cameras: int, limit: int | None = None,
                      camera_topics: list[str] | None = None) -> list:
    """Observations from a rosbag2 .mcap file or a bag directory (see the module docstring)."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    from quantvla_ros.image_conversion import message_to_rgb

    from ..policy import Observation
    files = sorted(path.glob("*.mcap")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .mcap files in this bag directory")
    msgs = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                reader = make_reader(fh, decoder_factories=[DecoderFactory()])
                for schema, channel, message, ros_msg in reader.iter_decoded_messages():
                    msgs.append((message.log_time, channel.topic, schema.name if schema else "", ros_msg))
        except Exception as e:  # the mcap reader raises several types for damaged files
            raise ValueError(f"{f}: cannot read as a ROS 2 mcap recording ({type(e).__name__}: {e})") from None
    msgs.sort(key=lambda r: r[0])
    topics: dict[str, str] = {}
    for _, topic, schema, _ in msgs:
        topics.setdefault(topic, schema)
    cams = camera_topics or sorted(t for t, s in topics.items() if s in IMAGE_TYPES)[:max_cameras]
    texts = [t for t, s in topics.items() if s == TEXT_TYPE]
    states = [t for t, s in topics.items() if s == STATE_TYPE]
    seen = ", ".join(f"{t} ({s})" for t, s in sorted(topics.items())) or "none"
    if not cams or not texts or not states:
        raise ValueError(f"{path}: calibration needs an Image/CompressedImage topic, a std_msgs/String "
                         f"instruction topic and a sensor_msgs/JointState topic; found: {seen}")
    missing = [c for c in cams if c not in topics]
    if missing:
        raise ValueError(f"{path}: camera topics {missing} are not in the recording; found: {seen}")
    latest: dict[str, object] = {}
    out = []
    for _, topic, _schema, msg in msgs:
        latest[topic] = msg
        if topic != cams[0]:
            continue
        if not all(c in latest for c in cams) or texts[0] not in latest or states[0] not in latest:
            continue
        js = latest[states[0]]
        state = np.zeros(state_dim, dtype=np.float32)
        pos = np.asarray(list(js.position), dtype=np.float32)[:state_dim]
        state[:pos.size] = pos
        out.append(Observation(images=[message_to_rgb(latest[c]) for c in cams],
                               instruction=str(latest[texts[0]].data), state=state))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"{path}: no camera frame arrived after an instruction and a joint state")
    return out


def load_observations(spec: str | Path, config, n: int | None = None, seed: int = 0,
                      state_dim: int | None = None) -> list:
    """Calibration observations from ``synthetic[:N]``, a folder, or a .mcap recording.

    ``state_dim``: the robot's state size (a real checkpoint's may differ from the model's
    padded ``config.state_dim``); defaults to ``config.state_dim``.
    """
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
        return synthetic_observations(count, max(64, config.vision.image_size), config.max_cameras,
                                      state_dim, seed)
    p = Path(s)
    if not p.exists():
        raise ValueError(f"calibration source {s!r} not found; accepted: synthetic[:N], a folder with "
                         "observations.jsonl, a rosbag2 .mcap file or bag directory")
    if p.suffix == ".mcap" or (p.is_dir() and any(p.glob("*.mcap"))):
        obs = mcap_observations(p, state_dim, config.max_cameras, limit=n)
    elif p.is_dir():
        obs = folder_observations(p, state_dim)
    else:
        raise ValueError(f"{p}: unsupported calibration file; accepted: synthetic[:N], a folder with "
                         "observations.jsonl, a rosbag2 .mcap file or bag directory")
    return obs[:n] if n else obs


def split_buffer(obs: list, heldout_fraction: float) -> tuple[list, list]:
    """(calibration, held-out): the last fraction is held out; with one item both share it."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout fraction must lie in [0, 1), got {heldout_fraction}")
    if len(obs) < 2 or heldout_fraction == 0:
        return obs, obs
    k = max(1, int(math.floor(len(obs) * heldout_fraction)))
    return obs[:-k], obs[-k:]


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
            items = [policy.preprocess(o) for o in observations[i:i + batch_size]]
            batches.append(Batch(*(torch.cat([getattr(b, f) for b in items], 0)
                                   for f in ("images", "image_mask", "tokens", "token_mask", "state"))))
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
