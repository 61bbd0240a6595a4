"""Reading images safely: size bounded before decoding, EXIF orientation, any depth/channels -> RGB uint8."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm",
                        ".pnm"})
MAX_PIXELS = 64_000_000  # refuse images claiming more pixels than this before decoding them
MAX_FILE_BYTES = 256 * 1024 * 1024


class ImageError(ValueError):
    """An input that is not a readable image; the message is one line for the user."""


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG/JPEG/BMP/GIF/WebP header without decoding pixels; None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i + 9 < n:
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg = int.from_bytes(data[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + seg
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
        if chunk == b"VP8 ":
            return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            b = int.from_bytes(data[21:25], "little")
            return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    return None


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV-decoded image (grey, BGR, BGRA; 8/16-bit or float) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32) * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (H, W, 3), honouring EXIF orientation."""
    if not data:
        raise ImageError(f"{name}: empty file")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(f"{name}: image claims {size[0]}x{size[1]} pixels, over the {max_pixels:,}-pixel limit")
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if img is None or img.size == 0:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt data)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageError(f"{name}: image is {img.shape[1]}x{img.shape[0]} pixels, over the {max_pixels:,}-pixel limit")
    # IMREAD_UNCHANGED skips EXIF rotation: a JPEG with an EXIF block is decoded a second time
    # with an orientation-aware flag (IMREAD_COLOR / IMREAD_GRAYSCALE apply the orientation tag).
    if data[:2] == b"\xff\xd8" and b"Exif" in data[:65536] and img.dtype == np.uint8 and img.ndim in (2, 3):
        oriented = cv2.imdecode(buf, cv2.IMREAD_COLOR if img.ndim == 3 else cv2.IMREAD_GRAYSCALE)
        if oriented is not None:
            img = oriented
    return to_rgb_uint8(img)


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file to RGB uint8 (H, W, 3); raises ImageError with a one-line reason."""
    p = Path(path)
    try:
        if not p.exists():
            raise ImageError(f"{p}: no such file")
        if p.is_dir():
            raise ImageError(f"{p}: is a directory")
        if p.stat().st_size > MAX_FILE_BYTES:
            raise ImageError(f"{p}: file is larger than {MAX_FILE_BYTES // 2**20} MiB")
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"{p}: cannot read file ({e.strerror or e})") from None
    return decode_image(data, str(p), max_pixels)
