"""`agegender-run` against hostile inputs and outputs: nothing of the user's is overwritten, nothing
hangs or grows without bound, and each problem is one line on stderr with the documented exit code
(0 ok, 1 an input failed, 2 usage/setup error, 130 interrupted, 143/129 SIGTERM/SIGHUP).

Runs that depend on the process (OpenCV's decode limit is read when cv2 loads, native decoder
messages, signals, /dev/stdout) are subprocesses; the rest use click's runner.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fakedata import make_video
from contract_model import build_contract_model

from agegender.runtime import fetch
from agegender.runtime.cli import cli
from agegender.runtime.fetch import DetectorError, fetch_yunet
from agegender.runtime.imageio import ImageError, read_image, read_input

HANG_GUARD_S = 120  # a subprocess still running after this is a hang, whatever the machine's load


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no user settings, no network


def _png(path: Path, h: int = 40, w: int = 60, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))
    return path


def invoke(model: Path, *args):
    res = CliRunner().invoke(cli, ["--model", str(model), *map(str, args)])
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    return res


def run_cli(model: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """agegender-run in a fresh process (what a user runs)."""
    cmd = [sys.executable, "-m", "agegender.runtime.cli", "--model", str(model), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env or dict(os.environ), **kw)


def one_error_line(stderr: str) -> str:
    """The only line on stderr: an input's error or a setup error (click's "Error: ")."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("agegender-run: error: ", "Error: ")), stderr
    return lines[0]


# --------------------------------------------------------------------------- outputs that are inputs (1, 2)
def test_save_annotated_into_the_input_folder_is_refused_and_photos_untouched(model, tmp_path):
    photos = tmp_path / "photos"
    a = _png(photos / "a.png")
    before = a.read_bytes()
    res = invoke(model, "--detector", "none", "--save-annotated", photos, photos)
    assert res.exit_code == 2 and "holds input images" in res.stderr
    assert a.read_bytes() == before and sorted(p.name for p in photos.iterdir()) == ["a.png"]
    res = invoke(model, "--detector", "none", "--save-annotated", tmp_path / "ann", photos)  # elsewhere: fine
    assert res.exit_code == 0 and (tmp_path / "ann" / "a.png").is_file()


