"""YuNet's two backends: onnxruntime for exports with symbolic height/width, OpenCV otherwise.

Both return what ``cv2.FaceDetectorYN.detect`` returns: float32 rows of x, y, w, h, five landmarks
(x, y each: right eye, left eye, nose tip, mouth right, mouth left) and the score, best first.

onnxruntime runs the same network in about half the time OpenCV's dnn module takes on one x86
core (benchmarks/README.md, face detection) and, unlike ``FaceDetectorYN``, needs no re-allocation
when the input size changes between passes or photos. It needs a model whose input's height and width are symbolic
(opencv_zoo's ``face_detection_yunet_2026may.onnx``); an export with a fixed 640x640 input
(``2023mar``) runs through ``cv2.FaceDetectorYN``. The decoding below follows YuNet's published
output layout (the ``FaceDetectorYN`` post-processing): per stride s of 8, 16 and 32, one row per
cell of the input padded to a multiple of 32, score = sqrt(cls x obj), centre = (cell + offset) x s,
size = exp(log-size) x s, landmarks = (cell + offset) x s.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import cv2
import numpy as np

STRIDES = (8, 16, 32)
OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)
DIVISOR = 32  # YuNet's input is padded (bottom/right, zeros) to a multiple of this
TOP_K = 5000


def padded(side: int) -> int:
    return ((max(1, side) - 1) // DIVISOR + 1) * DIVISOR


def is_yunet(session) -> bool:
    """Whether an onnxruntime session holds a YuNet export (one input, YuNet's 12 outputs)."""
    return len(session.get_inputs()) == 1 and set(OUTPUTS) <= {o.name for o in session.get_outputs()}


def is_dynamic(session) -> bool:
    """Whether an onnxruntime session holds a YuNet export whose height and width are free."""
    shape = session.get_inputs()[0].shape
    return is_yunet(session) and len(shape) == 4 and not any(isinstance(s, int) for s in shape[2:])


class OrtYuNet:
    """YuNet through onnxruntime (a model with symbolic height/width; see ``is_dynamic``)."""

    backend = "onnxruntime"

    def __init__(self, session, score_threshold: float, nms_threshold: float):
        self.session, self.score_threshold, self.nms_threshold = session, score_threshold, nms_threshold
        self._input = session.get_inputs()[0].name

    def detect(self, bgr: np.ndarray) -> np.ndarray | None:
        h, w = bgr.shape[:2]
        ph, pw = padded(h), padded(w)
        if (ph, pw) != (h, w):
            bgr = cv2.copyMakeBorder(bgr, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        blob = np.ascontiguousarray(bgr.transpose(2, 0, 1)[None], dtype=np.float32)
        outs = dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), {self._input: blob})))
        faces = np.concatenate([self._decode(outs, s, pw // s) for s in STRIDES])
        if len(faces) == 0:
            return None
        boxes = faces[:, :4].astype(np.int32).tolist()  # integer boxes, as FaceDetectorYN's NMS sees them
        keep = cv2.dnn.NMSBoxes(boxes, faces[:, 14].astype(np.float64).tolist(), self.score_threshold,
                                self.nms_threshold, 1.0, TOP_K)
        keep = np.asarray(keep, dtype=int).reshape(-1)
        return faces[keep] if len(keep) else None

    def _decode(self, outs: dict[str, np.ndarray], stride: int, cols: int) -> np.ndarray:
        cls = np.clip(outs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= self.score_threshold)
        if len(idx) == 0:
            return np.zeros((0, 15), np.float32)
        bbox = outs[f"bbox_{stride}"].reshape(-1, 4)[idx]
        kps = outs[f"kps_{stride}"].reshape(-1, 10)[idx]
        cell = np.stack([idx % cols, idx // cols], axis=1).astype(np.float32)  # (c, r)
        centre = (cell + bbox[:, :2]) * stride
        size = np.exp(bbox[:, 2:4]) * stride
        marks = (kps.reshape(-1, 5, 2) + cell[:, None, :]) * stride
        return np.concatenate([centre - size / 2, size, marks.reshape(-1, 10), score[idx, None]],
                              axis=1).astype(np.float32)


class CvYuNet:
    """YuNet through ``cv2.FaceDetectorYN`` (any YuNet export OpenCV loads). ``setInputSize`` costs
    a few ms each time the size changes, so one detector is kept per recent input size."""

    backend = "opencv"
    KEEP = 4  # input sizes kept: the passes of one photo, and of the next photo of the same size

    def __init__(self, model_path: str | os.PathLike, score_threshold: float, nms_threshold: float):
        self.model_path, self.score_threshold, self.nms_threshold = str(model_path), score_threshold, nms_threshold
        self._nets: OrderedDict[tuple[int, int], cv2.FaceDetectorYN] = OrderedDict()
        self._lock = threading.Lock()  # a net is re-sized in place: one caller at a time
        self._net((320, 320))  # raises cv2.error for a file OpenCV cannot load

    def _net(self, size: tuple[int, int]) -> cv2.FaceDetectorYN:
        net = self._nets.pop(size, None)
        if net is None and len(self._nets) >= self.KEEP:  # re-size the least recently used one
            net = self._nets.popitem(last=False)[1]
            net.setInputSize(size)
        elif net is None:
            net = cv2.FaceDetectorYN.create(self.model_path, "", size, self.score_threshold, self.nms_threshold, TOP_K)
        self._nets[size] = net
        return net

    def detect(self, bgr: np.ndarray) -> np.ndarray | None:
        h, w = bgr.shape[:2]
        with self._lock:
            return self._net((w, h)).detect(bgr)[1]
