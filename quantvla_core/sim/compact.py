"""A compact demo bundle: every k-th observation of each episode, all states and actions.

Why: raw 96 px demo shards are ~700 MB; moving them to a GPU machine for training needs a
bundle of a few tens of MB. Action chunks still use every recorded action, so only the number
of distinct training observations shrinks.

Two image codings: v1 stores each image as JPEG (q70: ~2.3 KB, 28.5 dB PSNR at 96 px); v2
stores each (episode, camera) as one MPEG-4 Part 2 video (`mp4v`, ~1 KB a frame at every 3rd
step, 31 dB), since consecutive frames are nearly identical. Both are lossy; neither is used
for evaluation, only for training.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write_bytes
from .shards import DemoSet, concat_demos, load_demos

FORMAT = "quantvla-compact-demos-v1"
FORMAT_VIDEO = "quantvla-compact-demos-v2"
FORMATS = (FORMAT, FORMAT_VIDEO)


def _kept_rows(starts: np.ndarray, every: int) -> np.ndarray:
    """Every k-th row of each episode, its first row always kept."""
    return np.concatenate([np.arange(s, e, every) for s, e in zip(starts[:-1], starts[1:])]).astype(np.int64)


def _encode_video(frames: np.ndarray) -> bytes:
    """(T, S, S, 3) RGB uint8 -> mp4v bytes (through a temp file: OpenCV writes only files)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        h, w = frames.shape[1:3]
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v video here (built without FFMPEG?)")
        for f in frames:
            writer.write(np.ascontiguousarray(f[:, :, ::-1]))
        writer.release()
        return Path(path).read_bytes()


def _decode_video(blob: np.ndarray, expected: int, name: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        Path(path).write_bytes(blob.tobytes())
        cap = cv2.VideoCapture(path)
        frames = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(f[:, :, ::-1])
        cap.release()
    if len(frames) != expected:
        raise ValueError(
            f"video stream {name}: decoded {len(frames)} frames, expected {expected} "
            "(corrupt bundle, or OpenCV without FFMPEG)"
        )
    return np.stack(frames)


def write_bundle(
    demo_folder: str | Path, out: str | Path, every: int = 3, quality: int = 70, codec: str = "jpeg"
) -> dict:
    """Pack demo shards into one .npz; codec 'jpeg' (v1) or 'video' (v2, mp4v per episode/camera)."""
    if codec not in ("jpeg", "video"):
        raise ValueError(f"codec {codec!r}: accepted 'jpeg' or 'video'")
    d = load_demos(demo_folder)
    cams = d.images.shape[1]
    if codec == "jpeg":
        rows = np.arange(0, len(d.actions), every)
        blobs = []
        for r in rows:
            for c in range(cams):
                ok, buf = cv2.imencode(".jpg", d.images[r, c][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    raise ValueError(f"JPEG encoding failed at row {r} camera {c}")
                blobs.append(buf.reshape(-1))
        fmt, extra = FORMAT, {}
    else:
        rows = _kept_rows(d.episode_starts, every)
        episode_of_row = np.searchsorted(d.episode_starts, rows, side="right") - 1
        blobs = []
        for e in range(len(d.episode_starts) - 1):
            r = rows[episode_of_row == e]
            for c in range(cams):
                blobs.append(np.frombuffer(_encode_video(d.images[r, c]), np.uint8))
        fmt, extra = FORMAT_VIDEO, {"stream_rows": np.bincount(episode_of_row, minlength=len(d.episode_starts) - 1)}
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    arrays = dict(
        format=np.array(fmt),
        rows=rows.astype(np.int64),
        jpeg=np.concatenate(blobs),
        jpeg_offsets=offsets,
        cameras=np.array(d.cameras),
        image_shape=np.array(d.images.shape[1:]),
        states=d.states,
        actions=d.actions,
        episode_starts=d.episode_starts,
        episode_task=d.episode_task,
        episode_seed=d.episode_seed,
        episode_index=d.episode_index,
        episode_instruction=d.episode_instruction,
        tasks=np.array(d.tasks),
        **extra,
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return {"rows": len(rows), "bytes": len(buf.getvalue()), "format": fmt}


def read_bundle(path: str | Path, workers: int | None = None) -> tuple[DemoSet, np.ndarray]:
    """-> (DemoSet whose images hold only the kept rows, the kept row indices)."""
    with np.load(path, allow_pickle=False) as z:
        fmt = str(z["format"]) if "format" in z.files else ""
        if fmt not in FORMATS:
            raise ValueError(f"{path}: not a compact demo bundle (format {fmt!r}; accepted {', '.join(FORMATS)})")
        a = {k: z[k] for k in z.files}
    c = len(a["cameras"])
    shape = tuple(int(s) for s in a["image_shape"])
    images = np.empty((len(a["rows"]),) + shape, np.uint8)
    off = a["jpeg_offsets"]
    if fmt == FORMAT:
        for i in range(len(a["rows"])):
            for j in range(c):
                k = i * c + j
                img = cv2.imdecode(a["jpeg"][off[k] : off[k + 1]], cv2.IMREAD_COLOR)
                images[i, j] = img[:, :, ::-1]
    else:
        counts = a["stream_rows"]
        first = np.concatenate([[0], np.cumsum(counts)])

        def decode(k: int) -> None:
            e, j = divmod(k, c)
            frames = _decode_video(a["jpeg"][off[k] : off[k + 1]], int(counts[e]), f"episode {e} camera {j}")
            images[first[e] : first[e + 1], j] = frames

        with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(decode, range(len(counts) * c)))
    demo = DemoSet(
        images=images,
        states=a["states"],
        actions=a["actions"],
        episode_starts=a["episode_starts"],
        episode_task=a["episode_task"],
        episode_seed=a["episode_seed"],
        episode_index=a["episode_index"],
        episode_instruction=a["episode_instruction"],
        tasks=tuple(str(t) for t in a["tasks"]),
        cameras=tuple(str(x) for x in a["cameras"]),
        meta={},
    )
    return demo, a["rows"]


def read_bundles(paths, workers: int | None = None) -> tuple[DemoSet, np.ndarray]:
    """Several bundles as one (DemoSet, kept rows): a demo set too large for one transfer can
    travel as parts (split by episode) and is joined here, with every part checked to match."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no bundle given")
    parts = [read_bundle(p, workers) for p in paths]
    demos = concat_demos([d for d, _ in parts], paths, what="bundle")
    offsets = np.cumsum([0] + [len(d.actions) for d, _ in parts[:-1]])
    rows = np.concatenate([r + o for (_, r), o in zip(parts, offsets)])
    return demos, rows.astype(np.int64)
