"""sensor_msgs Image / CompressedImage <-> HxWx3 uint8 RGB arrays, without cv_bridge.

The ROS 2 cv_bridge is not installable from PyPI and the PyPI `cv-bridge` port breaks on
numpy 2, so the node converts messages itself: raw images through `np.frombuffer` honouring
`step` (row padding) and `is_bigendian`, compressed ones through OpenCV's `imdecode`. Every
malformed message raises `ImageConversionError` whose `code` names the failure class (used as
a diagnostics counter key) and whose text names what was wrong and what is accepted; nothing
is allocated from a header's claimed size before that size has been checked.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading

import cv2
import numpy as np

# encoding -> (numpy dtype of one channel, channels); the REP 118 / sensor_msgs image_encodings set.
RAW_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}
COMPRESSED_FORMATS = ("jpeg", "png")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_DEPTH_MAX_M = 10.0
DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_ASPECT = 10.0


class ImageConversionError(ValueError):
    """A camera message that cannot become an RGB frame; `code` is a short failure class."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _check_dims(width: int, height: int, max_pixels: int, min_side: int = 1, max_aspect: float = 0.0) -> None:
    """Geometry the model can use, checked before any pixel is touched: a 10000x1 frame fits
    max_pixels but would fail inside the model's resize (or become one smeared row)."""
    if width <= 0 or height <= 0:
        raise ImageConversionError("empty", f"image is {width}x{height}; width and height must both be > 0")
    if width * height > max_pixels:
        raise ImageConversionError(
            "too_large",
            f"image is {width}x{height} = {width * height} pixels; at most "
            f"{max_pixels} are accepted (parameter max_image_pixels)",
        )
    if min(width, height) < min_side:
        raise ImageConversionError(
            "bad_geometry",
            f"image is {width}x{height}; both sides must be at least {min_side} pixels (parameter min_image_side)",
        )
    if max_aspect > 0 and max(width, height) > max_aspect * min(width, height):
        raise ImageConversionError(
            "bad_geometry",
            f"image is {width}x{height}, aspect ratio "
            f"{max(width, height) / min(width, height):.1f}:1; at most {max_aspect:g}:1 is "
            "accepted (parameter max_image_aspect)",
        )


def _depth_to_gray(depth_m: np.ndarray, depth_max_m: float) -> np.ndarray:
    """Linear map [0, depth_max_m] -> [0, 255]; invalid (NaN/inf/<=0) depth becomes 0."""
    valid = np.isfinite(depth_m) & (depth_m > 0)
    scaled = np.where(valid, np.clip(depth_m, 0.0, depth_max_m) / depth_max_m * 255.0, 0.0)
    return np.rint(scaled).astype(np.uint8)


