"""Image conversion against the sensor_msgs/Image field definitions (row-major, `step` bytes
per row, `is_bigendian` for multi-byte channels), with messages built byte by byte here."""

import struct

import cv2
import numpy as np
import pytest

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from quantvla_ros.image_conversion import (  # noqa: E402
    RAW_ENCODINGS,
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
    message_to_rgb,
    rgb_to_compressed,
    rgb_to_image,
)


def _rng_image(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pack_rows(h, w, pixel_bytes, step):
    """Build `data` per the message definition: each row is the pixels then padding to `step`."""
    out = bytearray()
    for y in range(h):
        row = b"".join(pixel_bytes(y, x) for x in range(w))
        assert len(row) <= step
        out += row + b"\xab" * (step - len(row))
    return bytes(out)


def _msg(h, w, encoding, step, data, big=0):
    m = Image()
    m.height, m.width, m.encoding, m.step, m.is_bigendian = h, w, encoding, step, big
    m.data = data
    return m


def test_field_definitions_are_the_ones_assumed():
    fields = Image.get_fields_and_field_types()
    assert fields == {
        "header": "std_msgs/Header",
        "height": "uint32",
        "width": "uint32",
        "encoding": "string",
        "is_bigendian": "uint8",
        "step": "uint32",
        "data": "sequence<uint8>",
    }
    assert CompressedImage.get_fields_and_field_types()["format"] == "string"


@pytest.mark.parametrize(
    "encoding,order", [("rgb8", (0, 1, 2)), ("bgr8", (2, 1, 0)), ("rgba8", (0, 1, 2, None)), ("bgra8", (2, 1, 0, None))]
)
def test_color_encodings_with_row_padding(encoding, order):
    rgb = _rng_image()
    h, w = rgb.shape[:2]
    step = w * len(order) + 3  # padded rows

    def px(y, x):
        return bytes(255 if c is None else int(rgb[y, x, c]) for c in order)

    out = image_to_rgb(_msg(h, w, encoding, step, _pack_rows(h, w, px, step)))
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_mono8_and_mono16_both_endiannesses():
    gray = _rng_image()[:, :, 0]
    h, w = gray.shape
    out = image_to_rgb(_msg(h, w, "mono8", w, _pack_rows(h, w, lambda y, x: bytes([gray[y, x]]), w)))
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    val16 = gray.astype(np.uint16) * 256 + 77  # low byte must be dropped
    for big, fmt in ((0, "<H"), (1, ">H")):
        data = _pack_rows(h, w, lambda y, x: struct.pack(fmt, int(val16[y, x])), 2 * w + 2)
        out = image_to_rgb(_msg(h, w, "mono16", 2 * w + 2, data, big))
        np.testing.assert_array_equal(out[:, :, 1], gray)


def test_depth_encodings_map_range_and_invalid_to_zero():
    mm = np.array([[0, 1000, 5000, 10000, 20000]], dtype=np.uint16)
    data = _pack_rows(1, 5, lambda y, x: struct.pack("<H", int(mm[y, x])), 10)
    out = image_to_rgb(_msg(1, 5, "16UC1", 10, data), depth_max_m=10.0)
    assert out[0, :, 0].tolist() == [0, round(25.5), round(127.5), 255, 255]
    metres = [float("nan"), 2.5, float("inf"), -1.0, 10.0]
    data = _pack_rows(1, 5, lambda y, x: struct.pack(">f", metres[x]), 20)
    out = image_to_rgb(_msg(1, 5, "32FC1", 20, data, big=1), depth_max_m=10.0)
    assert out[0, :, 2].tolist() == [0, round(63.75), 0, 0, 255]


@pytest.mark.parametrize("encoding", list(RAW_ENCODINGS))
def test_round_trip_through_our_encoder(encoding):
    rgb = _rng_image(6, 9, seed=3)
    back = image_to_rgb(rgb_to_image(rgb, encoding))
    if encoding in ("rgb8", "bgr8", "rgba8", "bgra8"):
        np.testing.assert_array_equal(back, rgb)
    else:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        assert np.abs(back[:, :, 0].astype(int) - gray).max() <= 1


def test_compressed_png_is_lossless_and_jpeg_close():
    rgb = _rng_image(16, 24, seed=1)
    np.testing.assert_array_equal(compressed_to_rgb(rgb_to_compressed(rgb, "png")), rgb)
    smooth = np.zeros((32, 48, 3), np.uint8)
    smooth[:, :, 0] = 200
    smooth[:, 24:, 2] = 120
    msg = rgb_to_compressed(smooth, "jpeg", 95)
    msg.format = "rgb8; jpeg compressed bgr8"  # image_transport's spelling
    out = message_to_rgb(msg)
    assert out.shape == smooth.shape and np.abs(out.astype(int) - smooth).mean() < 4


@pytest.mark.parametrize(
    "case,code",
    [
        ("encoding", "unsupported_encoding"),
        ("zero", "empty"),
        ("step_small", "size_mismatch"),
        ("truncated", "truncated"),
        ("extra", "size_mismatch"),
        ("huge_header", "too_large"),
    ],
)
def test_bad_raw_images_raise_named_errors(case, code):
    rgb = _rng_image(4, 4)
    msg = rgb_to_image(rgb, "rgb8")
    if case == "encoding":
        msg.encoding = "yuv422"
    elif case == "zero":
        msg.width = msg.height = 0
        msg.step = 0
        msg.data = b""
    elif case == "step_small":
        msg.step = 11
    elif case == "truncated":
        msg.data = bytes(msg.data)[:-5]
    elif case == "extra":
        msg.data = bytes(msg.data) + b"\0"
    elif case == "huge_header":  # claims 100000 x 100000 with 48 bytes of data
        msg.width = msg.height = 100000
        msg.step = 300000
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(msg, max_pixels=1 << 24)
    assert err.value.code == code
    if case == "encoding":
        assert "yuv422" in str(err.value) and "rgb8" in str(err.value)


def test_bad_compressed_images_raise_named_errors():
    rgb = _rng_image(40, 40)
    jpeg = bytes(rgb_to_compressed(rgb, "jpeg").data)
    png = bytes(rgb_to_compressed(rgb, "png").data)

    def comp(data, fmt="jpeg"):
        m = CompressedImage()
        m.format, m.data = fmt, data
        return m

    cases = [
        (comp(b""), "empty"),
        (comp(b"not an image at all"), "corrupt"),
        (comp(jpeg[:3]), "corrupt"),
        (comp(jpeg[:200] + bytes(300)), "corrupt"),
        (comp(png, "tiff"), "unsupported_encoding"),
        (comp(png[:16] + struct.pack(">II", 50000, 50000) + png[24:], "png"), "too_large"),
    ]
    sof = jpeg.index(b"\xff\xc0")
    huge = jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + jpeg[sof + 9 :]
    cases.append((comp(huge), "too_large"))
    for msg, code in cases:
        with pytest.raises(ImageConversionError) as err:
            compressed_to_rgb(msg, max_pixels=4096 * 4096)
        assert err.value.code == code, (code, str(err.value))


def test_geometry_is_checked_before_pixels():
    from sensor_msgs.msg import CompressedImage

    from quantvla_ros.image_conversion import (
        ImageConversionError,
        compressed_to_rgb,
        image_to_rgb,
        rgb_to_compressed,
        rgb_to_image,
    )

    thin = rgb_to_image(np.zeros((1, 10000, 3), np.uint8))
    with pytest.raises(ImageConversionError, match="aspect ratio 10000.0:1") as e:
        image_to_rgb(thin, min_side=1, max_aspect=10.0)
    assert e.value.code == "bad_geometry"
    with pytest.raises(ImageConversionError, match="min_image_side"):
        image_to_rgb(rgb_to_image(np.zeros((8, 8, 3), np.uint8)), min_side=16)
    assert image_to_rgb(thin).shape == (1, 10000, 3)  # the checks are the caller's choice
    jpeg = rgb_to_compressed(np.zeros((2, 4000, 3), np.uint8))
    with pytest.raises(ImageConversionError, match="aspect"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=jpeg.data), max_aspect=10.0)


