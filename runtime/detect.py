"""Face detectors (YuNet, Haar, none) and ``create_detector``, which picks one by name.

YuNet is fetched once into a user cache dir and verified by sha256 (fetch.py); its two backends
(onnxruntime, OpenCV) are in yunet.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .fetch import DetectorError, fetch_yunet
from .yunet import CvYuNet, OrtYuNet, is_dynamic, is_yunet

log = logging.getLogger(__name__)

HAAR_FILE = "haarcascade_frontalface_default.xml"
DETECTORS = ("auto", "yunet", "haar", "none")
AUTO_TIMEOUT_S = 5.0  # `auto` must not hang an offline device for long
# Detector defaults, chosen on benchmarks/bench_detect.py (numbers in benchmarks/README.md):
DEFAULT_DET_THRESHOLD = 0.7  # YuNet score: 0.9 missed real faces scoring 0.88-0.89; 0.6 let a landscape patch in
DEFAULT_MIN_FACE_SIZE = 20  # pixels, shorter side: the one default of Predictor, the CLI and create_detector
NMS_THRESHOLD = 0.3
MAIN_MIN_SIDE = 896  # YuNet's main pass: long side = the image's / 3, within [896, 1280] (never upscaled):
MAIN_SCALE = 1 / 3  # 1280-px passes on 1280-1920 px photos find more small faces but cost ~2x the time
MAIN_MAX_SIDE = 1280  # bounds YuNet's time and memory on 12 MP+ photos
LARGE_FACE_SIDE = 320  # YuNet misses faces over ~300 px: a second, small pass finds them
DARK_LEVEL = 150  # brightest 0.5 % of a photo below this grey level: stretched before YuNet sees it
MAX_GAIN = 6.0
SECOND_LOOK_FLOOR = 0.4  # a face YuNet scores in [this, threshold) is looked at again, at its own resolution:
SECOND_LOOK_FACE = 96  # its surroundings (SECOND_LOOK_CONTEXT x its side) re-run with the face this many px wide
SECOND_LOOK_CONTEXT = 2.5
SECOND_LOOK_MAX = 8  # per photo, best-scored first: bounds the extra time on busy photos
HAAR_LONG_SIDE = 1280
MIN_INPUT_SIDE = 64
INSTALL_HINT = ("run `agegender-run --fetch-detector` once on a machine with internet access (copy the cache "
                "dir to offline devices), or pass --detector-model PATH / set AGEGENDER_DETECTOR_MODEL")


@dataclass(frozen=True)
class Detection:
    """A face box in image pixels (x1, y1, x2, y2; may extend past the image) and a confidence."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None  # YuNet: right eye, left eye, nose, mouth r/l


class Detector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in an RGB uint8 (H, W, 3) image."""


# --------------------------------------------------------------------------- detectors
def clip_box(box: Sequence[float], w: int, h: int) -> tuple[float, float, float, float]:
    """``box`` limited to a w x h image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)


