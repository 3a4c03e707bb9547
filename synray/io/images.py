"""Image encoding for shards and verification sets (RGB uint8 in, bytes out)."""

from __future__ import annotations

import cv2
import numpy as np

from synray.errors import UserError


class ImageDecodeError(UserError, ValueError):
    """Encoded image bytes are corrupt or in an unsupported format."""


def encode_image(rgb: np.ndarray, fmt: str = ".png", quality: int = 95) -> bytes:
    """Encode an RGB uint8 HxWx3 image as ``.png`` (lossless, the shard default) or ``.jpg``."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got {rgb.dtype} {rgb.shape}")
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == ".jpg" else []
    ok, buf = cv2.imencode(fmt, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode an image of shape {rgb.shape} as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode bytes to RGB uint8 HxWx3; corrupt data raises :class:`ImageDecodeError` naming ``what``."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if arr is None:
        raise ImageDecodeError(f"corrupt or unsupported image data in {what}")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
