"""Image encodings of rendered frames, as NuRec clients expect them (docs/wire.md#image-encodings).

PNG: 8-bit RGB. JPEG: quality on NuRec's 1-100 scale (clients send 95; 0 is an error).
RGB_UINT8_PLANAR: raw bytes, three planes R, G, B of out_h x out_w uint8 (CHW), no header.
Everything else (UNDEFINED, JPEG2000, AVC, AV1, unknown values) is refused with a ValueError naming
`image_format`, which the servicer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from nurec_jax._proto import sensorsim_pb2

PNG = sensorsim_pb2.PNG
JPEG = sensorsim_pb2.JPEG
RGB_UINT8_PLANAR = sensorsim_pb2.RGB_UINT8_PLANAR


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8, rounded."""
    return (np.clip(np.asarray(rgb, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def validate_format(image_format: int, image_quality: float, field: str = "") -> None:
    """Raises ValueError for a format or quality NuRec refuses (before any rendering is spent)."""
    prefix = f"{field}." if field else ""
    if image_format == JPEG:
        if not (1.0 <= image_quality <= 100.0):
            raise ValueError(
                f"{prefix}image_quality: JPEG quality must be in [1, 100] (NuRec's scale), got {image_quality}"
            )
        return
    if image_format in (PNG, RGB_UINT8_PLANAR):
        return
    try:
        name = sensorsim_pb2.ImageFormat.Name(image_format)
    except ValueError:
        name = str(image_format)
    raise ValueError(f"{prefix}image_format: {name} is not supported (use PNG, JPEG or RGB_UINT8_PLANAR)")


def encode(rgb: np.ndarray, image_format: int, image_quality: float = 95.0) -> bytes:
    """Encodes an (H, W, 3) float image in [0, 1]."""
    validate_format(image_format, image_quality)
    pixels = to_uint8(rgb)
    if image_format == RGB_UINT8_PLANAR:
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    buf = io.BytesIO()
    if image_format == PNG:
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    else:
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=int(round(image_quality)))
    return buf.getvalue()
