"""Observation -> model inputs: image resize-with-pad and [-1, 1] scaling, state normalisation.

Images arrive from cameras at any size; every model sees square images at its own resolution.
Resizing keeps the aspect ratio and pads with black (as PaliGemma/openpi do), so geometry is
not distorted.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_IMAGE_SIDE = 8192


def check_image(img, index: int = 0) -> np.ndarray:
    """Validate one camera frame: uint8 HxWx3 RGB, 1..8192 pixels a side."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"image {index} must be a numpy array (H, W, 3) uint8 RGB, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"image {index} has dtype {img.dtype}; accepted: uint8 RGB (H, W, 3)")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image {index} has shape {img.shape}; accepted: (H, W, 3) RGB")
    h, w = img.shape[:2]
    if h < 1 or w < 1 or h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE:
        raise ValueError(f"image {index} is {w}x{h}; accepted: 1..{MAX_IMAGE_SIDE} pixels a side")
    return img


def resize_with_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Scale the longer side to `size` (area filter when shrinking), centre, pad with zeros."""
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(img), (nw, nh), interpolation=interp)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def images_to_array(images: list[np.ndarray], size: int, max_cameras: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (images (max_cameras, 3, size, size) float32 in [-1, 1], mask (max_cameras,) bool)."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("observation needs 1 or more camera images (list of HxWx3 uint8 RGB)")
    if len(images) > max_cameras:
        raise ValueError(f"got {len(images)} camera images; this model accepts 1..{max_cameras}")
    out = np.zeros((max_cameras, 3, size, size), dtype=np.float32)
    mask = np.zeros(max_cameras, dtype=bool)
    for i, img in enumerate(images):
        sq = resize_with_pad(check_image(img, i), size)
        out[i] = sq.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        mask[i] = True
    return out, mask


class Normalizer:
    """Mean/std normalisation of state and actions (identity where no statistics are given)."""

    def __init__(self, mean, std, dim: int, what: str):
        self.dim = dim
        self.what = what
        self.mean = np.zeros(dim, np.float32) if mean is None else np.asarray(mean, np.float32)
        self.std = np.ones(dim, np.float32) if std is None else np.asarray(std, np.float32)
        if self.mean.shape != (dim,) or self.std.shape != (dim,):
            raise ValueError(
                f"{what} normalisation stats must have {dim} entries, got mean {self.mean.shape} std {self.std.shape}"
            )
        self.std = np.maximum(self.std, 1e-6)

    def normalize(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"{self.what} has {x.size} entries; this model expects {self.dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{self.what} contains NaN or inf; accepted: {self.dim} finite numbers")
        return (x - self.mean) / self.std

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean
