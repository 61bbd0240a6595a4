"""Face crop and model input: the one preprocessing used by training evaluation, export
calibration/parity and the runtime.

The crop is a square centred on the face box, side = box side x (1 + 2 x margin), padded by
edge replication where it leaves the image. The model input is float32 RGB 0..255, NCHW;
normalisation lives inside the ONNX graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def square_box(box: Sequence[float], margin: float) -> tuple[int, int, int, int]:
    """Square (x1, y1, x2, y2) centred on ``box`` with side = max(w, h) x (1 + 2 x margin)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    side = max(side, 1.0)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    s = int(round(side))
    return left, top, left + s, top + s


def crop_face(image: np.ndarray, box: Sequence[float] | None, margin: float) -> np.ndarray:
    """Square crop of ``image`` (H, W, C uint8) around ``box``; None means the whole image."""
    h, w = image.shape[:2]
    if box is None:
        box = (0, 0, w, h)
    x1, y1, x2, y2 = square_box(box, margin)
    pad_l, pad_t = max(0, -x1), max(0, -y1)
    pad_r, pad_b = max(0, x2 - w), max(0, y2 - h)
    crop = image[max(0, y1):min(h, y2), max(0, x1):min(w, x2)]
    if crop.size == 0:  # box entirely outside the image: replicate the nearest edge pixel
        cx, cy = min(max((x1 + x2) // 2, 0), w - 1), min(max((y1 + y2) // 2, 0), h - 1)
        crop = image[cy:cy + 1, cx:cx + 1]
        pad_l = pad_t = 0
        pad_r, pad_b = x2 - x1 - 1, y2 - y1 - 1
    if pad_l or pad_t or pad_r or pad_b:
        crop = cv2.copyMakeBorder(crop, pad_t, pad_b, pad_l, pad_r, cv2.BORDER_REPLICATE)
    return crop


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square crop to ``size`` x ``size`` (area when shrinking, linear when growing)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def prepare_face(image: np.ndarray, box: Sequence[float] | None, margin: float, size: int) -> np.ndarray:
    """RGB uint8 image + face box -> the (size, size, 3) uint8 face the model sees."""
    return resize_square(crop_face(image, box, margin), size)


def to_input(faces: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack (S, S, 3) uint8 RGB faces into the model input: float32 [N, 3, S, S], values 0..255."""
    batch = np.stack(list(faces)) if not isinstance(faces, np.ndarray) or faces.ndim == 3 else faces
    if batch.ndim == 3:
        batch = batch[None]
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)


def prepare_precropped(image: np.ndarray, size: int) -> np.ndarray:
    """A pre-cropped face (a dataset image, detector ``none``): the whole image, squared, no margin.

    Training evaluation, export calibration/parity and the runtime's ``none`` detector all use this.
    """
    return prepare_face(image, None, 0.0, size)
