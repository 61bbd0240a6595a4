"""The Python API: ``Predictor(...).predict(image_or_path) -> list[Face]``.

Detection, then the crop and input of ``preprocess`` (the very functions training's evaluation
uses), then one batched onnxruntime call per image. Sessions are shared: one per model file
(and thread count) for the whole process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .detect import DEFAULT_DET_THRESHOLD, DEFAULT_MIN_FACE_SIZE, Detection, Detector, clip_box, create_detector
from .imageio import read_image
from .model import ModelError, OnnxClassifier
from .preprocess import prepare_face, prepare_precropped, to_input

log = logging.getLogger(__name__)

DEFAULT_MODEL = "agegender_int8.onnx"
MODEL_NAMES = {"default": DEFAULT_MODEL, "fast": "agegender_fast_int8.onnx"}  # --model NAME: a shipped file
MODEL_PACKAGE = "agegender.models"


@dataclass(frozen=True)
class Face:
    """One classified face. ``age``/``gender`` fields are None when the model lacks that head."""

    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in image pixels
    det_score: float
    age: str | None
    age_probs: dict[str, float] | None
    gender: str | None
    gender_score: float | None

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        """The JSON object of ``agegender-run --json`` for this face."""
        return {
            "box": list(self.box),
            "det_score": round(self.det_score, digits),
            "age": self.age,
            "age_probs": None if self.age_probs is None else {k: round(v, digits) for k, v in self.age_probs.items()},
            "gender": self.gender,
            "gender_score": None if self.gender_score is None else round(self.gender_score, digits),
        }


def shipped_model(name: str = "default") -> Path | None:
    """The file of a short model name (``MODEL_NAMES``) in ``agegender.models``, or None when absent."""
    try:
        path = resources.files(MODEL_PACKAGE) / MODEL_NAMES[name]
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def default_model_path() -> Path | None:
    """The shipped model in ``agegender.models``, or None when it is not installed."""
    return shipped_model("default")


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """``model``, else ``AGEGENDER_MODEL``, else the shipped default; raises ModelError.

    A short name (``default``, ``fast``) means a shipped model, unless a file of that name exists:
    a path the user can see always wins.
    """
    given = str(model or os.environ.get("AGEGENDER_MODEL") or "")
    path = Path(given).expanduser()
    if given and (given not in MODEL_NAMES or path.exists()):
        return path
    found = shipped_model(given) if given else default_model_path()
    if found is None:
        names = ", ".join(n for n in MODEL_NAMES if shipped_model(n)) or "none"
        what = f"model {given!r}" if given else "no model given and the default model"
        raise ModelError(f"{what} ({MODEL_PACKAGE}/{MODEL_NAMES[given or 'default']}) is not installed; shipped "
                         f"models installed: {names}; pass --model PATH (or set AGEGENDER_MODEL)")
    return found


@functools.lru_cache(maxsize=8)
def _cached_classifier(path: str, threads: int | None, mtime_ns: int, size: int) -> OnnxClassifier:
    return OnnxClassifier(path, threads=threads)


def load_classifier(path: str | os.PathLike, threads: int | None = None) -> OnnxClassifier:
    """The process-wide session for a model file (reloaded only if the file changed)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise ModelError(f"{p}: no such model file") from None
    return _cached_classifier(str(p.resolve()), threads or None, st.st_mtime_ns, st.st_size)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An array given to ``predict``: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> RGB."""
    if image.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")


class Predictor:
    """Faces with age group and gender from images.

    ``model``: an agegender ONNX file, or ``"default"``/``"fast"`` for a shipped one (default:
    ``AGEGENDER_MODEL`` or the shipped int8 model; a file that exists wins over a short name).
    ``detector``: auto | yunet | haar | none, or a detector object (see ``detect.create_detector``);
    ``auto`` may fetch YuNet once into the cache (short timeout), else falls back to Haar.
    ``min_face_size``: detected faces smaller than this (pixels, shorter side) are dropped.
    ``det_threshold``: the minimum YuNet score (``det_score``; see ``detect.YuNetDetector``).
    ``max_faces``: keep only the N largest faces (by box area); None keeps all.
    ``flip``: average each face with its mirror image (a little more accurate, about 1.8x the model time;
    the model card gives the measured effect).
    """

    def __init__(self, model: str | os.PathLike | None = None, detector: str | Detector = "auto",
                 threads: int | None = None, detector_model: str | os.PathLike | None = None,
                 min_face_size: int = DEFAULT_MIN_FACE_SIZE, det_threshold: float = DEFAULT_DET_THRESHOLD,
                 flip: bool = False, max_faces: int | None = None):
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"max_faces must be at least 1 (or None for all), got {max_faces}")
        self.model_path = resolve_model_path(model)
        self.classifier = load_classifier(self.model_path, threads)
        self.meta = self.classifier.meta
        if isinstance(detector, str):
            detector = create_detector(detector, detector_model, min_face_size=min_face_size,
                                       score_threshold=det_threshold, threads=threads)
        self.detector = detector
        self.min_face_size = int(min_face_size)
        self.flip = bool(flip)
        self.max_faces = max_faces

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Face boxes in an RGB image, clipped to it; small ones dropped (never for ``none``), then the
        ``max_faces`` largest kept."""
        h, w = image.shape[:2]
        dets = [dataclasses.replace(d, box=clip_box(d.box, w, h)) for d in self.detector.detect(image)]
        min_side = self.min_face_size if self.detector.name != "none" else 0
        sides = [min(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in dets]
        kept = [d for d, side in zip(dets, sides) if side > 0 and side >= min_side]
        if self.max_faces is not None:  # largest first (area, then score): the people a viewer sees first
            kept = sorted(kept, key=lambda d: (-(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]), -d.score))
            kept = kept[:self.max_faces]
        # left to right (left edge, then top): stable whatever the thread count
        return sorted(kept, key=lambda d: (round(d.box[0]), round(d.box[1])))

    def crops(self, image: np.ndarray, dets: list[Detection]) -> list[np.ndarray]:
        """The (S, S, 3) uint8 face each box gives, as the model sees it (``preprocess``)."""
        size, margin = self.meta.input_size, self.meta.crop_margin
        if self.detector.name == "none":  # the image is the face as framed: no margin to add
            return [prepare_precropped(image, size) for _ in dets]
        return [prepare_face(image, d.box, margin, size) for d in dets]

    def run_faces(self, crops: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The model's probabilities for face crops (of one or several images) in one onnxruntime call."""
        return self.classifier.run(to_input(crops), flip=self.flip)

    def faces(self, dets: list[Detection], out: dict[str, np.ndarray], start: int = 0) -> list[Face]:
        """``Face`` objects of ``dets`` from rows ``start``... of a ``run_faces`` result."""
        age, gender = out.get("age_probs"), out.get("gender_probs")
        faces = []
        for i, d in enumerate(dets, start):
            age_probs = age_label = gender_label = gender_score = None
            if age is not None:
                age_probs = {g: float(p) for g, p in zip(self.meta.age_groups, age[i])}
                age_label = self.meta.age_groups[int(np.argmax(age[i]))]
            if gender is not None:
                j = int(np.argmax(gender[i]))
                gender_label, gender_score = self.meta.genders[j], float(gender[i][j])
            box = tuple(int(round(v)) for v in d.box)
            faces.append(Face(box, float(d.score), age_label, age_probs, gender_label, gender_score))  # type: ignore[arg-type]
        return faces

    def classify(self, image: np.ndarray, dets: list[Detection]) -> list[Face]:
        """Classify the given boxes of an RGB image in one batch."""
        if not dets:
            return []
        return self.faces(dets, self.run_faces(self.crops(image, dets)))

    def predict(self, image_or_path: np.ndarray | str | os.PathLike) -> list[Face]:
        """Faces in an image file (any format OpenCV reads) or an RGB uint8 array."""
        if isinstance(image_or_path, np.ndarray):
            image = as_rgb(image_or_path)
        else:
            image = read_image(image_or_path)
        return self.classify(image, self.detect(image))