def test_damaged_jpeg_that_libjpeg_still_decodes_is_refused():
    import cv2
    from sensor_msgs.msg import CompressedImage

    from quantvla_ros.image_conversion import ImageConversionError, compressed_to_rgb, rgb_to_compressed
    from quantvla_ros.synthetic_camera import render_scene

    good = bytes(rgb_to_compressed(render_scene(64, 48, 0.0), "jpeg").data)
    k = good.find(b"\xff\xda") + 100
    cases = {
        "flip": (good[:k] + bytes([good[k] ^ 0x5A]) + good[k + 1 :], "corrupt", "libjpeg"),
        "marker": (good[:k] + b"\xff\x37" + good[k + 2 :], "corrupt", "inside scan"),
        "no_eoi": (good[:-2], "truncated", "no EOI"),
        "cut": (good[: len(good) * 2 // 3], "truncated", "no EOI"),
    }
    for name, (data, code, words) in cases.items():
        if name == "flip":  # the case this exists for: imdecode returns an image
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
        with pytest.raises(ImageConversionError, match=words) as e:
            compressed_to_rgb(CompressedImage(format="jpeg", data=data))
        assert e.value.code == code, name
    assert compressed_to_rgb(CompressedImage(format="jpeg", data=good)).shape == (48, 64, 3)
    progressive = cv2.imencode(".jpg", render_scene(64, 48, 0.0), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert compressed_to_rgb(CompressedImage(format="jpeg", data=progressive)).shape == (48, 64, 3)
