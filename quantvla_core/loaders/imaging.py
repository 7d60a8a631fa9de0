"""Image preprocessing of the original implementations, in torch, so pixels match theirs.

Both LeRobot and openpi's PyTorch models take float images in [0, 1], shrink the longer side
with `F.interpolate(bilinear, align_corners=False)` to `int(side / ratio)`, clamp to [0, 1], pad
with black and scale to [-1, 1]. They differ in where the padding goes:
- "center" (openpi / pi0 / pi0.5): split evenly, the odd pixel at the bottom / right;
- "top_left" (SmolVLA): all padding on the top and left, the image in the bottom-right corner.
An image already at the model resolution is passed through unresized (as in both originals).

GR00T N1.5 ("eagle") uses Eagle 2.5's image processor instead, as LeRobot's groot processor calls
it (one tile: min = max dynamic tiles = 1, no thumbnail): the uint8 image is stretched to
size x size without keeping the aspect ratio (torchvision `resize`, bicubic, antialiased, the
result rounded and clamped back to uint8), then rescaled by 1/255 and normalised with mean 0.5,
std 0.5 per channel, i.e. (x / 255 - 0.5) / 0.5 in [-1, 1]. Eagle's default 224 px tile.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import check_image

PAD_MODES = ("center", "top_left", "eagle")
EAGLE_MEAN, EAGLE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def resize_with_pad(img: np.ndarray, size: int, pad: str = "center") -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 (3, size, size) in [-1, 1]."""
    if pad not in PAD_MODES:
        raise ValueError(f"unknown padding {pad!r}; accepted: {PAD_MODES}")
    if pad == "eagle":
        return eagle_image(img, size)
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


def eagle_image(img: np.ndarray, size: int = 224) -> np.ndarray:
    """Eagle 2.5 image processor, one tile: uint8 HxWx3 -> float32 (3, size, size) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 255.0).round()  # torchvision returns uint8 for a uint8 input
    mean = torch.tensor(EAGLE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EAGLE_STD).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std)[0].numpy().astype(np.float32)


def images_to_model(images, size: int, max_cameras: int, pad: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (max_cameras, 3, size, size) in [-1, 1] and the camera mask; absent cameras are -1 (black).

    A None entry is an absent camera in that slot (openpi robots without, e.g., a left wrist view)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("observation needs 1 or more camera images (list of HxWx3 uint8 RGB)")
    if len(images) > max_cameras:
        raise ValueError(f"got {len(images)} camera images; this policy accepts 1..{max_cameras}")
    out = np.full((max_cameras, 3, size, size), -1.0, dtype=np.float32)
    mask = np.zeros(max_cameras, dtype=bool)
    if all(img is None for img in images):
        raise ValueError("observation needs 1 or more camera images (list of HxWx3 uint8 RGB)")
    for i, img in enumerate(images):
        if img is None:
            continue
        out[i] = resize_with_pad(check_image(img, i), size, pad)
        mask[i] = True
    return out, mask