def _scaled(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """``image`` shrunk so its long side is at most ``long_side``, and the factor used."""
    h, w = image.shape[:2]
    scale = min(1.0, long_side / max(h, w))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


@dataclass(frozen=True)
class Passes:
    """The input sizes (long side, pixels) YuNet sees for an image whose long side is ``long_side``.

    A main pass at ``long_side x scale``, at least ``min_side`` (never upscaled) and at most
    ``max_side`` (which bounds time and memory on huge photos), then a pass at ``large_side`` for
    faces too big for the main pass (YuNet misses faces over ~300 px); 0 turns it off.
    """

    min_side: int = MAIN_MIN_SIDE
    scale: float = MAIN_SCALE
    max_side: int = MAIN_MAX_SIDE
    large_side: int = LARGE_FACE_SIDE

    def sides(self, long_side: int) -> list[int]:
        main = min(long_side, self.max_side, max(self.min_side, round(long_side * self.scale)))
        return [main, self.large_side] if 0 < self.large_side < main else [main]


class YuNetDetector:
    """OpenCV Zoo's YuNet run at the sizes of ``passes``, merged by NMS (on onnxruntime when the
    export allows it, else ``cv2.FaceDetectorYN``: see ``yunet.py``).

    ``det_score`` is YuNet's score of the pass that scored the face highest; because the passes
    are fixed fractions/sizes of the image, the same photo at another resolution gives (nearly)
    the same scores (see benchmarks/README.md).
    """

    name = "yunet"

    def __init__(self, model_path: str | os.PathLike, score_threshold: float = DEFAULT_DET_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, passes: Passes = Passes(), threads: int | None = None,
                 brighten: bool = True, second_look: float | None = SECOND_LOOK_FLOOR):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise DetectorError(f"{self.model_path}: no such YuNet model file")
        self.score_threshold, self.nms_threshold, self.passes = float(score_threshold), float(nms_threshold), passes
        self.brighten = bool(brighten)  # dark photos are stretched before detection (see ``dark_gain``)
        # near-misses (score in [second_look, threshold)) get a second look at their own resolution; None: off
        self.second_look = None if second_look is None or second_look >= self.score_threshold else float(second_look)
        self._net = self._backend(threads)
        self.backend = self._net.backend
        for probe in ((320, 240), (333, 250)):  # a model that cannot run at other sizes fails here, at setup
            self._run(np.zeros((probe[1], probe[0], 3), np.uint8))

    def _backend(self, threads: int | None) -> OrtYuNet | CvYuNet:
        """onnxruntime for an export with free height/width (faster), else OpenCV's FaceDetectorYN."""
        from .model import create_session

        try:
            session = create_session(self.model_path, threads)
        except Exception:  # noqa: BLE001 - onnxruntime raises several types; OpenCV gets its chance below
            session = None
        if session is not None and not is_yunet(session):
            outputs = [o.name for o in session.get_outputs()][:6]
            raise DetectorError(f"{self.model_path}: not a YuNet model (its outputs are {outputs}; YuNet's are "
                                f"cls_8, obj_8, bbox_8, kps_8, ...)")
        floor = self.score_threshold if self.second_look is None else self.second_look  # the net keeps near-misses
        if session is not None and is_dynamic(session):
            return OrtYuNet(session, floor, self.nms_threshold)
        try:
            return CvYuNet(self.model_path, floor, self.nms_threshold)
        except cv2.error as e:
            raise DetectorError(f"{self.model_path}: not a loadable YuNet model ({_cv_msg(e)})") from None

    def _run(self, bgr: np.ndarray) -> np.ndarray | None:
        h, w = bgr.shape[:2]
        try:
            out = self._net.detect(bgr)
        except Exception as e:  # noqa: BLE001 - cv2.error or an onnxruntime error: one line for the user
            msg = _cv_msg(e) if isinstance(e, cv2.error) else (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DetectorError(f"{self.model_path}: YuNet cannot run on a {w}x{h} input ({msg[:160]})") from None
        return out

    def _detect_at(self, image: np.ndarray, long_side: int) -> list[Detection]:
        """Faces found on ``image`` shrunk to ``long_side``, in ``image`` pixels."""
        small, scale = _scaled(image, long_side)
        return self._detect_scaled(small, scale, dark_gain(small) if self.brighten else 1.0)

    def _detect_scaled(self, small: np.ndarray, scale: float, gain: float = 1.0) -> list[Detection]:
        small = brightened(small, gain)
        h, w = small.shape[:2]
        if min(h, w) < MIN_INPUT_SIDE:  # YuNet returns garbage boxes for tiny inputs: pad them
            small = cv2.copyMakeBorder(small, 0, max(0, MIN_INPUT_SIDE - h), 0, max(0, MIN_INPUT_SIDE - w),
                                       cv2.BORDER_CONSTANT, value=(0, 0, 0))
        out = self._run(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        if out is None:
            return []
        dets = []
        for row in out:
            x, y, bw, bh = (float(v) / scale for v in row[:4])
            if np.isfinite(row[:15]).all() and bw > 0 and bh > 0:
                marks = tuple((float(row[i]) / scale, float(row[i + 1]) / scale) for i in range(4, 14, 2))
                dets.append(Detection((x, y, x + bw, y + bh), float(row[14]), marks))
        return dets

    def detect(self, image: np.ndarray) -> list[Detection]:
        dets, src, src_scale, gain = [], image, 1.0, None
        for side in self.passes.sides(max(image.shape[:2])):  # each pass shrinks the previous copy: cheap
            src, scale = _scaled(src, side)
            src_scale *= scale
            if gain is None:  # one gain per photo, from its main pass: every pass sees the same exposure
                gain = dark_gain(src) if self.brighten else 1.0
            dets += self._detect_scaled(src, src_scale, gain)
        found = nms(dets, self.score_threshold, self.nms_threshold)
        if self.second_look is None:
            return found
        near = [d for d in nms(dets, self.second_look, self.nms_threshold)
                if d.score < self.score_threshold and all(iou(d.box, f.box) < self.nms_threshold for f in found)]
        for d in near[:SECOND_LOOK_MAX]:
            again = self._look_again(image, d, gain or 1.0)
            if again is not None and all(iou(again.box, f.box) < self.nms_threshold for f in found):
                found.append(again)
        return sorted(found, key=lambda d: -d.score)

    def _look_again(self, image: np.ndarray, cand: Detection, gain: float) -> Detection | None:
        """``cand`` re-examined: its surroundings cut from the full-size ``image``, scaled so the face is
        ``SECOND_LOOK_FACE`` px wide, run through YuNet again; the face found there if it now scores
        over the threshold (small faces shrunk by the main pass, or blurred ones, often do; texture
        that looked like a face rarely does)."""
        x1, y1, x2, y2 = cand.box
        side = max(x2 - x1, y2 - y1)
        half = side * SECOND_LOOK_CONTEXT / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        h, w = image.shape[:2]
        left, top = int(max(0, cx - half)), int(max(0, cy - half))
        right, bottom = int(min(w, cx + half + 1)), int(min(h, cy + half + 1))
        if right - left < 8 or bottom - top < 8:
            return None
        scale = SECOND_LOOK_FACE / side
        window = cv2.resize(image[top:bottom, left:right],
                            (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))),
                            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        best = None
        for d in self._detect_scaled(window, scale, gain):
            box = (d.box[0] + left, d.box[1] + top, d.box[2] + left, d.box[3] + top)
            if d.score >= self.score_threshold and iou(box, cand.box) >= 0.5 and (best is None or d.score > best.score):
                marks = tuple((mx + left, my + top) for mx, my in d.landmarks) if d.landmarks else None
                best = Detection(box, d.score, marks)
        return best


def dark_gain(image: np.ndarray) -> float:
    """The gain that stretches an under-exposed RGB uint8 ``image`` (its brightest 0.5 % darker than
    ``DARK_LEVEL``) so they reach ~230, at most ``MAX_GAIN``; 1.0 for any other image."""
    if image.size == 0 or image.dtype != np.uint8 or image.ndim != 3:
        return 1.0
    hist = cv2.calcHist([cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)], [0], None, [256], [0, 256]).ravel()
    bright = int(np.searchsorted(np.cumsum(hist), 0.995 * hist.sum()))  # the 99.5th percentile of grey
    return 1.0 if bright >= DARK_LEVEL else min(MAX_GAIN, 230.0 / max(bright, 1))


def brightened(image: np.ndarray, gain: float | None = None) -> np.ndarray:
    """``image`` as YuNet sees it: stretched by ``gain`` (default: its own ``dark_gain``), unchanged at
    1.0. Detection only: the crops the model sees come from the photo as it is."""
    gain = dark_gain(image) if gain is None else gain
    return image if gain == 1.0 else cv2.convertScaleAbs(image, alpha=gain)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(dets: list[Detection], score_threshold: float, nms_threshold: float = NMS_THRESHOLD) -> list[Detection]:
    """``dets`` over the threshold without overlapping duplicates (``cv2.dnn.NMSBoxes``), best first."""
    if not dets:
        return []
    boxes = [[d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]] for d in dets]
    keep = cv2.dnn.NMSBoxes(boxes, [d.score for d in dets], score_threshold, nms_threshold)
    return [dets[i] for i in np.asarray(keep, dtype=int).reshape(-1)]


