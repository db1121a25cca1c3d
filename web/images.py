"""Sample thumbnails: a stored input drawn as a PNG on the server, with no imaging library (the
PNG is written by hand: a grey or RGB image, zlib-compressed rows)."""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from metaql.errors import InvalidInputException

MAX_SCALE = 16


def image_of(x) -> np.ndarray:
    """One sample's input as an (H, W) or (H, W, 3) float array: a flat vector with a square
    length (digits' 64 pixels), (H, W), (1, H, W), or (3, H, W) / (H, W, 3)."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side != a.size or side < 2:
            raise InvalidInputException(f"an input of {a.size} values is not a square image")
        return a.reshape(side, side)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3):
        return a
    raise InvalidInputException(f"an input of shape {tuple(a.shape)} is not drawn as an image")


def png(image: np.ndarray, scale: int = 1, invert: bool = True) -> bytes:
    """PNG bytes of an image scaled to 0..255 over its own range (grey: dark ink on white by
    default), each pixel repeated `scale` times per side."""
    if not 1 <= scale <= MAX_SCALE:
        raise InvalidInputException(f"scale must lie in 1..{MAX_SCALE}, got {scale}")
    a = np.nan_to_num(np.asarray(image, dtype=np.float64))
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if a.ndim == 2 and invert:
        a = 1.0 - a
    pixels = np.round(a * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows, 6)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
