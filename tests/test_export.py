"""export-onnx: a tiny trained model goes to fp32 and int8 ONNX that the runtime loads on its own,
and both gates stop a broken model (exit 1, nothing under the final name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from agegender.export import onnx_export, quantize
from agegender.export.cli import main, run
from agegender.export.net import ModelArgs, AgeGenderNet, load_checkpoint, make_checkpoint, save_checkpoint
from agegender.export.onnx_export import ExportConfig
from agegender.export.parity import face_of
from agegender.runtime.model import REQUIRED_KEYS, OnnxClassifier
from agegender.runtime.preprocess import to_input
from fakedata import tiny_checkpoint

ARCH, SIZE = "mobilenetv3_small_050", 32
FAST = dict(latency_runs=2, progress=False, parity_size=64)
# 20 test images: one flipped face is 5 %, so runs that must pass gate on looser (recorded) thresholds;
# the default thresholds are exercised by the failing runs below and by test_export_quantize.py
LOOSE = dict(max_drop=10.0, min_agreement=(("age", 0.9), ("gender", 0.95)))


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on 2 cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> dict:
    """A CSV dataset of generated faces and a checkpoint trained a few steps on its training folds."""
    return tiny_checkpoint(tmp_path_factory.mktemp("export"), ARCH, SIZE)


def cfg_for(trained: dict, out: Path, **kw) -> ExportConfig:
    return ExportConfig(checkpoint=str(trained["ckpt"]), out=str(out), **{**FAST, **kw})


def leftovers(out: Path) -> list[str]:
    """Files in ``out`` other than the report: models and half-written temp files."""
    return sorted(p.name for p in out.iterdir() if not p.name.endswith("parity.json")) if out.exists() else []


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    code = run(cfg_for(trained, out, quantize=True, calib_size=64, **LOOSE))
    return {"code": code, "out": out, "report": json.loads((out / "parity.json").read_text())}


# --------------------------------------------------------------------------- the exported files
def test_fp32_and_int8_written_and_loaded_by_runtime(exported, trained):
    out = exported["out"]
    assert exported["code"] == 0, exported["report"]
    assert sorted(p.name for p in out.iterdir()) == ["agegender_fp32.onnx", "agegender_int8.onnx", "parity.json"]
    records = [r for r in trained["records"] if r.fold == 0][:6]
    batch = to_input(np.stack([face_of(r.path, SIZE) for r in records]))
    ckpt = load_checkpoint(trained["ckpt"])
    probs = {}
    for kind in ("fp32", "int8"):
        clf = OnnxClassifier(out / f"agegender_{kind}.onnx", threads=1)  # the runtime alone, no onnx import
        meta = clf.meta.raw
        assert set(REQUIRED_KEYS) <= set(meta)
        assert meta["agegender_format"] == "1" and meta["arch"] == ARCH and meta["task"] == "both"
        assert int(meta["input_size"]) == SIZE and float(meta["crop_margin"]) == pytest.approx(0.1)
        assert json.loads(meta["metrics"]) == ckpt["metrics"] and meta["train_data"] == ckpt["train_data"]
        assert json.loads(meta["age_groups"])[0] == "0-2" and json.loads(meta["genders"]) == ["male", "female"]
        assert clf.session.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
        probs[kind] = clf.run(batch)
        assert probs[kind]["age_probs"].shape == (6, 8) and probs[kind]["gender_probs"].shape == (6, 2)
        np.testing.assert_allclose(probs[kind]["age_probs"].sum(1), 1.0, atol=1e-3)
        np.testing.assert_allclose(clf.run(batch[:1])["age_probs"], probs[kind]["age_probs"][:1], atol=1e-5)
    assert OnnxClassifier(out / "agegender_fp32.onnx").meta.quantization == "none"
    assert OnnxClassifier(out / "agegender_int8.onnx").meta.quantization.startswith("int8: QDQ static int8")
    net = AgeGenderNet(ModelArgs.from_dict(ckpt["model_args"]))
    net.load_state_dict(ckpt["model"])
    with torch.inference_mode():
        ref = torch.softmax(net.eval()(torch.from_numpy(batch))["age"], 1).numpy()
    np.testing.assert_allclose(probs["fp32"]["age_probs"], ref, atol=1e-4)


def test_fp32_file_is_self_contained_and_checked(exported):
    path = exported["out"] / "agegender_fp32.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert not [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["age_probs", "gender_probs"]
    int8 = onnx.load(str(exported["out"] / "agegender_int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    assert (exported["out"] / "agegender_int8.onnx").stat().st_size < path.stat().st_size


def test_parity_report_holds_every_number(exported):
    rep = exported["report"]
    fp = rep["fp32"]
    assert fp["parity"]["passed"] and fp["parity"]["images"] >= 64 and fp["parity"]["max_abs_diff"] <= 1e-4
    assert fp["parity"]["top1_mismatches"] == {"age_probs": 0, "gender_probs": 0}
    assert fp["bytes"] > 0 and fp["latency_ms_1thread"] > 0
    q = rep["int8"]
    assert q["passed"] and q["written"] and q["bytes"] > 0 and q["latency_ms_1thread"] > 0
    assert q["thresholds"] == {"max_drop_pt": 10.0, "min_agreement": {"age": 0.9, "gender": 0.95},
                               "agreement_margin": 0.0}
    assert rep["options"]["min_agreement"] == {"age": 0.9, "gender": 0.95}
    assert q["gate_mode"].startswith("test fold") and q["gate"]["images"] == 20
    assert set(q["gate"]["drop_pt"]) == {"age_exact", "age_1off", "gender_acc"}
    assert q["attempts"][0]["name"] == "plain" and q["strategy"] == q["attempts"][-1]["name"]
    assert rep["data"]["test_images"] == 20 and rep["speedup_1thread"] > 0


def test_existing_output_is_kept_without_force(exported, trained):
    out = exported["out"]
    before = (out / "agegender_fp32.onnx").stat().st_mtime_ns
    res = CliRunner().invoke(main, [str(trained["ckpt"]), "--out", str(out), "-q"])
    assert res.exit_code == 1
    assert "already exist" in res.stderr and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (out / "agegender_fp32.onnx").stat().st_mtime_ns == before


# --------------------------------------------------------------------------- the gates stop broken models
def _perturb_node_output(path: Path, output: str, shift: list[float]) -> None:
    """Add a constant to one graph output (a broken model: its top-1 moves)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        for i, o in enumerate(node.output):
            if o == output:
                node.output[i] = output + "_orig"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(shift, np.float32), "perturb_shift"))
    model.graph.node.append(onnx.helper.make_node("Add", [output + "_orig", "perturb_shift"], [output]))
    onnx.save(model, str(path))


def test_fp32_parity_gate_fails_on_a_perturbing_exporter(trained, tmp_path, monkeypatch):
    real = onnx_export.export_onnx

    def broken(model, path, size, opset):
        real(model, path, size, opset)
        _perturb_node_output(path, "gender_probs", [0.0, 1e-3])

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    out = tmp_path / "out"
    assert run(cfg_for(trained, out, quantize=True)) == 1
    assert leftovers(out) == []  # no model, no temp file
    rep = json.loads((out / "parity.json").read_text())
    assert not rep["fp32"]["parity"]["passed"] and rep["fp32"]["parity"]["max_abs_diff"] > 1e-4
    assert "int8" not in rep


def test_fp32_gate_failure_under_force_removes_the_older_file(trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "agegender_fp32.onnx").write_bytes(b"an older model")
    real = onnx_export.export_onnx

    def broken(model, path, size, opset):
        real(model, path, size, opset)
        _perturb_node_output(path, "age_probs", [0.5] + [0.0] * 7)

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    assert run(cfg_for(trained, out, force=True)) == 1
    assert leftovers(out) == []


def _break_int8(monkeypatch):
    real = quantize.quantize

    def broken(prep, out, *args, **kwargs):
        real(prep, out, *args, **kwargs)
        _perturb_node_output(Path(out), "age_probs", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6])

    monkeypatch.setattr(quantize, "quantize", broken)


def test_int8_gate_fails_after_every_float_island(trained, tmp_path, monkeypatch):
    _break_int8(monkeypatch)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(trained["ckpt"]), "--out", str(out), "--quantize", "--calib-size", "32",
                                    "--latency-runs", "2", "--parity-size", "64", "-q"])
    assert res.exit_code == 1
    assert "int8 gate failed" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert leftovers(out) == ["agegender_fp32.onnx"]  # fp32 passed its own gate; no int8 file
    q = json.loads((out / "parity.json").read_text())["int8"]
    assert not q["passed"] and not q["written"]
    tries = [(a["name"], a["calib_method"]) for a in q["attempts"]]
    assert tries[:3] == [("plain", "minmax"), ("plain", "percentile"), ("cheap-islands", q["settings"]["calib_method"])]
    assert tries[-1][0].startswith("sensitive-") and len(tries) == 6
    floats = [a["float_nodes"] for a in q["attempts"][1:]]
    assert floats == sorted(floats) and len(set(floats)) == len(floats)  # each rung keeps more in float
    assert any("age agreement" in f for f in q["gate"]["failures"])