def image_to_rgb(
    msg,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    depth_max_m: float = DEFAULT_DEPTH_MAX_M,
    min_side: int = 1,
    max_aspect: float = 0.0,
) -> np.ndarray:
    """sensor_msgs/Image -> contiguous (height, width, 3) uint8 RGB (a copy, never a view).

    mono16 keeps its 8 most significant bits; 16UC1 (depth, millimetres) and 32FC1 (depth,
    metres) map [0, depth_max_m] linearly onto 0..255 so depth cameras can feed the model.
    """
    encoding = msg.encoding
    if encoding not in RAW_ENCODINGS:
        raise ImageConversionError(
            "unsupported_encoding",
            f"image encoding {encoding!r} is not supported; accepted: {', '.join(RAW_ENCODINGS)}",
        )
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_dims(width, height, max_pixels, min_side, max_aspect)
    dtype, channels = RAW_ENCODINGS[encoding]
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            "size_mismatch",
            f"step {step} is smaller than width {width} x {channels} channel(s) "
            f"x {dtype.itemsize} byte(s) = {row_bytes} for {encoding}",
        )
    if step % dtype.itemsize:
        raise ImageConversionError(
            "size_mismatch", f"step {step} is not a multiple of the {dtype.itemsize}-byte channel size of {encoding}"
        )
    expected = step * height
    size = len(msg.data)
    if size < expected:
        raise ImageConversionError(
            "truncated", f"image data has {size} bytes; step {step} x height {height} = {expected} are required"
        )
    if size > expected:
        raise ImageConversionError(
            "size_mismatch",
            f"image data has {size} bytes but step {step} x height {height} = "
            f"{expected}; data must be exactly step x height bytes",
        )
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    rows = buf.reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(height, width, channels)
    if encoding == "rgb8":
        return pixels.copy()
    if encoding == "bgr8":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(pixels[:, :, :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    if encoding == "mono8":
        gray = pixels[:, :, 0]
    elif encoding == "mono16":
        gray = (pixels[:, :, 0] >> 8).astype(np.uint8)
    elif encoding == "16UC1":
        gray = _depth_to_gray(pixels[:, :, 0].astype(np.float32) / 1000.0, depth_max_m)
    else:  # 32FC1
        gray = _depth_to_gray(pixels[:, :, 0].astype(np.float32), depth_max_m)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width/height from the first start-of-frame marker, walking segment lengths."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _jpeg_structure_problem(data: bytes) -> str | None:
    """Walk the marker segments and entropy-coded scans; a reason string when the stream is
    truncated (no EOI, a segment running past the end) or a scan holds a byte pair that is no
    valid JPEG code (FF followed by anything but 00, RSTn or a marker that may follow a scan)."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return f"byte {i}: expected a marker, found 0x{data[i]:02X}"
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n:
            break
        marker = data[i + 1]
        if marker == 0xD9:  # EOI: anything after it (some cameras pad) is ignored
            return None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > n:
            break
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if length < 2 or i + 2 + length > n:
            return f"segment 0xFF{marker:02X} at byte {i} runs past the end of the data"
        i += 2 + length
        if marker != 0xDA:  # not SOS: the next marker follows at once
            continue
        while True:  # entropy-coded data up to the next marker that is not RSTn / stuffing
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                return "the last scan has no end (data truncated, no EOI marker)"
            follow = data[j + 1]
            if follow == 0x00 or 0xD0 <= follow <= 0xD7 or follow == 0xFF:
                i = j + 2 if follow != 0xFF else j + 1
                continue
            # A marker ends the scan: EOI, or what may come between scans of a progressive /
            # multi-scan frame (DHT, DAC, DQT, DRI, SOS, COM, APPn, DNL).
            if follow in (0xD9, 0xC4, 0xCC, 0xDB, 0xDD, 0xDA, 0xFE, 0xDC) or 0xE0 <= follow <= 0xEF:
                i = j
                break
            return f"byte {j}: 0xFF{follow:02X} inside scan data is no JPEG code (corrupt data)"
    return "data truncated: no EOI marker"


# libjpeg reports recoverable damage (a flipped bit, a lost packet's worth of data) only as a
# warning printed to stderr, and still returns an image, partly grey or garbage. These are the
# phrases of libjpeg(-turbo)'s warning messages.
_LIBJPEG_WARNINGS = (
    "Corrupt JPEG data",
    "Premature end of JPEG",
    "Invalid SOS parameters",
    "Inconsistent progression",
    "Huffman",
    "JFIF revision",
    "Bogus",
    "Application transferred too",
)
_STDERR_LOCK = threading.Lock()
_capture_file = None  # one unlinked temporary file, reused for every capture (under the lock)


def _decode_catching_libjpeg_warnings(data: bytes) -> tuple[np.ndarray | None, list[str]]:
    """cv2.imdecode with file descriptor 2 briefly pointed at a temporary file, so libjpeg's
    warnings can be read back; everything else written meanwhile (e.g. another thread's log
    line) is passed on to the real stderr. Serialised: one capture at a time per process."""
    global _capture_file
    with _STDERR_LOCK:
        try:
            if _capture_file is None:
                _capture_file = tempfile.TemporaryFile()
            capture = _capture_file.fileno()
            os.ftruncate(capture, 0)
            os.lseek(capture, 0, os.SEEK_SET)
            saved = os.dup(2)
        except OSError:  # no stderr / no temporary file: decode without the check
            return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR), []
        os.dup2(capture, 2)
        try:
            bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(capture, 0, os.SEEK_CUR)
        text = os.pread(capture, size, 0).decode("utf-8", "replace") if size else ""
    warnings, other = [], []
    for line in text.splitlines(keepends=True):
        (warnings if any(w in line for w in _LIBJPEG_WARNINGS) else other).append(line)
    if other:
        os.write(2, "".join(other).encode("utf-8"))
    return bgr, [w.strip() for w in warnings]


def compressed_to_rgb(
    msg, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1, max_aspect: float = 0.0, strict_jpeg: bool = True
) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG) -> (height, width, 3) uint8 RGB.

    The container is recognised from its magic bytes; `format` (e.g. "jpeg" or
    image_transport's "rgb8; jpeg compressed bgr8") must name JPEG or PNG when it is set. The
    size in the file header is checked against `max_pixels` before decoding, so a small
    message cannot make the node allocate a huge frame.
    """
    fmt = (msg.format or "").lower()
    if fmt and not any(name in fmt for name in COMPRESSED_FORMATS + ("jpg",)):
        raise ImageConversionError(
            "unsupported_encoding",
            f"compressed image format {msg.format!r} is not supported; "
            "accepted: jpeg, png (e.g. 'jpeg' or 'rgb8; jpeg compressed bgr8')",
        )
    data = bytes(msg.data)
    if len(data) == 0:
        raise ImageConversionError("empty", "compressed image has no data")
    if data[:2] == b"\xff\xd8":
        size = _jpeg_size(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        size = _png_size(data)
    else:
        raise ImageConversionError(
            "corrupt",
            f"compressed image data ({len(data)} bytes) starts with neither the JPEG (FF D8) nor the PNG signature",
        )
    if size is None:
        raise ImageConversionError("corrupt", "compressed image header is truncated or has no frame size")
    _check_dims(size[0], size[1], max_pixels, min_side, max_aspect)
    warnings: list[str] = []
    if data[:2] == b"\xff\xd8" and strict_jpeg:
        problem = _jpeg_structure_problem(data)
        if problem is not None:
            raise ImageConversionError(
                "truncated" if "truncated" in problem or "past the end" in problem else "corrupt",
                f"JPEG ({len(data)} bytes) is damaged: {problem}; frame dropped",
            )
        bgr, warnings = _decode_catching_libjpeg_warnings(data)
    else:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if warnings:
        raise ImageConversionError(
            "corrupt",
            f"JPEG ({len(data)} bytes) decoded with libjpeg warning(s) "
            f"{'; '.join(warnings[:2])!r}: the image is partly garbage; frame dropped",
        )
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] * bgr.shape[1] == 0:
        raise ImageConversionError("corrupt", f"compressed image ({len(data)} bytes) could not be decoded")
    if (bgr.shape[1], bgr.shape[0]) != size:
        raise ImageConversionError(
            "corrupt", f"decoded size {bgr.shape[1]}x{bgr.shape[0]} differs from header size {size[0]}x{size[1]}"
        )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def message_to_rgb(
    msg,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    depth_max_m: float = DEFAULT_DEPTH_MAX_M,
    min_side: int = 1,
    max_aspect: float = 0.0,
    strict_jpeg: bool = True,
) -> np.ndarray:
    """Either camera message type -> RGB (CompressedImage has `format`, Image has `encoding`)."""
    if hasattr(msg, "format"):
        return compressed_to_rgb(
            msg, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect, strict_jpeg=strict_jpeg
        )
    return image_to_rgb(msg, max_pixels=max_pixels, depth_max_m=depth_max_m, min_side=min_side, max_aspect=max_aspect)


def rgb_to_image(
    rgb: np.ndarray, encoding: str = "rgb8", depth_max_m: float = DEFAULT_DEPTH_MAX_M, big_endian: bool = False
):
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image in any supported encoding (header left empty).

    Used by the synthetic camera and the tests; depth encodings store the gray level as a
    depth in [0, depth_max_m] so the round trip through `image_to_rgb` is close to identity.
    """
    from sensor_msgs.msg import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    if encoding not in RAW_ENCODINGS:
        raise ValueError(f"encoding {encoding!r} is not supported; accepted: {', '.join(RAW_ENCODINGS)}")
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[:, :, ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    elif encoding == "mono8":
        pixels = gray
    elif encoding == "mono16":
        pixels = gray.astype(np.uint16) << 8
    elif encoding == "16UC1":
        pixels = np.rint(gray.astype(np.float64) / 255.0 * depth_max_m * 1000.0).astype(np.uint16)
    else:
        pixels = (gray.astype(np.float32) / 255.0 * depth_max_m).astype(np.float32)
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if big_endian else "<"))
    msg = Image()
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 1 if (big_endian and pixels.dtype.itemsize > 1) else 0
    msg.step = int(pixels.strides[0])
    msg.data = pixels.tobytes()
    return msg


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", jpeg_quality: int = 90):
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage (JPEG or PNG), header left empty."""
    from sensor_msgs.msg import CompressedImage

    fmt = fmt.lower()
    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"format {fmt!r} is not supported; accepted: {', '.join(COMPRESSED_FORMATS)}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if fmt == "jpeg" else []
    ok, encoded = cv2.imencode("." + ("jpg" if fmt == "jpeg" else "png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    msg = CompressedImage()
    msg.format = fmt
    msg.data = encoded.tobytes()
    return msg