def _cv_msg(e: cv2.error) -> str:
    """The informative last line of an OpenCV error (its text often ends with a lone ">")."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() not in ("", ">")]
    return (lines[-1] if lines else "cv2.error")[-160:]


class HaarDetector:
    """OpenCV's bundled frontal-face Haar cascade: offline, but misses more faces than YuNet."""

    name = "haar"

    def __init__(self, min_size: int = 24):
        folder = getattr(getattr(cv2, "data", None), "haarcascades", "")
        path = Path(folder) / HAAR_FILE if folder else None
        if path is None or not path.is_file():
            raise DetectorError(f"this OpenCV ({cv2.__version__}) ships no Haar cascades (OpenCV 5 wheels do not); "
                                f"use YuNet: {INSTALL_HINT}")
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise DetectorError(f"{path}: cannot load the Haar cascade")
        self.min_size = max(1, int(min_size))

    def detect(self, image: np.ndarray) -> list[Detection]:
        small, scale = _scaled(image, HAAR_LONG_SIDE)
        if min(small.shape[:2]) < 24:
            return []
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        min_px = max(24, round(self.min_size * scale))
        boxes = self._cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_px, min_px))
        return [Detection((x / scale, y / scale, (x + w) / scale, (y + h) / scale), 1.0)
                for x, y, w, h in (tuple(int(v) for v in b) for b in boxes)]


class WholeImageDetector:
    """``none``: the whole image is one face (pre-cropped inputs)."""

    name = "none"

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        return [Detection((0.0, 0.0, float(w), float(h)), 1.0)]


# --------------------------------------------------------------------------- resolution
def _given_model(model_path: str | os.PathLike | None) -> Path | None:
    given = model_path or os.environ.get("AGEGENDER_DETECTOR_MODEL")
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.is_file():
        raise DetectorError(f"{path}: no such YuNet model file (from --detector-model or AGEGENDER_DETECTOR_MODEL)")
    return path


def create_detector(name: str = "auto", model_path: str | os.PathLike | None = None,
                    min_face_size: int = DEFAULT_MIN_FACE_SIZE, score_threshold: float = DEFAULT_DET_THRESHOLD,
                    timeout: float = AUTO_TIMEOUT_S, threads: int | None = None) -> Detector:
    """Build a detector by name (auto, yunet, haar, none); raises DetectorError.

    ``auto``: YuNet if a file is given or a verified copy is cached, else try the fetch with a
    short ``timeout``, else Haar with a warning that says how to get YuNet. ``threads``: YuNet's
    onnxruntime threads (None: all cores; OpenCV's backend follows ``cv2.setNumThreads``).
    """
    if name not in DETECTORS:
        raise DetectorError(f"unknown detector {name!r} (choose from {', '.join(DETECTORS)})")
    if name == "none":
        return WholeImageDetector()
    if name == "haar":
        return HaarDetector(min_size=max(24, min_face_size))
    given = _given_model(model_path)
    if given is not None:
        return YuNetDetector(given, score_threshold, threads=threads)
    if name == "yunet":
        return YuNetDetector(fetch_yunet(), score_threshold, threads=threads)
    try:  # a verified cached copy is used without any network access
        return YuNetDetector(fetch_yunet(timeout=timeout), score_threshold, threads=threads)
    except DetectorError as e:
        log.warning("YuNet face detector unavailable (%s); falling back to OpenCV's Haar cascade, which misses "
                    "more faces. To use YuNet: %s", e, INSTALL_HINT)
    return HaarDetector(min_size=max(24, min_face_size))
