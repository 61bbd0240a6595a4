"""The gates' arithmetic, the float islands and the automatic int8 search (small, fast pieces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from agegender.export import parity, quantize
from agegender.export.net import AgeGenderNet, ModelArgs, ProbsModel
from agegender.export.onnx_export import export_onnx
from agegender.runtime.datasets import Record
from fakedata import make_csv


def _onehot(idx, n, p=0.9):
    out = np.full((len(idx), n), (1 - p) / (n - 1), np.float32)
    out[np.arange(len(idx)), idx] = p
    return out


def _rec(age=None, gender=None, exact=None):
    return Record("x.jpg", age, gender, "s", 0, exact)


# --------------------------------------------------------------------------- gates
def test_parity_gate_needs_small_difference_and_same_top1():
    ref = {"gender_probs": np.array([[0.50004, 0.49996], [0.9, 0.1]], np.float32)}
    assert parity.parity_gate(ref, {"gender_probs": ref["gender_probs"] + 5e-5})["passed"]
    assert not parity.parity_gate(ref, {"gender_probs": ref["gender_probs"] + [0, 2e-4]})["passed"]
    flipped = {"gender_probs": np.array([[0.49996, 0.50004], [0.9, 0.1]], np.float32)}  # |Δ| 8e-5, top-1 differs
    res = parity.parity_gate(ref, flipped)
    assert not res["passed"] and res["top1_mismatches"] == {"gender_probs": 1} and res["max_abs_diff"] < 1e-4


def test_int8_gate_thresholds_on_agreement_and_drop():
    n = 200
    age = np.arange(n) % 8
    gender = np.arange(n) % 2
    records = [_rec(int(a), int(g)) for a, g in zip(age, gender)]
    fp32 = {"age_probs": _onehot(age, 8), "gender_probs": _onehot(gender, 2)}
    th = parity.Int8Thresholds()  # 0.5 pt, age 0.97, gender 0.99

    def with_flips(n_age: int, n_gender: int, shift: int = 1):
        a, g = age.copy(), gender.copy()
        a[:n_age] = (a[:n_age] + shift) % 8
        g[:n_gender] = 1 - g[:n_gender]
        return {"age_probs": _onehot(a, 8), "gender_probs": _onehot(g, 2)}

    ok = parity.int8_gate(fp32, with_flips(0, 0), records, th)
    assert ok["passed"] and ok["agreement"] == {"age": 1.0, "gender": 1.0} and ok["drop_pt"]["age_exact"] == 0
    one = parity.int8_gate(fp32, with_flips(1, 0), records, th)  # 0.5 pt drop: allowed
    assert one["passed"] and one["drop_pt"]["age_exact"] == pytest.approx(0.5)
    two = parity.int8_gate(fp32, with_flips(2, 0), records, th)  # 1.0 pt drop: not
    assert not two["passed"] and two["failures"] == ["age_exact drop 1.00 pt > 0.5 pt"]
    # a flip to the neighbour group keeps 1-off; two groups away it does not
    assert two["drop_pt"]["age_1off"] == 0 and parity.int8_gate(fp32, with_flips(2, 0, 2), records, th)["drop_pt"][
        "age_1off"] == pytest.approx(1.0)
    loose = parity.Int8Thresholds(max_drop_pt=100, min_agreement=(("age", 0.97), ("gender", 0.99)))
    assert parity.int8_gate(fp32, with_flips(6, 0), records, loose)["passed"]  # 0.970 agreement
    res = parity.int8_gate(fp32, with_flips(7, 3), records, loose)
    assert res["failures"] == ["age agreement 0.9650 < 0.9700", "gender agreement 0.9850 < 0.9900"]
    assert res["slack"] < 0 < ok["slack"]
    # --agreement-margin: near-ties in fp32 do not count
    probs = _onehot(age, 8)
    probs[:10] = 0.0
    probs[np.arange(10), age[:10]] = 0.46
    probs[np.arange(10), (age[:10] + 1) % 8] = 0.44  # ten faces with a 0.02 lead
    tied = {"age_probs": probs, "gender_probs": fp32["gender_probs"]}
    flips = with_flips(10, 0)
    assert not parity.int8_gate(tied, flips, None, th)["passed"]
    margin = parity.Int8Thresholds(agreement_margin=0.05)
    res = parity.int8_gate(tied, flips, None, margin)
    assert res["passed"] and res["agreement"]["age"] == 1.0 and res["agreement_all_faces"]["age"] == 0.95
    assert res["agreement_confident"]["age"]["share_of_faces"] == pytest.approx(0.95)
    # without labels only agreement is judged
    assert "drop_pt" not in parity.int8_gate(fp32, with_flips(2, 0), None, th)


def test_metrics_skip_unknown_gender_and_ages_outside_groups():
    recs = [_rec(0, None, 1.0), _rec(1, 1, 3.0), _rec(2, 0, 10.0)]  # age 3 lies between 0-2 and 4-6
    probs = {"age_probs": _onehot(np.array([0, 0, 2]), 8), "gender_probs": _onehot(np.array([0, 0, 0]), 2)}
    m = parity.metrics_of(probs, recs)
    assert m["n_age"] == 2 and m["age_exact"] == 1.0 and m["n_gender"] == 2 and m["gender_acc"] == 0.5


# --------------------------------------------------------------------------- data sources
def test_sources_split_test_fold_holdout_and_calib_data(tmp_path):
    csv = make_csv(tmp_path / "d", n=60, size=24)
    from agegender.runtime.datasets import is_holdout

    ckpt = {"data": {"root": str(csv), "format": "csv", "fold": 2, "nfolds": 5, "holdout": 0.2}}
    src = parity.resolve_sources(ckpt, None)
    assert src.test and all(r.fold == 2 for r in src.test) and all(r.fold != 2 for r in src.calib)
    kept = src.test + src.calib
    assert not any(is_holdout(Path(r.path).name, 0.2) for r in kept) and 30 < len(kept) < 60
    own = parity.resolve_sources(ckpt, str(csv))  # --calib-data: never the test fold's images
    assert own.calib_source == str(csv) and not {r.path for r in own.calib} & {r.path for r in own.test}
    none = parity.resolve_sources({"data": None}, None)
    assert none.calib == [] and none.test == [] and none.notes == ["the checkpoint names no training data"]


def test_load_faces_skips_unreadable_images(tmp_path):
    csv = make_csv(tmp_path / "d", n=6, size=24)
    (csv.parent / "img_0001.jpg").write_bytes(b"not a jpeg")
    from agegender.runtime.datasets import read_csv

    recs, _ = read_csv(csv)
    fs = parity.load_faces(recs, 16, 100, "t", progress=False)
    assert len(fs) == 5 and fs.failed == 1 and fs.faces.shape == (5, 16, 16, 3) and fs.faces.dtype == np.uint8


# --------------------------------------------------------------------------- islands and search
def _prep(tmp_path: Path, arch: str, size: int = 64) -> tuple[Path, onnx.ModelProto]:
    torch.manual_seed(0)
    model = ProbsModel(AgeGenderNet(ModelArgs(arch=arch, img_size=size))).eval()
    export_onnx(model, tmp_path / "f.onnx", size, 17)
    quantize.preprocess(tmp_path / "f.onnx", tmp_path / "prep.onnx")
    return tmp_path / "prep.onnx", onnx.load(str(tmp_path / "prep.onnx"))


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return _prep(tmp_path_factory.mktemp("v3"), "mobilenetv3_small_050")


def test_head_and_squeeze_excite_islands_of_mobilenetv3(v3):
    _, model = v3
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)  # preprocess names every node
    head = quantize.head_nodes(model)
    assert {"/net/age/Gemm", "/net/gender/Gemm", "/net/backbone/conv_head/Conv"} <= set(head)
    assert {n.name for n in model.graph.node if n.op_type in ("Softmax", "GlobalAveragePool")} <= set(head)
    assert not any("blocks" in h for h in head)
    islands = quantize.cheap_islands(model)
    se = {n for n in names if "/se/" in n}
    assert islands[0] == "/net/backbone/conv_stem/Conv" and se <= set(islands)
    assert not any("conv_pw" in n or "conv_dw" in n or "conv_pwl" in n for n in islands)


def test_relu_network_without_squeeze_excite_has_only_the_stem_island(tmp_path):
    _, model = _prep(tmp_path, "resnet10t", 64)
    assert quantize.cheap_islands(model) == [next(n.name for n in model.graph.node if n.op_type == "Conv")]
    assert {n.op_type for n in model.graph.node if n.name in quantize.head_nodes(model)} >= {"Gemm", "Softmax"}


def test_search_keeps_more_in_float_until_the_gate_passes(v3, tmp_path):
    prep, model = v3
    faces = np.random.default_rng(0).integers(0, 255, (24, 64, 64, 3), dtype=np.uint8)
    n_head, n_isl = len(quantize.head_nodes(model)), len(quantize.cheap_islands(model))
    seen: list[int] = []

    def evaluate(path: Path) -> dict:
        q = onnx.load(str(path))
        n_float_convs = sum(1 for n in q.graph.node if n.op_type == "Conv" and not any(
            i.endswith("_DequantizeLinear_Output") for i in n.input[1:2]))
        seen.append(n_float_convs)
        ok = n_float_convs >= 30
        return {"passed": ok, "failures": [] if ok else ["too few float convs"], "slack": n_float_convs - 30.0,
                "agreement": {}}

    res = quantize.search(prep, faces, evaluate, quantize.QuantSettings("minmax"), tmp_path)
    names = [a.name for a in res.attempts]
    assert names[:2] == ["plain", "cheap-islands"] and names[-1].startswith("sensitive-") and res.passed
    assert seen == sorted(seen) and seen[-1] >= 30 > seen[-2]
    assert len(res.attempts[0].excluded) == n_head and len(res.attempts[1].excluded) == n_head + n_isl
    assert res.sensitivity and all(v >= 0 for v in res.sensitivity.values())
    assert set(res.chosen.excluded) >= set(res.attempts[1].excluded)
    text = quantize.describe_choice(res, 24)
    assert text.startswith("int8: QDQ static int8") and res.chosen.name in text and "FAILED" not in text

    never = quantize.search(prep, faces, lambda p: {"passed": False, "failures": ["no"], "slack": -1.0},
                            quantize.QuantSettings(), tmp_path, auto=False)  # calib "auto": two plain tries
    assert [(a.name, a.settings.calib_method) for a in never.attempts] == [("plain", "minmax"),
                                                                           ("plain", "percentile")]
    assert not never.passed


def test_unusable_calibration_method_is_one_clear_error(v3, tmp_path, monkeypatch):
    prep, _ = v3
    import onnxruntime.quantization as oq

    def boom(*a, **k):
        raise ValueError("setting an array element with a sequence.\nmore")

    monkeypatch.setattr(oq, "quantize_static", boom)
    with pytest.raises(quantize.QuantizeError, match="percentile calibration.*try --calib-method minmax"):
        quantize.quantize(prep, tmp_path / "q.onnx", np.zeros((2, 64, 64, 3), np.uint8),
                          quantize.QuantSettings(calib_method="percentile"), [], tmp_path / "c.json")


def test_histogram_calibration_gets_equal_batches(v3, tmp_path):
    """onnxruntime's entropy/percentile calibrators stack batches: a short last batch used to break them."""
    reader = quantize.FaceReader(np.zeros((30, 8, 8, 3), np.uint8), 16)
    sizes = [b["image"].shape[0] for b in reader]
    assert sizes == [15, 15] and len(reader) == 2
    prep, _ = v3
    faces = np.random.default_rng(1).integers(0, 255, (30, 64, 64, 3), dtype=np.uint8)
    for method in ("percentile",):  # entropy shares its histogram collector (and is slower)
        quantize.quantize(prep, tmp_path / f"{method}.onnx", faces, quantize.QuantSettings(method), [],
                          tmp_path / f"{method}.json")
        assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / f"{method}.onnx")).graph.node)
