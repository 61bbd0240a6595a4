"""Detectors (yunet, haar, none, auto) and the sha256-verified YuNet fetch, served from 127.0.0.1."""

from __future__ import annotations

import http.server
import logging
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pooch
import pytest
from click.testing import CliRunner
from contract_model import FACE_NAME, face_on_canvas, iou, isolate_runtime_env

from agegender.runtime import fetch
from agegender.runtime.cli import cli
from agegender.runtime.detect import create_detector
from agegender.runtime.fetch import DetectorError, fetch_yunet

SHARED_YUNET_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    isolate_runtime_env(monkeypatch, tmp_path / "cache")


@pytest.fixture(scope="module")
def face_file(utkface_dir) -> Path:
    p = utkface_dir / FACE_NAME
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``.root`` (holding ``fake.onnx``); ``.hits`` counts GETs."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "fake.onnx").write_bytes(b"not the detector you are looking for\n" * 100)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.root, httpd.hits = root, hits
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/fake.onnx"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def yunet_server(server, yunet_model, monkeypatch):
    """The server, with the ../shared YuNet as the detector URL and its sha256 as the expected one."""
    shutil.copy(yunet_model, server.root / yunet_model.name)
    server.url = server.url.replace("fake.onnx", yunet_model.name)
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", server.url)
    monkeypatch.setenv("AGEGENDER_DETECTOR_SHA256", SHARED_YUNET_SHA256)
    return server


def _rgb(bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- detectors
def test_yunet_finds_a_face_in_a_large_photo_and_scales_the_box_back(yunet_model, face_file):
    box = (600, 300, 1100, 800)  # a 500-px face: found only on the downscaled copy
    img = _rgb(face_on_canvas(face_file, (1600, 1200), box))
    dets = create_detector("yunet", yunet_model).detect(img)
    assert len(dets) == 1 and dets[0].score >= 0.9
    assert iou(dets[0].box, box) > 0.6


def test_yunet_finds_a_face_that_fills_the_image(yunet_model, face_file):
    img = _rgb(cv2.resize(cv2.imread(str(face_file)), (640, 640)))
    dets = create_detector("yunet", yunet_model).detect(img)
    assert len(dets) == 1 and iou(dets[0].box, (0, 0, 640, 640)) > 0.6


@pytest.mark.parametrize("detector", ["yunet", "haar"])
@pytest.mark.parametrize("shape", [(3, 3, 3), (1, 1, 3), (0, 10, 3), (10, 0, 3), (480, 640, 3)])
def test_no_face_and_no_crash_on_tiny_or_blank_images(detector, shape, request):
    model = request.getfixturevalue("yunet_model") if detector == "yunet" else None
    assert create_detector(detector, model).detect(np.full(shape, 90, np.uint8)) == []


def test_haar_finds_the_face(face_file):
    box = (220, 140, 420, 340)
    dets = create_detector("haar").detect(_rgb(face_on_canvas(face_file, (640, 480), box)))
    assert len(dets) == 1 and iou(dets[0].box, box) > 0.6


def test_none_is_the_whole_image():
    dets = create_detector("none").detect(np.zeros((30, 50, 3), np.uint8))
    assert [(d.box, d.score) for d in dets] == [((0.0, 0.0, 50.0, 30.0), 1.0)]


def test_detector_model_from_option_or_env(yunet_model, monkeypatch, tmp_path):
    assert create_detector("auto", yunet_model).name == "yunet"
    monkeypatch.setenv("AGEGENDER_DETECTOR_MODEL", str(yunet_model))
    assert create_detector("auto").name == "yunet"
    with pytest.raises(DetectorError, match="no such YuNet model file"):
        create_detector("yunet", tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(DetectorError, match="not a loadable YuNet model"):
        create_detector("yunet", bad)
    with pytest.raises(DetectorError, match="unknown detector"):
        create_detector("retina")


# --------------------------------------------------------------------------- fetch
def test_good_download_is_cached_verified_and_used(yunet_server, tmp_path):
    server = yunet_server
    path = fetch_yunet()
    assert path.parent == tmp_path / "cache" and pooch.file_hash(str(path)) == SHARED_YUNET_SHA256
    assert len(server.hits) == 1
    det = create_detector("auto")
    assert det.name == "yunet" and det.model_path == path
    assert fetch_yunet() == path and len(server.hits) == 1  # cached: no second download


def test_wrong_checksum_is_rejected_and_not_cached(server, monkeypatch, tmp_path):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", server.url)  # expected: the default YuNet file's sha256
    with pytest.raises(DetectorError, match="rejected: its sha256 differs"):
        fetch_yunet()
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(DetectorError, match="rejected"):
        create_detector("yunet")
    assert not cache.exists() or list(cache.iterdir()) == []


def test_auto_falls_back_to_haar_when_offline_and_says_how_to_get_yunet(caplog):
    with caplog.at_level(logging.WARNING, logger="agegender"):
        det = create_detector("auto")
    assert det.name == "haar"
    assert "--fetch-detector" in caplog.text and "AGEGENDER_DETECTOR_MODEL" in caplog.text
    with pytest.raises(DetectorError, match="cannot download YuNet"):
        create_detector("yunet")


def test_auto_with_a_bad_checksum_falls_back_and_caches_nothing(server, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", server.url)
    with caplog.at_level(logging.WARNING, logger="agegender"):
        assert create_detector("auto").name == "haar"
    assert "sha256 differs" in caplog.text
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_tampered_cached_file_is_not_used(yunet_server):
    server = yunet_server
    cached = fetch.cached_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"tampered")
    assert fetch.verified_cached_yunet() is None
    assert create_detector("auto").name == "yunet"  # fetched again, verified
    assert pooch.file_hash(str(cached)) == SHARED_YUNET_SHA256 and len(server.hits) == 1


def test_cli_fetch_detector_then_offline_use(yunet_server, tmp_path):
    server = yunet_server
    res = CliRunner().invoke(cli, ["--fetch-detector"])
    assert res.exit_code == 0, res.output
    assert "sha256 verified" in res.stdout and str(tmp_path / "cache") in res.stdout
    server.shutdown()  # offline from now on: the cached copy must be enough
    assert create_detector("auto").name == "yunet"


def test_cli_fetch_detector_with_bad_checksum_fails(server, monkeypatch, tmp_path):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", server.url)
    res = CliRunner().invoke(cli, ["--fetch-detector"])
    assert res.exit_code == 2
    assert "sha256 differs" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_missing_file_on_the_server_is_a_one_line_error(server, monkeypatch):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", server.url.replace("fake.onnx", "absent.onnx"))
    with pytest.raises(DetectorError, match="HTTP 404"):
        fetch_yunet()
