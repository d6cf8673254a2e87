"""Cover images for exported packages: the default cover and a small PNG encoder."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from napari_unet.io.safe_files import ModelFileError
from napari_unet.io.safe_files import first_line as _first_line

_PALETTE = np.array(
    [[0, 0, 0], [255, 200, 0], [0, 160, 255], [255, 60, 60], [60, 220, 90], [200, 80, 255]],
    np.uint8,
)


def _png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in rgb)

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _as_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        lo, hi = np.percentile(a, (1, 99.8))
        a = (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ModelFileError(f"a cover image must be (H, W) or (H, W, 3), got {a.shape}")
    return a[..., :3]


def _cover_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Input (grey) beside the prediction (class colours), side by side (2:1)."""
    left = _as_rgb(x[0, 0])
    probs = y[0]
    if probs.shape[0] == 1:
        small = (np.clip(probs[0], 0, 1)[..., None] * _PALETTE[1]).astype(np.uint8)
    else:
        small = _PALETTE[probs.argmax(axis=0) % len(_PALETTE)]
    right = np.zeros_like(left)
    o = (left.shape[0] - small.shape[0]) // 2
    right[o : o + small.shape[0], o : o + small.shape[1]] = small
    return np.concatenate([left, right], axis=1)


def _cover(cover, x: np.ndarray, y: np.ndarray) -> tuple[str, bytes]:
    if cover is None:
        return "cover.png", _png(_cover_image(x, y))
    if isinstance(cover, np.ndarray):
        return "cover.png", _png(_as_rgb(cover))
    path = Path(cover)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif"):
        raise ModelFileError(f"{path.name}: a cover must be a PNG, JPEG or GIF image")
    try:  # a file the model zoo can show, not an empty or broken one
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    except Exception as err:  # noqa: BLE001 - any decoder error, said in its first line
        raise ModelFileError(
            f"{path.name}: not a readable cover image ({_first_line(err)})"
        ) from None
    return f"cover{path.suffix.lower()}", path.read_bytes()