def test_csv_target_that_is_an_input_or_not_a_csv_of_ours_is_refused(model, tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", value=30)
    before = a.read_bytes()
    res = invoke(model, "--detector", "none", "--csv", a, b)  # `--csv *.png`: the CSV name was forgotten
    assert res.exit_code == 2 and "not a CSV written by agegender-run" in res.stderr and a.read_bytes() == before
    res = invoke(model, "--detector", "none", "--csv", a, a, b)
    assert res.exit_code == 2 and "is one of the inputs" in res.stderr and a.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("name,phone\nann,123\n")
    assert invoke(model, "--detector", "none", "--csv", notes, b).exit_code == 2
    assert notes.read_text() == "name,phone\nann,123\n"
    ours, empty = tmp_path / "ours.csv", tmp_path / "empty.csv"
    empty.touch()
    for target in (ours, ours, empty):  # new, an earlier agegender-run CSV, an empty file: written
        assert invoke(model, "--detector", "none", "--csv", target, b).exit_code == 0
        assert target.read_text().startswith("path,frame,")


# --------------------------------------------------------------------------- how outputs are written (3, 14)
def test_csv_writes_through_dev_stdout_and_reports_a_full_disk(model, tmp_path):
    b = _png(tmp_path / "b.png")
    res = run_cli(model, "--detector", "none", "-q", "--csv", "/dev/stdout", b)
    assert res.returncode == 0 and "path,frame,width" in res.stdout and os.path.exists("/dev/stdout")
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    res = run_cli(model, "--detector", "none", "--csv", "/dev/full", b)
    assert res.returncode == 2 and "disk full" in one_error_line(res.stderr)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_csv_through_a_symlink_replaces_the_target_keeps_the_link_and_modes(model, tmp_path):
    b = _png(tmp_path / "b.png")
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.touch()
    os.chmod(target, 0o640)
    link.symlink_to(target)
    assert invoke(model, "--detector", "none", "--csv", link, b).exit_code == 0
    assert link.is_symlink() and target.read_text().startswith("path,")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file's mode, not 0600
    old = os.umask(0o022)
    try:
        assert invoke(model, "--detector", "none", "--csv", tmp_path / "new.csv", b).exit_code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o644  # what open() gives


def _many_inputs(folder: Path, n: int) -> Path:
    first = _png(folder / "img_0000.png")
    for i in range(1, n):
        os.link(first, folder / f"img_{i:04d}.png")
    return folder


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_mid_run_keeps_the_old_csv_and_leaves_no_temp_file(model, tmp_path, sig, code):
    photos = _many_inputs(tmp_path / "photos", 3000)
    out = tmp_path / "out" / "faces.csv"
    out.parent.mkdir()
    out.write_text("path,frame,width,height,face\nold,,,,\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out.parent / f".faces.csv.{int(dead.stdout)}-0badf00d.agegender-tmp.csv"  # left by a SIGKILLed run
    stale.write_text("half")
    cmd = [sys.executable, "-m", "agegender.runtime.cli", "--model", str(model), "--detector", "none", "--threads",
           "1", "--csv", str(out), str(photos)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_GUARD_S
    while not any(p.name.startswith(f".faces.csv.{proc.pid}-") for p in out.parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing its CSV"
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Aborted" not in err
    assert out.read_text() == "path,frame,width,height,face\nold,,,,\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["faces.csv"]  # ours and the stale one gone


# --------------------------------------------------------------------------- inputs that hang or never end (6)
def test_fifo_device_and_symlink_loop_inputs_are_one_line_each(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / "f.jpg")
    (d / "zero.jpg").symlink_to("/dev/zero")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    (d / "sub").symlink_to(d, target_is_directory=True)  # a directory loop for -r
    _png(d / "ok.png")
    res = run_cli(model, "--json", "--detector", "none", "-r", d)
    assert res.returncode == 1, res.stderr
    rows = {Path(r["path"]).name: r["error"] for r in map(json.loads, res.stdout.splitlines())}
    assert rows["ok.png"] is None
    assert "is a FIFO, not a regular file" in rows["f.jpg"] and "is a device" in rows["zero.jpg"]
    assert "symlink loop" in rows["loop.jpg"] and len(rows) == 4
    assert len(res.stderr.strip().splitlines()) == 3


def test_training_and_export_readers_refuse_devices_and_oversized_files(tmp_path):
    with pytest.raises(ImageError, match="is a device"):
        read_image("/dev/zero")  # export.parity.face_of and train's face cache read through read_image
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + bytes(100))
    with pytest.raises(ImageError, match="larger than"):
        read_input(big, max_bytes=64)


# --------------------------------------------------------------------------- pixel bound before decoding (8)
def _deflate_tiff(path: Path, w: int, h: int, rows: int) -> Path:
    """A grey 8-bit deflate TIFF claiming w x h pixels, with ``rows`` rows of (compressed) data."""
    co = zlib.compressobj(9)
    data = b"".join(co.compress(bytes(w)) for _ in range(rows)) + co.flush()
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0), (277, 3, 1), (278, 4, h),
            (279, 4, len(data))]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(struct.pack("<HHII", t, typ, 1, offset if t == 273 else v) if typ == 4 else
                   struct.pack("<HHIHH", t, typ, 1, v, 0) for t, typ, v in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + bytes(4) + data)
    return path


def test_a_huge_tiff_is_refused_from_its_header(model, tmp_path):
    tif = _deflate_tiff(tmp_path / "huge.tif", 20000, 20000, rows=4)
    small = _deflate_tiff(tmp_path / "small.tif", 60, 40, rows=40)
    res = run_cli(model, "--json", "--detector", "none", tif, small)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.returncode == 1 and "64,000,000-pixel limit (refused before decoding)" in rows[0]["error"]
    assert rows[1]["error"] is None and (rows[1]["width"], rows[1]["height"]) == (60, 40)
    one_error_line(res.stderr)


@pytest.mark.slow
def test_a_huge_valid_deflate_tiff_costs_no_decode_memory(model, tmp_path):
    tif = _deflate_tiff(tmp_path / "huge.tif", 20000, 20000, rows=20000)  # ~0.4 MB on disk, 400 MB of pixels
    code = ("import resource, sys\nfrom agegender.runtime.cli import main\nsys.argv[0] = 'agegender-run'\n"
            "try:\n    main()\nfinally:\n"
            "    print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code, "--model", str(model), "--detector", "none", str(tif)],
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 1 and "pixel limit" in res.stderr
    rss_mb = int(res.stderr.split("maxrss_kb")[-1]) / 1024
    assert rss_mb < 400, f"peak RSS {rss_mb:.0f} MB: the image was decoded"  # decoding alone takes 400+ MB


# --------------------------------------------------------------------------- names, chatter, videos (9, 18, 20)
def test_undecodable_file_name_in_csv_and_json(model, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    raw = os.path.join(os.fsencode(d), b"\xff\xfe.png")
    cv2.imwrite(str(d / "tmp.png"), np.full((30, 30, 3), 90, np.uint8))
    os.rename(d / "tmp.png", raw)
    out = tmp_path / "out.csv"
    res = run_cli(model, "--json", "--detector", "none", "--csv", out, d)
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert os.fsencode(row["path"]) == raw and row["error"] is None
    assert "\\xff\\xfe.png" in out.read_text(encoding="utf-8")


def _truncated_inputs(d: Path) -> list[str]:
    d.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    names = []
    for ext in (".png", ".tif", ".gif", ".pgm"):
        data = cv2.imencode(ext, img[:, :, 0] if ext == ".pgm" else img)[1].tobytes()
        (d / f"cut{ext}").write_bytes(data[: len(data) // 2])
        names.append(f"cut{ext}")
    png = bytearray(cv2.imencode(".png", img)[1].tobytes())
    png[29] ^= 0xFF  # IHDR CRC: libpng prints its own "libpng error" straight to stderr
    (d / "crc.png").write_bytes(bytes(png))
    (d / "nan.tif").write_bytes(cv2.imencode(".tiff", np.full((32, 32), np.nan, np.float32))[1].tobytes())
    return names + ["crc.png", "nan.tif"]


def test_decoder_chatter_never_reaches_stderr(model, tmp_path):
    names = _truncated_inputs(tmp_path / "in")
    for quiet in ([], ["-q"]):
        res = run_cli(model, "--detector", "none", *quiet, tmp_path / "in")
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == len(names) and all(line.startswith("agegender-run: error: ") for line in lines), lines


def test_truncated_video_warns(model, tmp_path):
    path = make_video(tmp_path / "clip.avi", 30, step=8)
    data = path.read_bytes()
    (tmp_path / "half.avi").write_bytes(data[: len(data) // 2])
    res = run_cli(model, "--detector", "none", "--json", path)
    assert res.returncode == 0 and res.stderr == "" and len(res.stdout.splitlines()) == 30
    res = run_cli(model, "--detector", "none", "--json", tmp_path / "half.avi")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 0 and len(lines) == 1 and "of the 30 frames its container lists" in lines[0], lines


# --------------------------------------------------------------------------- start-up validation (11, 12, 16)
def _variant(model: Path, path: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(model))
    edit(m)
    onnx.save(m, str(path))
    return path


def _input_as(elem_type: int):
    def edit(m) -> None:
        from onnx import helper

        m.graph.input[0].type.tensor_type.elem_type = elem_type
        m.graph.input[0].name = "image"
        for node in m.graph.node:
            node.input[:] = ["image_f" if i == "image" else i for i in node.input]
        m.graph.node.insert(0, helper.make_node("Cast", ["image"], ["image_f"], to=1))
    return edit


def _age_probs_3d(m) -> None:
    from onnx import helper, numpy_helper

    for node in m.graph.node:
        node.output[:] = ["age_2d" if o == "age_probs" else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    m.graph.node.append(helper.make_node("Unsqueeze", ["age_2d", "axis1"], ["age_probs"]))
    out = next(o for o in m.graph.output if o.name == "age_probs")
    out.type.tensor_type.shape.dim.insert(1, out.type.tensor_type.shape.dim[0].__class__(dim_value=1))


def test_unusable_models_detectors_and_options_are_one_setup_error(model, tmp_path):
    from onnx import TensorProto

    a = _png(tmp_path / "a.png")
    cases = {
        "nested too deeply": build_contract_model(tmp_path / "deep.onnx",
                                                  metadata={"age_groups": "[" * 30000 + "]" * 30000}),
        "200,000 characters": build_contract_model(tmp_path / "long.onnx",
                                                   metadata={"metrics": "[" * 100000 + "]" * 100000}),
        "uint8": _variant(model, tmp_path / "u8.onnx", _input_as(TensorProto.UINT8)),
        "tensor(double)": _variant(model, tmp_path / "f64.onnx", _input_as(TensorProto.DOUBLE)),
        "age_probs is tensor(float) [": _variant(model, tmp_path / "3d.onnx", _age_probs_3d),
    }
    for fragment, bad in cases.items():
        res = invoke(bad, "--detector", "none", a)
        assert res.exit_code == 2 and fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = invoke(model, "--detector", "yunet", "--detector-model", model, a)  # our classifier is not YuNet
    assert res.exit_code == 2 and str(model) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "not a YuNet model" in res.stderr and "age_probs" in res.stderr  # says what the file is instead
    for value in ("nan", "inf", "-nan"):
        res = invoke(model, "--detector", "none", "--det-threshold", value, a)
        assert res.exit_code == 2 and "det-threshold" in res.stderr


def test_threads_above_the_core_count_are_capped_with_a_warning(model, tmp_path):
    a = _png(tmp_path / "a.png")
    res = invoke(model, "--detector", "none", "--threads", 1000, a)
    cores = len(os.sched_getaffinity(0))
    assert res.exit_code == 0 and f"--threads 1000 is more than the {cores} core(s) available" in res.stderr


def test_non_finite_outputs_never_reach_the_json(model, tmp_path, monkeypatch):
    from agegender.runtime import model as model_mod

    real = model_mod.OnnxClassifier.run

    def broken(self, batch, flip=False):
        out = real(self, batch, flip)
        return {k: np.full_like(v, np.nan) for k, v in out.items()}

    monkeypatch.setattr(model_mod.OnnxClassifier, "run", broken)
    res = invoke(model, "--detector", "none", "--json", _png(tmp_path / "a.png"))
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]  # strict JSON: json.loads accepts NaN, so
    assert "NaN" not in res.stdout and res.exit_code == 1 and row["error"] and row["faces"] == []  # check text too


# --------------------------------------------------------------------------- the detector fetch (7, 19)
@pytest.fixture
def hostile_server():
    """127.0.0.1 server: /slow trickles a byte every 0.3 s, /endless never ends its body."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"x" if self.path == "/slow" else bytes(65536))
                    self.wfile.flush()
                    if self.path == "/slow":
                        time.sleep(0.3)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_is_bounded_in_time_and_size(hostile_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", f"{hostile_server}/slow")
    start = time.monotonic()
    with pytest.raises(DetectorError, match="not complete within 1 s"):
        fetch_yunet(timeout=1.0)
    assert time.monotonic() - start < 30  # hang guard: each read arrives within the socket timeout
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", f"{hostile_server}/endless")
    with pytest.raises(DetectorError, match=f"more than the expected {fetch.KNOWN_SIZES[fetch.YUNET_SHA256]:,} bytes"):
        fetch_yunet(timeout=30.0)
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_fetch_from_an_unsupported_scheme_says_so(monkeypatch, tmp_path):
    local = tmp_path / "yunet.onnx"
    local.write_bytes(b"x")
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", local.as_uri())
    with pytest.raises(DetectorError, match="unsupported URL scheme 'file'"):
        fetch_yunet()
