"""Video input: every N-th frame of a video file as an RGB image (OpenCV's bundled FFmpeg)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from .imageio import MAX_PIXELS, ImageError, regular_file

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own stderr chatter: we report one line per file
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"}
SHORT_TOLERANCE = 0.02  # containers estimate their frame count: fewer frames than this fraction is a truncation

log = logging.getLogger(__name__)


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def _open(path: Path) -> cv2.VideoCapture:
    """FFmpeg capture of ``path``, without OpenCV's warnings for a file it cannot open."""
    logging_ = cv2.utils.logging
    level = logging_.getLogLevel()
    logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)
    try:
        return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        logging_.setLogLevel(level)


def _warn_if_short(path: Path, expected: float, read: int) -> None:
    """A stream that ends before the frame count its container states was cut short: say so."""
    if expected > 0 and read < expected * (1 - SHORT_TOLERANCE) - 1:
        log.warning("%s: the video ended after %d of the %d frames its container lists (truncated or corrupt?)",
                    path, read, round(expected))


def iter_frames(path: str | os.PathLike, every: int = 1,
                max_pixels: int = MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (frame index, RGB uint8 frame) for frames 0, every, 2*every, ...

    Raises ImageError (one line) when the file is missing, not a regular file or not a readable
    video; a stream that breaks part-way ends the iteration with a warning.
    """
    p = Path(path)
    if regular_file(p).st_size == 0:
        raise ImageError(f"{p}: empty file")
    cap = _open(p)
    try:
        if not cap.isOpened():
            raise ImageError(f"{p}: not a readable video (unknown format or corrupt data)")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w * h > max_pixels:
            raise ImageError(f"{p}: video frames are {w}x{h} pixels, over the {max_pixels:,}-pixel limit")
        expected = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        every = max(1, int(every))
        index, yielded = 0, 0
        while cap.grab():
            if index % every == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                yielded += 1
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if yielded == 0:
            raise ImageError(f"{p}: no frame could be decoded from this video")
        _warn_if_short(p, expected, index)
    finally:
        cap.release()
