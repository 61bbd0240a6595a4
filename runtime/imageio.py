"""Reading inputs safely: regular files only, bounded in bytes and (before decoding) in pixels.

The pixel bound is OpenCV's own (``OPENCV_IO_MAX_IMAGE_PIXELS``, set by the package before cv2
loads): every decoder checks it on the header, so a 20000x20000 deflate TIFF is refused in
milliseconds instead of being decoded. Decoders' log chatter is silenced: each bad input gets
one line from us. Decoded images of any depth/channels become RGB uint8 (EXIF orientation kept).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm",
                        ".pnm"})
MAX_PIXELS = 64_000_000  # = OPENCV_IO_MAX_IMAGE_PIXELS set in agegender/__init__.py
MAX_FILE_BYTES = 256 * 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)

if "OPENCV_LOG_LEVEL" not in os.environ:  # libtiff/OpenCV decoder messages come through OpenCV's log
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
_native_lock = threading.Lock()
_native_depth = 0
_native_saved = -1


class ImageError(ValueError):
    """An input that is not a readable image; the message is one line for the user."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike) -> os.stat_result:
    """stat of ``path`` (symlinks followed) if it is a regular file; else ImageError.

    FIFOs, devices (/dev/zero), sockets and directories would hang or never end.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
    return st


def _os_error(path: str | os.PathLike, e: OSError) -> ImageError:
    if e.errno == errno.ENOENT:
        return ImageError(f"{path}: no such file")
    if e.errno == errno.ELOOP:
        return ImageError(f"{path}: symlink loop")
    return ImageError(f"{path}: cannot read file ({e.strerror or e})")


def read_input(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``: the one guarded way to open an input.

    Opened non-blocking (a FIFO must not hang the open) and checked on the open descriptor, so a
    file swapped for a device after the check is still refused.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise _os_error(path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise ImageError(f"{path}: file is larger than {max_bytes // 2**20} MiB")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageError(f"{path}: file is larger than {max_bytes // 2**20} MiB")
    return data


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Any OpenCV-decoded image (grey, BGR, BGRA; 8/16-bit or float) -> RGB uint8."""
    if img.dtype == np.uint16:
        img = (img // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
            raise ImageError("float image with NaN or infinite pixels")
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points to /dev/null inside: libpng writes its errors ("libpng error: IHDR:
    CRC error") straight to stderr, around OpenCV's log. Re-entrant across threads (the first in
    redirects, the last out restores); Python-level stderr of other threads is lost meanwhile."""
    global _native_depth, _native_saved
    with _native_lock:
        if _native_depth == 0:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stderr.flush()
            _native_saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _native_depth += 1
    try:
        yield
    finally:
        with _native_lock:
            _native_depth -= 1
            if _native_depth == 0:
                os.dup2(_native_saved, 2)
                os.close(_native_saved)


def _imdecode(buf: np.ndarray, flags: int, name: str) -> np.ndarray | None:
    try:
        with native_stderr_silenced():
            return cv2.imdecode(buf, flags)
    except cv2.error as e:  # OpenCV's header checks (pixels, width, height limits) raise
        if "CV_IO_MAX_IMAGE" in str(e):
            raise ImageError(f"{name}: image is over the {MAX_PIXELS:,}-pixel limit "
                             f"(refused before decoding)") from None
        raise ImageError(f"{name}: not a readable image (corrupt data)") from None


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to RGB uint8 (H, W, 3), honouring EXIF orientation."""
    if not data:
        raise ImageError(f"{name}: empty file")
    buf = np.frombuffer(data, dtype=np.uint8)
    img = _imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH, name)
    if img is None or img.size == 0:
        raise ImageError(f"{name}: not a readable image (unknown format or corrupt data)")
    if img.shape[0] * img.shape[1] > max_pixels:  # a smaller per-call bound than OpenCV's
        raise ImageError(f"{name}: image is {img.shape[1]}x{img.shape[0]} pixels, over the {max_pixels:,}-pixel limit")
    # IMREAD_UNCHANGED skips EXIF rotation: a JPEG with an EXIF block is decoded a second time
    # with an orientation-aware flag (IMREAD_COLOR / IMREAD_GRAYSCALE apply the orientation tag).
    if data[:2] == b"\xff\xd8" and b"Exif" in data[:65536] and img.dtype == np.uint8 and img.ndim in (2, 3):
        oriented = _imdecode(buf, cv2.IMREAD_COLOR if img.ndim == 3 else cv2.IMREAD_GRAYSCALE, name)
        if oriented is not None:
            img = oriented
    try:
        return to_rgb_uint8(img)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file to RGB uint8 (H, W, 3); raises ImageError with a one-line reason."""
    return decode_image(read_input(path), str(Path(path)), max_pixels)
