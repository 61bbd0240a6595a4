"""`agegender-run`: inputs, output modes, exit codes, and bad inputs that each give one error line
while the run goes on (hostile inputs and outputs: test_hostile_inputs.py)."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fakedata import make_video
from contract_model import FACE_NAME, build_contract_model, face_on_canvas

from agegender.runtime import AGE_GROUPS, GENDERS
from agegender.runtime import pipeline as pipeline_mod
from agegender.runtime.cli import CSV_COLUMNS, cli

FACE_KEYS = ["box", "det_score", "age", "age_probs", "gender", "gender_score"]


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no user settings, no network


def _write(path: Path, img: np.ndarray, *params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _img(h=40, w=60, value=100) -> np.ndarray:
    img = np.full((h, w, 3), value, np.uint8)
    img[: h // 2] = 255 - value
    return img


def invoke(model, *args, input=None):
    res = CliRunner().invoke(cli, ["--model", str(model), *map(str, args)], input=input)
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res


def jsonl(res) -> list[dict]:
    return [json.loads(line) for line in res.stdout.splitlines()]


# --------------------------------------------------------------------------- output modes
def test_json_lines_follow_the_design(model, tmp_path):
    a, b = _write(tmp_path / "a.png", _img()), _write(tmp_path / "b.jpg", _img(50, 30))
    res = invoke(model, "--json", "--detector", "none", a, b)
    assert res.exit_code == 0, res.output
    rows = jsonl(res)
    assert [r["path"] for r in rows] == [str(a), str(b)]
    assert list(rows[0]) == ["path", "width", "height", "faces", "error"]
    assert (rows[0]["width"], rows[0]["height"], rows[1]["width"], rows[1]["height"]) == (60, 40, 30, 50)
    face = rows[0]["faces"][0]
    assert list(face) == FACE_KEYS and rows[0]["error"] is None
    assert face["box"] == [0, 0, 60, 40] and face["det_score"] == 1.0
    assert list(face["age_probs"]) == list(AGE_GROUPS) and face["age"] in AGE_GROUPS
    assert sum(face["age_probs"].values()) == pytest.approx(1, abs=1e-3)
    assert face["gender"] in GENDERS and 0.5 <= face["gender_score"] <= 1


def test_readable_line_per_face(model, tmp_path):
    a = _write(tmp_path / "a.png", _img())
    res = invoke(model, "--detector", "none", a)
    assert res.exit_code == 0
    (line,) = res.stdout.splitlines()
    assert line.startswith(f"{a}: face 1/1 at [0, 0, 60, 40]: ") and " age " in line
    blank = _write(tmp_path / "blank.png", _img(80, 80))
    res = invoke(model, "--detector", "haar", blank)
    assert res.exit_code == 0 and res.stdout.strip() == f"{blank}: no face found"


def test_csv_is_written_atomically(model, tmp_path, monkeypatch):
    a, bad = _write(tmp_path / "a.png", _img()), tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out" / "res.csv"
    res = invoke(model, "--detector", "none", "--csv", out, a, bad)
    assert res.exit_code == 1
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == CSV_COLUMNS and [r["path"] for r in rows] == [str(a), str(bad)]
    assert rows[0]["face"] == "0" and rows[0]["age"] in AGE_GROUPS and rows[0]["error"] == ""
    assert rows[1]["face"] == "" and "not a readable image" in rows[1]["error"]
    # a run that dies part-way leaves the previous CSV untouched and no temporary file behind
    real = pipeline_mod.read_image

    def dying(path, *a, **kw):
        if str(path) == str(bad):
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(pipeline_mod, "read_image", dying)
    before = out.read_bytes()
    CliRunner().invoke(cli, ["--model", str(model), "--detector", "none", "--csv", str(out), str(a), str(bad)])
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == ["res.csv"]


def test_save_annotated_draws_boxes_with_unique_names(model, tmp_path, utkface_dir):
    face = utkface_dir / FACE_NAME
    if not face.is_file():
        pytest.skip(f"{face} is absent")
    one = _write(tmp_path / "x" / "p.jpg", face_on_canvas(face))
    two = _write(tmp_path / "y" / "p.jpg", face_on_canvas(face))
    out = tmp_path / "annotated"
    res = invoke(model, "--detector", "haar", "--json", "--save-annotated", out, one, two)
    assert res.exit_code == 0, res.output
    assert all(len(r["faces"]) == 1 for r in jsonl(res))
    assert sorted(p.name for p in out.iterdir()) == ["p.jpg", "p_1.jpg"]
    drawn, orig = cv2.imread(str(out / "p.jpg")), cv2.imread(str(one))
    assert drawn.shape == orig.shape
    x1, y1, x2, y2 = jsonl(res)[0]["faces"][0]["box"]
    diff = np.abs(drawn.astype(int) - orig).mean(axis=2)
    assert diff[y1:y2, x1:x1 + 2].mean() > 15 and diff[:20, :20].mean() < 3  # the box is drawn, nothing else


# --------------------------------------------------------------------------- inputs
def test_directories_are_sorted_recursion_is_opt_in_and_other_files_skipped(model, tmp_path):
    d = tmp_path / "photos"
    for name in ("b.jpg", "a.png", "sub/c.jpg"):
        _write(d / name, _img())
    (d / "notes.txt").write_text("hello")
    (d / ".hidden.jpg").write_text("x")
    res = invoke(model, "--json", "--detector", "none", d)
    assert res.exit_code == 0 and [r["path"] for r in jsonl(res)] == [str(d / "a.png"), str(d / "b.jpg")]
    res = invoke(model, "--json", "--detector", "none", "-r", d)
    assert [r["path"] for r in jsonl(res)] == [str(d / n) for n in ("a.png", "b.jpg", "sub/c.jpg")]


def test_paths_on_stdin(model, tmp_path):
    a, b = _write(tmp_path / "a b.png", _img()), _write(tmp_path / "c.png", _img())
    res = invoke(model, "--json", "--detector", "none", "-", input=f"{b}\n\n{a}\n")
    assert res.exit_code == 0 and [r["path"] for r in jsonl(res)] == [str(b), str(a)]


def test_exif_grey_rgba_and_16_bit_images(model, tmp_path):
    img = _img(20, 40)
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    tiff = b"MM\x00*\x00\x00\x00\x08\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff  # orientation 6: rotate 90 degrees clockwise to display
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    (tmp_path / "rot.jpg").write_bytes(jpeg[:2] + segment + jpeg[2:])
    grey_jpeg = cv2.imencode(".jpg", img[:, :, 0])[1].tobytes()
    (tmp_path / "rot_grey.jpg").write_bytes(grey_jpeg[:2] + segment + grey_jpeg[2:])
    _write(tmp_path / "grey.png", img[:, :, 0])
    _write(tmp_path / "rgba.png", np.dstack([img, np.full(img.shape[:2], 128, np.uint8)]))
    _write(tmp_path / "deep.png", img.astype(np.uint16) * 257)
    res = invoke(model, "--json", "--detector", "none", tmp_path)
    assert res.exit_code == 0, res.output
    sizes = {Path(r["path"]).name: (r["width"], r["height"], len(r["faces"])) for r in jsonl(res)}
    assert sizes == {"rot.jpg": (20, 40, 1), "rot_grey.jpg": (20, 40, 1), "grey.png": (40, 20, 1), "rgba.png": (40, 20, 1), "deep.png": (40, 20, 1)}


def test_video_every_n_frames(model, tmp_path):
    path = make_video(tmp_path / "clip.avi", 10)
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video")
    res = invoke(model, "--json", "--detector", "none", "--every", 4, path, fake)
    assert res.exit_code == 1
    rows = jsonl(res)
    assert [(r["path"], r.get("frame")) for r in rows] == [(str(path), 0), (str(path), 4), (str(path), 8),
                                                          (str(fake), None)]
    assert all(len(r["faces"]) == 1 and r["width"] == 64 for r in rows[:3])
    assert "not a readable video" in rows[3]["error"]
    res = invoke(model, "--detector", "none", "--every", 5, path)
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == [f"{path} [frame 0]", f"{path} [frame 5]"]


# --------------------------------------------------------------------------- bad input, exit codes
def _bad_inputs(d: Path) -> dict[str, str]:
    """name -> expected error fragment (None: read fine)."""
    jpeg = cv2.imencode(".jpg", _img(64, 64))[1].tobytes()
    sof = jpeg.index(b"\xff\xc0")
    huge = bytearray(jpeg)
    huge[sof + 5:sof + 9] = (40000).to_bytes(2, "big") * 2
    png = bytearray(cv2.imencode(".png", _img())[1].tobytes())
    png[16:24] = (40000).to_bytes(4, "big") * 2
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # a valid header that claims 40000x40000
    d.mkdir()
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello, I am not a JPEG")
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "huge.jpg").write_bytes(bytes(huge))
    (d / "huge.png").write_bytes(bytes(png))
    _write(d / "tiny.png", _img(3, 3))
    _write(d / "ünï cödé 名前.jpg", _img())
    (d / "README.txt").write_text("not an image")
    return {"empty.jpg": "empty file", "huge.jpg": "pixel limit", "huge.png": "pixel limit",
            "text.jpg": "not a readable image", "tiny.png": None, "truncated.jpg": "not a readable image",
            "ünï cödé 名前.jpg": None}


@pytest.mark.parametrize("detector", ["yunet", "haar", "none"])
def test_bad_inputs_give_one_line_each_and_the_run_goes_on(model, tmp_path, detector, request):
    if detector == "yunet":
        request.getfixturevalue("monkeypatch").setenv("AGEGENDER_DETECTOR_MODEL",
                                                      str(request.getfixturevalue("yunet_model")))
    expected = _bad_inputs(tmp_path / "in")
    missing = tmp_path / "missing.jpg"
    res = invoke(model, "--json", "--detector", detector, tmp_path / "in", missing)
    assert res.exit_code == 1
    rows = jsonl(res)
    assert [Path(r["path"]).name for r in rows] == sorted(expected) + ["missing.jpg"]
    for r in rows:
        fragment = expected.get(Path(r["path"]).name, "no such file")
        if fragment is None:
            assert r["error"] is None and r["width"] > 0
        else:
            assert fragment in r["error"] and "\n" not in r["error"] and r["faces"] == []
    tiny = next(r for r in rows if r["path"].endswith("tiny.png"))
    assert len(tiny["faces"]) == (1 if detector == "none" else 0)
    errors = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 6 and all(str(tmp_path) in line for line in errors)


def test_exit_codes_and_usage_errors(model, tmp_path):
    a = _write(tmp_path / "a.png", _img())
    assert invoke(model, "--detector", "none", a).exit_code == 0
    assert invoke(model, "--detector", "none", a, tmp_path / "nope.png").exit_code == 1
    assert invoke(model).exit_code == 2
    assert invoke(model, "--detector", "retina", a).exit_code == 2
    assert invoke(model, "--every", 0, a).exit_code == 2
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert invoke(model, "--detector", "none", empty).exit_code == 0


def test_setup_errors_are_one_line_and_exit_2(model, tmp_path, monkeypatch):
    a = _write(tmp_path / "a.png", _img())
    res = invoke(tmp_path / "absent.onnx", a)
    assert res.exit_code == 2 and "no such model file" in res.stderr
    bad = build_contract_model(tmp_path / "bad.onnx", drop_keys=["crop_margin"])
    res = invoke(bad, a)
    assert res.exit_code == 2 and "metadata lacks crop_margin" in res.stderr
    monkeypatch.setattr("agegender.runtime.predictor.default_model_path", lambda: None)
    res = CliRunner().invoke(cli, [str(a)])
    assert res.exit_code == 2 and "pass --model" in res.stderr
    res = invoke(model, "--detector", "yunet", "--detector-model", tmp_path / "nope.onnx", a)
    assert res.exit_code == 2 and "no such YuNet model file" in res.stderr


def test_progress_bar_on_a_terminal_keeps_stdout_clean(model, tmp_path, monkeypatch):
    import io
    import sys

    from agegender.runtime.cli import RunConfig, run
    from agegender.runtime.predictor import Predictor

    class Tty(io.StringIO):
        def isatty(self):
            return True

    files = [str(_write(tmp_path / f"{i}.png", _img())) for i in range(6)]
    err, out = Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    status = run(RunConfig(tuple(files), json=True), Predictor(model, detector="none"), files, out)
    assert status == 0
    assert [json.loads(line)["path"] for line in out.getvalue().splitlines()] == files
    assert "6/6" in err.getvalue()


def test_flip_option_answers_alike_for_a_face_and_its_mirror(model, tmp_path):
    img = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    a, b = _write(tmp_path / "a.png", img), _write(tmp_path / "b.png", np.ascontiguousarray(img[:, ::-1]))
    plain = [r["faces"][0]["age_probs"] for r in jsonl(invoke(model, "--json", "--detector", "none", a, b))]
    flip = [r["faces"][0]["age_probs"] for r in jsonl(invoke(model, "--json", "--detector", "none", "--flip", a, b))]
    assert plain[0] != plain[1] and flip[0] == flip[1]


def test_threads_option(model, tmp_path):
    a = _write(tmp_path / "a.png", _img())
    assert invoke(model, "--threads", 1, "--detector", "none", a).exit_code == 0
    assert invoke(model, "--threads", 0, a).exit_code == 2


def test_unwritable_outputs_are_one_line_errors(model, tmp_path):
    a = _write(tmp_path / "a.png", _img())
    (tmp_path / "file").write_text("x")
    res = invoke(model, "--detector", "none", "--csv", tmp_path / "file" / "out.csv", a)
    assert res.exit_code == 2 and "cannot write output" in res.stderr
    res = invoke(model, "--detector", "none", "--save-annotated", tmp_path / "file" / "ann", a)
    assert res.exit_code == 2 and "cannot write output" in res.stderr


# --------------------------------------------------------------------------- short model names
def test_short_model_names_resolve_to_shipped_files(model, tmp_path, monkeypatch):
    from agegender.runtime import predictor as predictor_mod
    from agegender.runtime.model import ModelError
    from agegender.runtime.predictor import Predictor, default_model_path, resolve_model_path

    shipped = default_model_path()
    if shipped is None:
        pytest.skip("the shipped default model is not installed")
    assert resolve_model_path("default") == shipped
    monkeypatch.setitem(predictor_mod.MODEL_NAMES, "fast", "agegender_int8.onnx")  # as if it were shipped
    assert resolve_model_path("fast") == shipped
    monkeypatch.setitem(predictor_mod.MODEL_NAMES, "fast", "absent_for_this_test.onnx")
    with pytest.raises(ModelError, match=r"model 'fast' .*absent_for_this_test.onnx\) is not installed.*: default;"):
        Predictor(model="fast", detector="none")
    a = _write(tmp_path / "a.png", _img())
    res = CliRunner().invoke(cli, ["--model", "fast", "--detector", "none", str(a)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "installed: default" in res.stderr
    monkeypatch.setenv("AGEGENDER_MODEL", "fast")  # the environment variable takes short names too
    assert CliRunner().invoke(cli, ["--detector", "none", str(a)]).exit_code == 2
    monkeypatch.chdir(tmp_path)  # a file named like a short name wins: the user can see it
    (tmp_path / "fast").write_bytes(Path(model).read_bytes())
    assert resolve_model_path("fast") == Path("fast")
    res = invoke("fast", "--json", "--detector", "none", a)
    assert res.exit_code == 0 and jsonl(res)[0]["faces"][0]["age"] in AGE_GROUPS
