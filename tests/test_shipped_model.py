"""The shipped default model (read-only): installed, described, genuinely trained, and its logs agree.

These tests never retrain or rewrite the model; they read ``models/`` and ``logs/`` as shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from agegender.runtime import AGE_GROUPS, GENDERS
from agegender.runtime.cli import cli
from agegender.runtime.datasets import is_holdout, label_arrays, read_utkface
from agegender.runtime.imageio import read_image
from agegender.runtime.metrics import age_gender_metrics
from agegender.runtime.model import OnnxClassifier
from agegender.runtime import predictor as predictor_mod
from agegender.runtime.predictor import default_model_path
from agegender.runtime.preprocess import prepare_precropped, to_input

LOGS = REPO / "logs"


@pytest.fixture(scope="module")
def shipped() -> dict[str, Path]:
    int8 = default_model_path()
    assert int8 is not None, "the installed package has no default model"
    return {"int8": int8, "fp32": int8.with_name("agegender_fp32.onnx")}


def test_default_model_is_the_small_int8_model_with_full_metadata(shipped):
    assert shipped["int8"].name == "agegender_int8.onnx"
    assert shipped["int8"].stat().st_size <= 4.5e6
    int8, fp32 = (OnnxClassifier(shipped[k]).meta for k in ("int8", "fp32"))
    assert int8.quantization.startswith("int8") and not fp32.quantization.startswith("int8")
    assert int8.age_groups == fp32.age_groups == AGE_GROUPS and int8.genders == fp32.genders == GENDERS
    for key in ("arch", "task", "input_size", "crop_margin", "train_data", "metrics"):
        assert getattr(int8, key) == getattr(fp32, key), key
    assert int8.task == "both" and "utkface" in int8.train_data
    gate = json.loads(int8.raw["int8_gate"])
    assert gate["agreement"]["age"] >= 0.97 and gate["agreement"]["gender"] >= 0.99


def test_cli_without_model_uses_the_shipped_model(shipped, tmp_path, monkeypatch):
    monkeypatch.delenv("AGEGENDER_MODEL", raising=False)
    rng = np.random.default_rng(0)
    face = cv2.GaussianBlur(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), (9, 9), 0)
    path = tmp_path / "face.png"
    cv2.imwrite(str(path), face)
    res = CliRunner().invoke(cli, ["--json", "--detector", "none", str(path)])
    assert res.exit_code == 0, res.output
    (got,) = json.loads(res.stdout)["faces"]
    clf = OnnxClassifier(shipped["int8"])
    want = clf.run(to_input([prepare_precropped(read_image(path), clf.input_size)]))["age_probs"][0]
    assert [got["age_probs"][g] for g in AGE_GROUPS] == pytest.approx(want.tolist(), abs=1e-4)


def test_shipped_models_classify_held_out_real_faces(shipped, utkface_dir):
    """A trained model, not toy weights: well above chance on faces it never saw, int8 close to fp32."""
    records, _ = read_utkface(utkface_dir)
    held = [r for r in records if is_holdout(Path(r.path).name, 0.1)]
    assert len(held) == 1942  # the held-out faces of models/MODEL_CARD.md
    at, gt, scored = label_arrays(held)
    clfs = {kind: OnnxClassifier(shipped[kind], threads=2) for kind in ("int8", "fp32")}
    size = clfs["int8"].input_size
    batch = to_input([prepare_precropped(read_image(r.path), size) for r in held])  # read once for both
    preds = {}
    for kind, clf in clfs.items():
        out = clf.run(batch)
        preds[kind] = (out["age_probs"].argmax(1), out["gender_probs"].argmax(1))
    m = age_gender_metrics(at, preds["int8"][0], gt, preds["int8"][1], scored)
    # the model card reports 0.745 / 0.970 / 0.940 (eval_holdout.py); leave room for other onnxruntime builds
    assert m["age_exact"] >= 0.735 and m["age_1off"] >= 0.96 and m["gender_acc"] >= 0.93, m
    assert (preds["int8"][0] == preds["fp32"][0]).mean() >= 0.95
    assert (preds["int8"][1] == preds["fp32"][1]).mean() >= 0.98


def test_logs_belong_to_the_shipped_model(shipped):
    config = json.loads((LOGS / "config.json").read_text())
    summary = json.loads((LOGS / "summary.json").read_text())
    meta = OnnxClassifier(shipped["int8"]).meta
    assert config["arch"] == meta.arch and config["img_size"] == meta.input_size
    assert [f["fold"] for f in summary["folds"]] == config["folds"] == list(range(config["nfolds"]))
    keys = ("age_exact", "age_1off", "gender_acc")
    for entry in summary["folds"]:
        result = json.loads((LOGS / f"fold{entry['fold']}" / "result.json").read_text())
        assert {k: result[k] for k in keys} == {k: entry[k] for k in keys}
        assert (LOGS / f"fold{entry['fold']}" / "train_log.txt").stat().st_size > 0
    qat = json.loads((LOGS / "qat" / "qat.json").read_text())
    if meta.raw["checkpoint_fold"] == "":
        # a `train-adience --final` model (logs/final/): the cross-validated recipe on every fold; its
        # fine-tuning started from the chosen epoch's validation scores, and the metadata carries its own
        final = json.loads((LOGS / "final" / "config.json").read_text())
        result = json.loads((LOGS / "final" / "result.json").read_text())
        assert final["final"] is True and result["scored_on"] == "validation"
        recipe = ("arch", "img_size", "epochs", "lr", "batch_size", "weight_decay", "label_smoothing", "schedule",
                  "drop_rate", "augment", "holdout", "val_frac", "seed", "crop_margin", "pretrained")
        assert {k: final[k] for k in recipe} == {k: config[k] for k in recipe}
        assert Path(final["init_weights"]).name == Path(config["init_weights"]).name
        assert {k: qat["start_metrics"]["val"][k] for k in keys} == pytest.approx({k: result[k] for k in keys}, abs=2e-3)
        assert {k: qat["metrics"]["val"][k] for k in keys} == {k: meta.metrics["val"][k] for k in keys}
        assert (LOGS / "final" / "train_log.txt").stat().st_size > 0
    else:
        # the fold's model after quantization-aware fine-tuning (logs/qat/): it started from the fold's
        # logged test result, and its metadata carries the fine-tuned model's own
        fold = int(meta.raw["checkpoint_fold"])
        test = json.loads((LOGS / f"fold{fold}" / "result.json").read_text())
        assert {k: test[k] for k in keys} == {k: qat["start_metrics"]["test"][k] for k in keys}
        assert {k: qat["metrics"]["test"][k] for k in keys} == {k: meta.metrics["test"][k] for k in keys}
    for k in keys:
        values = [f[k] for f in summary["folds"]]
        assert summary["mean"][k] == pytest.approx(np.mean(values)) and summary["std"][k] == pytest.approx(np.std(values))


def test_docs_quote_the_logged_cross_validation():
    summary = json.loads((LOGS / "summary.json").read_text())
    line = " / ".join(f"{summary['mean'][k]:.3f} ± {summary['std'][k]:.3f}" for k in ("age_exact", "age_1off", "gender_acc"))
    readme = " ".join((REPO / "README.md").read_text().split())
    card = (REPO / "models" / "MODEL_CARD.md").read_text()
    assert line in readme
    for k in ("age_exact", "age_1off", "gender_acc"):
        assert f"**{summary['mean'][k]:.3f} ± {summary['std'][k]:.3f}**" in card


def test_the_fast_model_is_shipped_beside_the_default_and_selectable_by_name(shipped):
    fast = shipped["int8"].with_name("agegender_fast_int8.onnx")
    int8, fp32 = OnnxClassifier(fast).meta, OnnxClassifier(fast.with_name("agegender_fast_fp32.onnx")).meta
    assert "mobilenetv3" in int8.arch and int8.arch == fp32.arch
    assert "reduce_range" in int8.quantization and "GATE FAILED" not in int8.quantization  # passed without --force
    gate = json.loads(int8.raw["int8_gate"])
    assert gate["agreement"]["age"] >= 0.97 and gate["agreement"]["gender"] >= 0.99
    assert predictor_mod.resolve_model_path("fast") == fast


def test_the_default_int8_cannot_saturate_16_bit_kernels(shipped):
    """7-bit weights (|q| <= 64): 255 x 64 x 2 < 32767, so AVX2-only CPUs answer like VNNI and ARM ones."""
    import onnx
    from onnx import numpy_helper

    for name in ("agegender_int8.onnx", "agegender_fast_int8.onnx"):
        model = onnx.load(str(shipped["int8"].with_name(name)))
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights and max(int(abs(w.astype(int)).max()) for w in weights) <= 64, name
