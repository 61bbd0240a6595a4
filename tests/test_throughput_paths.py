"""The streamed, batched path of ``agegender-run`` (runtime/pipeline.py) answers exactly as the
one-image-at-a-time path, in input order, with a bounded read-ahead; a detector that breaks
mid-run is a setup error."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from agegender.runtime import pipeline as pipeline_mod
from agegender.runtime import predictor as predictor_mod
from agegender.runtime.cli import RunConfig, cli, run
from agegender.runtime.detect import Detection, DetectorError
from agegender.runtime.predictor import Predictor


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no user settings, no network


class GridDetector:
    """A deterministic stand-in for YuNet: 0-3 boxes per image, from its size and pixels."""

    name = "grid"

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        n = int(image[0, 0, 0]) % 4
        return [Detection((i * w / 4, h / 8, i * w / 4 + w / 3, h / 8 + h / 2), 0.5 + i / 10) for i in range(n)]


def images(folder: Path, n: int = 23) -> list[str]:
    """Generated images of varied sizes and content (JPEG, PNG, grey), one unreadable file."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 160)), int(rng.integers(20, 160))
        img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        img[0, 0] = i  # GridDetector: i % 4 faces
        path = folder / f"{i:03d}.{('jpg', 'png', 'bmp')[i % 3]}"
        cv2.imwrite(str(path), img if i % 5 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        paths.append(str(path))
    bad = folder / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths.insert(7, str(bad))
    return paths


def run_json(model: Path, files: list[str], detector, **cfg) -> tuple[int, str]:
    out = io.StringIO()
    status = run(RunConfig(tuple(files), json=True, **cfg), Predictor(model, detector=detector), files, out)
    return status, out.getvalue()


@pytest.mark.parametrize("detector", ["none", "grid"])
@pytest.mark.parametrize("batch_size,readers", [(4, 2), (16, 1), (64, 3), (16, 0)])
def test_batched_json_is_identical_to_one_at_a_time(model, tmp_path, detector, batch_size, readers):
    files = images(tmp_path / "in")
    det = GridDetector() if detector == "grid" else "none"
    want = run_json(model, files, det, batch_size=1, readers=0)
    got = run_json(model, files, det, batch_size=batch_size, readers=readers)
    assert want[0] == 1 and '"error": null' in want[1] and "not a readable image" in want[1]
    assert got == want


def test_order_is_kept_when_reads_finish_out_of_order(model, tmp_path, monkeypatch):
    files = images(tmp_path / "in", 12)
    real = pipeline_mod.read_image

    def slow_first(path, *a, **kw):  # the earlier the input, the later its read finishes
        time.sleep(0.002 * (len(files) - files.index(str(path))))
        return real(path, *a, **kw)

    want = run_json(model, files, "none", batch_size=1, readers=0)
    monkeypatch.setattr(pipeline_mod, "read_image", slow_first)
    assert run_json(model, files, "none", batch_size=5, readers=4) == want


def test_read_ahead_is_bounded(model, tmp_path, monkeypatch):
    files = images(tmp_path / "in", 10) * 20  # 220 inputs
    real, started, lock = pipeline_mod.read_image, [0], threading.Lock()

    def counting(path, *a, **kw):
        with lock:
            started[0] += 1
        return real(path, *a, **kw)

    monkeypatch.setattr(pipeline_mod, "read_image", counting)
    pred = Predictor(model, detector="none")
    most = 0
    for done, _ in enumerate(pipeline_mod.results(pred, files, batch_size=8, readers=3), 1):
        time.sleep(0.0005)  # a slow consumer: readers would run ahead if nothing held them
        most = max(most, started[0] - done)
    assert started[0] == len(files) and most <= 8 + 3 + 8  # window (batch + readers) + one batch


def test_videos_between_images_keep_their_place(model, tmp_path):
    files = images(tmp_path / "in", 6)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for k in range(4):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    files.insert(3, str(clip))
    want = run_json(model, files, "none", batch_size=1, readers=0)
    assert want[1].count('"frame"') == 4
    assert run_json(model, files, "none", batch_size=16, readers=2) == want


class BreaksOnWideImages:
    """A detector that passes the start-up probe, then fails on images wider than 100 px."""

    name = "yunet"

    def detect(self, image: np.ndarray) -> list[Detection]:
        if image.shape[1] > 100:
            raise DetectorError("model.onnx: YuNet cannot run on a 640x480 input (test)")
        return [Detection((0, 0, image.shape[1], image.shape[0]), 0.9)]


def test_detector_failure_mid_run_is_a_setup_error(model, tmp_path, monkeypatch):
    small, wide = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(small), np.full((40, 60, 3), 90, np.uint8))
    cv2.imwrite(str(wide), np.full((40, 200, 3), 90, np.uint8))
    monkeypatch.setattr(predictor_mod, "create_detector", lambda *a, **kw: BreaksOnWideImages())
    csv_out = tmp_path / "out.csv"
    res = CliRunner().invoke(cli, ["--model", str(model), "--json", "--csv", str(csv_out), str(small), str(wide)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == ["Error: model.onnx: YuNet cannot run on a 640x480 input (test)"]
    assert "Traceback" not in res.output and not csv_out.exists()