def test_int8_force_writes_the_failed_model_and_says_so(trained, tmp_path, monkeypatch):
    _break_int8(monkeypatch)
    out = tmp_path / "out"
    assert run(cfg_for(trained, out, quantize=True, force=True, islands=False, calib_size=32)) == 1
    meta = OnnxClassifier(out / "agegender_int8.onnx").meta
    assert "INT8 GATE FAILED" in meta.quantization and "age agreement" in meta.quantization
    q = json.loads((out / "parity.json").read_text())["int8"]
    assert q["written"] and not q["passed"] and [a["name"] for a in q["attempts"]] == ["plain", "plain"]


def test_bad_thresholds_are_usage_errors(trained, tmp_path):
    for args in (["--max-drop", "-1"], ["--min-agreement", "age=1.5"], ["--min-agreement", "nose=0.5"]):
        res = CliRunner().invoke(main, [str(trained["ckpt"]), "--out", str(tmp_path / "o"), *args, "-q"])
        assert res.exit_code == 2, args
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- data sources
def test_no_data_needs_calib_data_and_gates_on_agreement(trained, tmp_path):
    ckpt = load_checkpoint(trained["ckpt"])
    ckpt["data"] = {"root": str(tmp_path / "gone"), "format": "csv", "fold": 0, "nfolds": 5, "holdout": 0.0}
    save_checkpoint(tmp_path / "nodata.pt", ckpt)
    cfg = ExportConfig(checkpoint=str(tmp_path / "nodata.pt"), out=str(tmp_path / "a"), quantize=True, **FAST, **LOOSE)
    res = CliRunner().invoke(main, [cfg.checkpoint, "--out", cfg.out, "-q"])
    assert res.exit_code == 1 and "--calib-data" in res.stderr and "absent" in res.stderr
    assert leftovers(Path(cfg.out)) == []
    plain = tmp_path / "faces"  # a plain folder of face images (no labels)
    plain.mkdir()
    for r in trained["records"][:70]:
        os.link(r.path, plain / Path(r.path).name)
    assert run(replace(cfg, out=str(tmp_path / "b"), calib_data=str(plain), calib_size=32)) == 0
    rep = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert rep["data"]["test_source"] is None and any("absent" in n for n in rep["data"]["notes"])
    assert rep["int8"]["gate_mode"].startswith("no labelled test fold") and "drop_pt" not in rep["int8"]["gate"]
    # --data: the checkpoint's dataset, moved; its test fold judges again
    assert run(replace(cfg, out=str(tmp_path / "c"), data_root=str(trained["csv"]), calib_size=32)) == 0
    rep = json.loads((tmp_path / "c" / "parity.json").read_text())
    assert "fold 0" in rep["data"]["test_source"] and rep["int8"]["gate_mode"].startswith("test fold")


# --------------------------------------------------------------------------- bad checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["missing", "garbage", "pickle", "foreign"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "pickle":
        torch.save({"format": "agegender-checkpoint", "model": _Evil(), "model_args": {}}, path)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    res = CliRunner().invoke(main, [str(path), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_entry_point_error_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-c", "from agegender._entry import export_onnx; export_onnx()",
                          str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.pt'}: no such checkpoint file"]
    res = subprocess.run([sys.executable, "-c", "from agegender._entry import export_onnx; export_onnx()",
                          "--bogus"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_single_task_model_exports_its_one_output(trained, tmp_path):
    torch.manual_seed(1)
    net = AgeGenderNet(ModelArgs(arch=ARCH, img_size=SIZE, task="gender")).eval()
    data = {"root": str(trained["csv"]), "format": "csv", "fold": 0, "nfolds": 5, "holdout": 0.0}
    save_checkpoint(tmp_path / "g.pt", make_checkpoint(net, crop_margin=0.0, config={}, data=data, train_data="csv",
                                                       fold=0, epoch=0, metrics={}))
    cfg = ExportConfig(checkpoint=str(tmp_path / "g.pt"), out=str(tmp_path / "o"), name="gender-only", quantize=True,
                       calib_size=32, **FAST, **LOOSE)
    assert run(cfg) == 0
    clf = OnnxClassifier(cfg.fp32_path)
    assert clf.meta.task == "gender" and clf.output_names == ["gender_probs"]
    rep = json.loads(cfg.report_path.read_text())
    assert cfg.report_path.name == "gender-only_parity.json" and cfg.int8_path.is_file()
    assert set(rep["int8"]["gate"]["agreement"]) == {"gender"} and set(rep["int8"]["gate"]["drop_pt"]) == {"gender_acc"}
