"""Issue 14's detector behaviour: a group photo at default settings, --max-faces, a scale-invariant
det_score, and a YuNet that cannot run is an error, never zero faces."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from contract_model import build_contract_model, iou

from agegender.runtime import Predictor
from agegender.runtime.cli import cli
from agegender.runtime.datasets import is_holdout, parse_utkface_name
from agegender.runtime.detect import DetectorError, Passes, YuNetDetector, brightened, create_detector
from agegender.runtime.yunet import CvYuNet, OrtYuNet

SIDES = (150, 60, 120, 75, 95, 135, 85)  # seven faces, 60-150 px


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no user settings, no network


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_contract_model(tmp_path_factory.mktemp("m") / "contract.onnx", input_size=32, crop_margin=0.1)


@pytest.fixture(scope="module")
def group_photo(utkface_dir):
    """A 1280x853 RGB scene: seven held-out UTKFace faces (60-150 px) on a textured gradient, and their boxes."""
    names = sorted(p for p in utkface_dir.iterdir() if parse_utkface_name(p.name) and is_holdout(p.name, 0.1))
    if len(names) < 30:
        pytest.skip("too few held-out UTKFace faces")
    rng = np.random.default_rng(3)
    ramp = np.linspace(60, 200, 1280, dtype=np.float32)[None, :, None]
    img = np.clip(np.broadcast_to(ramp, (853, 1280, 3)) + rng.normal(0, 8, (853, 1280, 3)), 0, 255).astype(np.uint8)
    boxes = []
    for i, side in enumerate(SIDES):
        x, y = 40 + i * 175, 120 + (i % 3) * 220
        chip = cv2.cvtColor(cv2.imread(str(names[i * 4])), cv2.COLOR_BGR2RGB)
        img[y:y + side, x:x + side] = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
        boxes.append((x, y, x + side, y + side))
    return img, boxes


def _matched(dets, boxes) -> list:
    """The detection of each box (IoU >= 0.4), or None."""
    return [max(dets, key=lambda d: iou(d.box, b), default=None) if any(iou(d.box, b) >= 0.4 for d in dets)
            else None for b in boxes]


def test_group_photo_every_face_found_at_default_settings(group_photo, yunet_model, model):
    img, boxes = group_photo
    faces = Predictor(model, detector="yunet", detector_model=yunet_model).predict(img)
    assert len(faces) == len(boxes)
    assert all(m is not None for m in _matched(faces, boxes))
    assert [f.box[0] for f in faces] == sorted(f.box[0] for f in faces)  # still listed left to right


def test_max_faces_keeps_the_largest(group_photo, yunet_model, model, tmp_path):
    img, boxes = group_photo
    path = tmp_path / "group.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    res = CliRunner().invoke(cli, [str(path), "--json", "--model", str(model), "--detector", "yunet",
                                   "--detector-model", str(yunet_model), "--max-faces", "3"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["faces"]
    largest = sorted(boxes, key=lambda b: b[2] - b[0])[-3:]
    assert len(got) == 3 and all(any(iou(f["box"], b) >= 0.4 for f in got) for b in largest)
    assert CliRunner().invoke(cli, [str(path), "--max-faces", "0"]).exit_code == 2
    with pytest.raises(ValueError, match="max_faces"):
        Predictor(model, detector="none", max_faces=0)


@pytest.mark.parametrize("long_side", [896, 2048])
def test_det_score_does_not_depend_on_the_photo_resolution(group_photo, yunet_model, long_side):
    img, boxes = group_photo
    det = create_detector("yunet", yunet_model, score_threshold=0.5)
    scale = long_side / img.shape[1]
    resized = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    ref, other = _matched(det.detect(img), boxes), _matched(det.detect(resized), [np.multiply(b, scale) for b in boxes])
    pairs = [(a.score, b.score) for a, b in zip(ref, other) if a is not None and b is not None]
    assert len(pairs) == len(boxes)
    assert max(abs(a - b) for a, b in pairs) < 0.03


def test_passes_bound_the_input_size():
    p = Passes(640, 0.25, 1024, 320)
    assert p.sides(300) == [300]
    assert p.sides(1280) == [640, 320]
    assert Passes().sides(640) == [640, 320] and Passes().sides(1280) == [896, 320]  # the defaults
    assert Passes().sides(4000) == [1280, 320]
    assert p.sides(4000) == [1000, 320]
    assert p.sides(20_000) == [1024, 320]  # memory bounded on huge photos


class _BrokenNet:
    """A cv2.FaceDetectorYN stand-in that fails on inputs wider than ``limit``."""

    backend = "fake"

    def __init__(self, limit: int):
        self.limit = limit

    def detect(self, bgr):
        if bgr.shape[1] > self.limit:
            raise cv2.error("OpenCV(4.x) dnn: cannot allocate the blob for this input")
        return None


def test_yunet_that_cannot_run_at_a_size_is_an_error(yunet_model, monkeypatch, model, tmp_path):
    det = YuNetDetector(yunet_model)
    det._net = _BrokenNet(limit=500)
    with pytest.raises(DetectorError, match="cannot run on a 896x"):
        det.detect(np.zeros((480, 1280, 3), np.uint8))

    def fails(self, bgr):  # either backend, with its own kind of error
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code")

    monkeypatch.setattr(OrtYuNet, "detect", fails)
    monkeypatch.setattr(CvYuNet, "detect", fails)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((64, 64, 3), np.uint8))
    res = CliRunner().invoke(cli, [str(path), "--model", str(model), "--detector", "yunet",
                                   "--detector-model", str(yunet_model)])
    assert res.exit_code == 2 and "cannot run on a 320x240 input" in res.stderr and "Traceback" not in res.output


def test_a_dark_photo_is_brightened_before_detection(group_photo, yunet_model):
    img, boxes = group_photo
    assert brightened(img) is img  # a normally exposed photo is left as it is
    dark = np.clip(cv2.convertScaleAbs(img, alpha=0.08) + np.random.default_rng(0).normal(0, 4, img.shape),
                   0, 255).astype(np.uint8)  # a night shot: sensor noise, the brightest pixels at ~20
    lifted = brightened(dark)
    assert lifted is not dark and np.percentile(lifted, 99.5) > 4 * np.percentile(dark, 99.5)  # gain capped at 6
    found = _matched(YuNetDetector(yunet_model).detect(dark), boxes)
    plain = _matched(YuNetDetector(yunet_model, brighten=False).detect(dark), boxes)
    assert all(m is not None for m in found)
    assert sum(m is not None for m in plain) < len(boxes)  # without it, faces of this dark photo are lost


@pytest.fixture(scope="module")
def small_faces_photo(utkface_dir):
    """A 1920x1080 scene of twelve held-out faces of 44-72 px: the main pass shrinks them to ~20-34 px,
    where YuNet scores several of them under the threshold."""
    names = sorted(p for p in utkface_dir.iterdir() if parse_utkface_name(p.name) and is_holdout(p.name, 0.1))
    if len(names) < 90:
        pytest.skip("too few held-out UTKFace faces")
    rng = np.random.default_rng(5)
    ramp = np.linspace(50, 190, 1920, dtype=np.float32)[None, :, None]
    img = np.clip(np.broadcast_to(ramp, (1080, 1920, 3)) + rng.normal(0, 10, (1080, 1920, 3)), 0, 255).astype(np.uint8)
    background = img.copy()
    boxes = []
    for i, side in enumerate((44, 48, 52, 56, 60, 64, 68, 72, 46, 50, 54, 58)):
        x, y = 60 + (i % 6) * 300, 200 + (i // 6) * 450
        chip = cv2.cvtColor(cv2.imread(str(names[i * 7 + 1])), cv2.COLOR_BGR2RGB)
        img[y:y + side, x:x + side] = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA)
        boxes.append((x, y, x + side, y + side))
    return img, boxes, background


def test_second_look_finds_small_faces_the_main_pass_scored_under_the_threshold(small_faces_photo, yunet_model):
    img, boxes, background = small_faces_photo
    with_look = YuNetDetector(yunet_model, threads=1).detect(img)  # the default: second look on
    without = YuNetDetector(yunet_model, threads=1, second_look=None).detect(img)
    assert all(m is not None for m in _matched(with_look, boxes))  # every face
    assert sum(m is not None for m in _matched(without, boxes)) < len(boxes)  # the case the second look is for
    assert len(with_look) == len(boxes)  # and nothing else
    for d in with_look:
        assert d.score >= 0.7 and d.landmarks is not None
        x1, y1, x2, y2 = d.box
        assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in d.landmarks[:2])  # eyes inside the box
    # a face-free photo stays face-free, and a threshold of 0.4 or less turns the second look off
    assert YuNetDetector(yunet_model, threads=1).detect(background) == []
    assert YuNetDetector(yunet_model, threads=1, score_threshold=0.4).second_look is None
