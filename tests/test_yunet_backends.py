"""YuNet's two backends give the same faces: onnxruntime (free height/width) and cv2.FaceDetectorYN."""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pooch
import pytest
from contract_model import isolate_runtime_env

from agegender.runtime import detect, fetch
from agegender.runtime.detect import YuNetDetector, create_detector
from agegender.runtime.yunet import CvYuNet, OrtYuNet


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    isolate_runtime_env(monkeypatch, tmp_path / "cache")


@pytest.fixture(scope="module")
def static_yunet(yunet_model, tmp_path_factory):
    """The same network with a fixed 640x640 input, like opencv_zoo's 2023mar export."""
    onnx = pytest.importorskip("onnx")
    m = onnx.load(str(yunet_model))
    for dim, value in zip(m.graph.input[0].type.tensor_type.shape.dim[2:], (640, 640)):
        dim.Clear()
        dim.dim_value = value
    path = tmp_path_factory.mktemp("static") / "yunet_static.onnx"
    onnx.save(m, str(path))
    return path


def _scene(utkface_dir, size=(1000, 700), n=5, seed=0) -> np.ndarray:
    """A BGR scene with ``n`` UTKFace faces of 40-300 px on a noisy background, odd sizes included."""
    files = sorted(utkface_dir.glob("*.jpg"))[:200]
    if len(files) < n:
        pytest.skip("UTKFace faces are absent")
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    for k in range(n):
        side = int(rng.integers(40, min(300, min(w, h) // 2)))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        img[y:y + side, x:x + side] = cv2.resize(cv2.imread(str(files[k * 17])), (side, side))
    return img


@pytest.mark.parametrize("size", [(1000, 700), (333, 250), (640, 480)])
def test_onnxruntime_and_opencv_backends_find_the_same_faces(yunet_model, utkface_dir, size):
    ort_net = YuNetDetector(yunet_model, score_threshold=0.5)
    assert ort_net.backend == "onnxruntime"
    cv_net = CvYuNet(yunet_model, 0.5, detect.NMS_THRESHOLD)
    bgr = _scene(utkface_dir, size)
    a, b = ort_net._net.detect(bgr), cv_net.detect(bgr)
    assert a is not None and b is not None and len(a) == len(b) >= 1
    np.testing.assert_allclose(a[:, :14], b[:, :14], atol=0.05)  # pixels
    np.testing.assert_allclose(a[:, 14], b[:, 14], atol=1e-3)  # scores


def test_a_fixed_size_export_runs_through_opencv_with_the_same_faces(yunet_model, static_yunet, utkface_dir):
    img = cv2.cvtColor(_scene(utkface_dir, (1280, 886), n=6, seed=3), cv2.COLOR_BGR2RGB)
    fixed, free = YuNetDetector(static_yunet), YuNetDetector(yunet_model)
    assert fixed.backend == "opencv" and free.backend == "onnxruntime"
    got, want = fixed.detect(img), free.detect(img)
    assert len(got) == len(want) >= 3
    for g, w in zip(got, want):
        assert np.allclose(g.box, w.box, atol=0.05) and abs(g.score - w.score) < 1e-3


def test_opencv_backend_keeps_one_net_per_recent_size(yunet_model, monkeypatch):
    created = []
    real_create = cv2.FaceDetectorYN.create

    def counting_create(*args):
        created.append(args[2])
        return real_create(*args)

    monkeypatch.setattr(cv2.FaceDetectorYN, "create", counting_create)
    net = CvYuNet(yunet_model, 0.7, 0.3)
    sizes = [(640, 480), (320, 240)] * 3  # a photo's two passes, three photos of one size
    for w, h in sizes:
        assert net.detect(np.zeros((h, w, 3), np.uint8)) is None
    assert created == [(320, 320), (640, 480), (320, 240)]  # one net per size, then reused
    kept = net._nets[(640, 480)]
    for w in (500, 400, 300, 200):  # more sizes than KEEP: the least recently used one is re-sized
        net.detect(np.zeros((w * 3 // 4, w, 3), np.uint8))
    assert len(net._nets) == CvYuNet.KEEP and len(created) == 4 and (640, 480) not in net._nets
    assert any(n is kept for n in net._nets.values())  # re-used in place, not re-created


def _cache_with_legacy(yunet_model, tmp_path, monkeypatch) -> Path:
    """A cache holding an "earlier default" file (the test model under the 2023mar name)."""
    legacy_name = "face_detection_yunet_2023mar.onnx"
    monkeypatch.setattr(fetch, "LEGACY_YUNET", (legacy_name, pooch.file_hash(str(yunet_model))))
    cache = tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / legacy_name).write_bytes(yunet_model.read_bytes())
    return cache / legacy_name


def test_a_previously_fetched_yunet_in_the_cache_is_still_used_offline(yunet_model, tmp_path, monkeypatch):
    """Devices that fetched the earlier default file keep using it, without any network access."""
    legacy = _cache_with_legacy(yunet_model, tmp_path, monkeypatch)
    monkeypatch.delenv("AGEGENDER_DETECTOR_URL")  # the default source (unreachable here)
    assert not fetch.cached_path().exists()
    det = create_detector("auto")
    assert det.name == "yunet" and det.model_path == legacy
    assert create_detector("yunet").model_path == legacy
    monkeypatch.setenv("AGEGENDER_DETECTOR_SHA256", "0" * 64)  # another file asked for by sha256
    assert fetch.verified_cached_yunet() is None
    monkeypatch.delenv("AGEGENDER_DETECTOR_SHA256")
    legacy.write_bytes(b"tampered")
    assert fetch.verified_cached_yunet() is None


def test_a_mirror_of_the_earlier_file_is_checked_against_its_own_sha256(monkeypatch):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", "http://mirror.local/face_detection_yunet_2023mar.onnx")
    assert fetch.detector_sha256() == fetch.LEGACY_YUNET[1]
    assert fetch.KNOWN_SIZES[fetch.detector_sha256()] == 232_589
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", "http://mirror.local/face_detection_yunet_2026may.onnx")
    assert fetch.detector_sha256() == fetch.YUNET_SHA256


def test_fetch_detector_upgrades_a_legacy_cache_and_keeps_it_when_offline(yunet_model, tmp_path, monkeypatch,
                                                                         caplog):
    legacy = _cache_with_legacy(yunet_model, tmp_path, monkeypatch)
    www = tmp_path / "www"
    www.mkdir()
    (www / "face_detection_yunet_2026may.onnx").write_bytes(yunet_model.read_bytes())
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/face_detection_yunet_2026may.onnx"
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", url)
    monkeypatch.setattr(fetch, "YUNET_SHA256", pooch.file_hash(str(yunet_model)))
    try:
        assert fetch.fetch_yunet() == legacy  # plain use: the cached file, no download
        assert fetch.fetch_yunet(upgrade=True) == tmp_path / "cache" / "face_detection_yunet_2026may.onnx"
    finally:
        httpd.shutdown()
        httpd.server_close()
    (tmp_path / "cache" / "face_detection_yunet_2026may.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="agegender"):
        assert fetch.fetch_yunet(upgrade=True, timeout=5) == legacy  # server gone: the cached file still works
    assert "using the cached face_detection_yunet_2023mar.onnx" in caplog.text


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_threads_reach_the_onnxruntime_session(yunet_model):
    det = create_detector("yunet", yunet_model, threads=1)
    assert isinstance(det._net, OrtYuNet)
    assert det._net.session.get_session_options().intra_op_num_threads == 1
