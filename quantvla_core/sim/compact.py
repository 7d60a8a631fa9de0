"""A compact demo bundle: every k-th observation as JPEG, all states and actions.

Why: raw 96 px demo shards are ~700 MB; moving them to a GPU machine for training needs a
bundle of a few tens of MB. Action chunks still use every recorded action, so only the number
of distinct training observations shrinks.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_write_bytes
from .shards import DemoSet, load_demos

FORMAT = "quantvla-compact-demos-v1"


def write_bundle(demo_folder: str | Path, out: str | Path, every: int = 3, quality: int = 70) -> dict:
    import io
    d = load_demos(demo_folder)
    rows = np.arange(0, len(d.actions), every)
    blobs = []
    for r in rows:
        for c in range(d.images.shape[1]):
            ok, buf = cv2.imencode(".jpg", d.images[r, c][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise ValueError(f"JPEG encoding failed at row {r} camera {c}")
            blobs.append(buf.reshape(-1))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    arrays = dict(format=np.array(FORMAT), rows=rows.astype(np.int64), jpeg=np.concatenate(blobs),
                  jpeg_offsets=offsets, cameras=np.array(d.cameras), image_shape=np.array(d.images.shape[1:]),
                  states=d.states, actions=d.actions, episode_starts=d.episode_starts,
                  episode_task=d.episode_task, episode_seed=d.episode_seed, episode_index=d.episode_index,
                  episode_instruction=d.episode_instruction, tasks=np.array(d.tasks))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return {"rows": len(rows), "bytes": len(buf.getvalue())}


def read_bundle(path: str | Path) -> tuple[DemoSet, np.ndarray]:
    """-> (DemoSet whose images hold only the kept rows, the kept row indices)."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["format"]) != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} bundle")
        a = {k: z[k] for k in z.files}
    c = len(a["cameras"])
    shape = tuple(int(s) for s in a["image_shape"])
    images = np.empty((len(a["rows"]),) + shape, np.uint8)
    off = a["jpeg_offsets"]
    for i in range(len(a["rows"])):
        for j in range(c):
            k = i * c + j
            img = cv2.imdecode(a["jpeg"][off[k]:off[k + 1]], cv2.IMREAD_COLOR)
            images[i, j] = img[:, :, ::-1]
    demo = DemoSet(images=images, states=a["states"], actions=a["actions"], episode_starts=a["episode_starts"],
                   episode_task=a["episode_task"], episode_seed=a["episode_seed"], episode_index=a["episode_index"],
                   episode_instruction=a["episode_instruction"], tasks=tuple(str(t) for t in a["tasks"]),
                   cameras=tuple(str(x) for x in a["cameras"]), meta={})
    return demo, a["rows"]
