import io

import numpy as np
import pytest
from PIL import Image

from nurec_jax._proto import sensorsim_pb2
from nurec_jax.server import images


def _image():
    y, x = np.mgrid[0:24, 0:40]
    return np.stack([x / 39.0, y / 23.0, np.full_like(x, 0.25, dtype=float)], -1)


def test_png_is_lossless_rgb():
    rgb = _image()
    data = images.encode(rgb, sensorsim_pb2.PNG)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(img), images.to_uint8(rgb))


def test_jpeg_quality_scale():
    rgb = _image()
    hi = images.encode(rgb, sensorsim_pb2.JPEG, 95)
    lo = images.encode(rgb, sensorsim_pb2.JPEG, 5)
    assert Image.open(io.BytesIO(hi)).format == "JPEG"
    assert len(lo) < len(hi)
    err = np.abs(np.asarray(Image.open(io.BytesIO(hi)), float) - images.to_uint8(rgb)).mean()
    assert err < 3.0


def test_planar_layout_is_chw():
    rgb = _image()
    data = images.encode(rgb, sensorsim_pb2.RGB_UINT8_PLANAR)
    planes = np.frombuffer(data, np.uint8).reshape(3, 24, 40)
    np.testing.assert_array_equal(planes.transpose(1, 2, 0), images.to_uint8(rgb))


@pytest.mark.parametrize(
    "fmt,quality,message",
    [
        (sensorsim_pb2.UNDEFINED, 95, "image_format: UNDEFINED is not supported"),
        (sensorsim_pb2.JPEG2000, 95, "image_format: JPEG2000 is not supported"),
        (sensorsim_pb2.AV1, 95, "image_format: AV1"),
        (99, 95, "image_format: 99"),
        (sensorsim_pb2.JPEG, 0, r"image_quality: JPEG quality must be in \[1, 100\]"),
        (sensorsim_pb2.JPEG, 0.95, r"image_quality"),
    ],
)
def test_refused_formats_name_the_field(fmt, quality, message):
    with pytest.raises(ValueError, match=message):
        images.encode(_image(), fmt, quality)
