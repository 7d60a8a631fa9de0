"""Turn demo shards into a calibration folder (`observations.jsonl` + PNGs).

Quantization calibrates on unlabeled observations from the robot's own distribution; for the
MT10 policies that is frames of the demos. Only images, instruction and state are written:
calibration never sees actions.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from ..fileio import atomic_directory
from .shards import load_demos


def export_calibration(demo_folder: str | Path, out: str | Path, n: int = 128, seed: int = 0) -> Path:
    demos = load_demos(demo_folder)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(demos.actions), size=min(n, len(demos.actions)), replace=False))
    starts = demos.episode_starts
    episode = np.searchsorted(starts, rows, side="right") - 1
    with atomic_directory(out) as tmp:
        lines = []
        for k, (r, e) in enumerate(zip(rows, episode)):
            names = []
            for c in range(demos.images.shape[1]):
                name = f"obs{k:04d}_cam{c}.png"
                if not cv2.imwrite(str(tmp / name), demos.images[r, c][:, :, ::-1]):
                    raise OSError(f"cannot write {tmp / name}")
                names.append(name)
            lines.append(
                json.dumps(
                    {
                        "images": names,
                        "instruction": str(demos.episode_instruction[e]),
                        "state": [float(x) for x in demos.states[r]],
                    }
                )
            )
        (tmp / "observations.jsonl").write_text("\n".join(lines) + "\n")
    return Path(out)
