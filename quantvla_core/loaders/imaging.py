"""Image preprocessing of the original implementations, in torch, so pixels match theirs.

Both LeRobot and openpi's PyTorch models take float images in [0, 1], shrink the longer side
with `F.interpolate(bilinear, align_corners=False)` to `int(side / ratio)`, clamp to [0, 1], pad
with black and scale to [-1, 1]. They differ in where the padding goes:
- "center" (openpi / pi0 / pi0.5): split evenly, the odd pixel at the bottom / right;
- "top_left" (SmolVLA): all padding on the top and left, the image in the bottom-right corner.
An image already at the model resolution is passed through unresized (as in both originals).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import check_image

PAD_MODES = ("center", "top_left")


def resize_with_pad(img: np.ndarray, size: int, pad: str = "center") -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 (3, size, size) in [-1, 1]."""
    if pad not in PAD_MODES:
        raise ValueError(f"unknown padding {pad!r}; accepted: {PAD_MODES}")
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255.0
    h, w = x.shape[2:]
    if (h, w) != (size, size):
        ratio = max(w / size, h / size)
        rh, rw = max(1, int(h / ratio)), max(1, int(w / ratio))
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
        ph, pw = size - rh, size - rw
        if pad == "center":
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        else:
            x = F.pad(x, (pw, 0, ph, 0), value=0.0)
    return (x[0] * 2.0 - 1.0).numpy().astype(np.float32)


def images_to_model(images, size: int, max_cameras: int, pad: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (max_cameras, 3, size, size) in [-1, 1] and the camera mask; absent cameras are -1 (black)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("observation needs 1 or more camera images (list of HxWx3 uint8 RGB)")
    if len(images) > max_cameras:
        raise ValueError(f"got {len(images)} camera images; this policy accepts 1..{max_cameras}")
    out = np.full((max_cameras, 3, size, size), -1.0, dtype=np.float32)
    mask = np.zeros(max_cameras, dtype=bool)
    for i, img in enumerate(images):
        out[i] = resize_with_pad(check_image(img, i), size, pad)
        mask[i] = True
    return out, mask
