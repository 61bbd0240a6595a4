"""The int8 gate judges every kernel path it can reach, and quantization-aware fine-tuning gives a
checkpoint whose weights sit on the 7-bit grid the export writes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from agegender.export import kernels
from agegender.export.fakequant import WEIGHT_QMAX, conv_bn_pairs
from agegender.export.net import AgeGenderNet, ModelArgs, load_checkpoint, save_checkpoint
from agegender.export.onnx_export import ExportConfig, GateFailed, run_export
from agegender.runtime.model import OnnxClassifier
from agegender.train.qat import QatConfig, run_qat
from fakedata import tiny_checkpoint

ARCH, SIZE = "mobilenetv3_small_050", 32
LOOSE = dict(max_drop=100.0, min_agreement=(("age", 0.0), ("gender", 0.0)), latency_runs=2, progress=False,
             parity_size=64, islands=False)

# A stand-in for an emulated CPU whose int8 kernels answer differently: it runs the real probe, then
# moves every face's age answer one group up.
WRONG_CPU = """
import subprocess, sys
import numpy as np
rc = subprocess.call(sys.argv[1:])
out = sys.argv[-1]
z = dict(np.load(out))
z["age_probs"] = np.roll(z["age_probs"], 1, axis=1)
np.savez(out, **z)
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A generated CSV dataset and a checkpoint trained a few steps on its training folds."""
    torch.set_num_threads(1)
    return tiny_checkpoint(tmp_path_factory.mktemp("int8paths"), ARCH, SIZE, crop_margin=0.0)


def test_combine_fails_when_any_judged_path_fails_and_lists_unjudged_ones():
    ok = {"passed": True, "failures": [], "slack": 0.02, "agreement": {"age": 0.99}}
    bad = {"passed": False, "failures": ["age agreement 0.8800 < 0.9700"], "slack": -0.09, "agreement": {"age": 0.88}}
    gate = kernels.combine({"host": ok, "exact": ok, "avx2": bad})
    assert not gate["passed"]
    assert gate["failures"] == ["avx2: age agreement 0.8800 < 0.9700"]
    assert gate["slack"] == pytest.approx(-0.09)
    assert gate["agreement"] == {"age": 0.99}  # the host's numbers on top
    gate = kernels.combine({"host": ok, "exact": ok, "avx2": {"judged": False, "reason": "no qemu"}})
    assert gate["passed"] and gate["not_judged"] == {"avx2": "no qemu"}


def test_without_qemu_the_avx2_path_is_reported_not_judged(monkeypatch, tmp_path):
    monkeypatch.delenv(kernels.EMULATOR_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-x86_64-static on it
    prefix, why = kernels.emulator()
    if kernels.platform.machine().lower() in ("x86_64", "amd64"):
        assert prefix is None and "qemu-x86_64-static is not installed" in why
    else:
        assert prefix is None and "not x86" in why


def test_export_records_every_path(tiny, tmp_path):
    out = tmp_path / "m"
    rep = run_export(ExportConfig(checkpoint=str(tiny["ckpt"]), out=str(out), quantize=True, **LOOSE))
    paths = rep["int8"]["gate"]["paths"]
    assert set(paths) == {"host", "exact", "avx2"}
    assert paths["host"]["passed"] and paths["exact"]["passed"]
    if kernels.host_saturates():
        assert paths["avx2"]["same_as"] == "host"
    else:  # the conftest runs the emulated path's subprocess natively
        assert paths["avx2"]["passed"] and paths["avx2"]["images"] > 0
    saved = json.loads((out / "parity.json").read_text())
    assert set(saved["int8"]["gate"]["paths"]) == {"host", "exact", "avx2"}


@pytest.mark.skipif(kernels.host_saturates(), reason="the host itself is the AVX2 path")
def test_a_cpu_that_answers_differently_fails_the_gate(tiny, tmp_path, monkeypatch):
    script = tmp_path / "wrong_cpu.py"
    script.write_text(WRONG_CPU)
    monkeypatch.setenv(kernels.EMULATOR_ENV, f"{sys.executable} {script}")
    out = tmp_path / "m"
    cfg = ExportConfig(checkpoint=str(tiny["ckpt"]), out=str(out), quantize=True,
                       **{**LOOSE, "min_agreement": (("age", 0.5), ("gender", 0.0))})
    with pytest.raises(GateFailed, match="avx2: age agreement"):
        run_export(cfg)
    assert not (out / "agegender_int8.onnx").exists()
    rep = json.loads((out / "parity.json").read_text())
    assert rep["int8"]["gate"]["paths"]["host"]["passed"]
    assert not rep["int8"]["gate"]["paths"]["avx2"]["passed"]


def test_nan_weights_fail_the_export(tiny, tmp_path):
    ckpt = load_checkpoint(tiny["ckpt"])
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.ndim == 4)
    ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", ckpt)
    out = tmp_path / "m"
    with pytest.raises(Exception, match="NaN or inf"):
        run_export(ExportConfig(checkpoint=str(tmp_path / "nan.pt"), out=str(out), **LOOSE))
    assert not (out / "agegender_fp32.onnx").exists()


def test_qat_puts_weights_on_the_grid_and_exports_with_its_scheme(tiny, tmp_path):
    qat_path = tmp_path / "qat.pt"
    run_qat(QatConfig(checkpoint=str(tiny["ckpt"]), out=str(qat_path), epochs=1, batch_size=16, progress=False))
    ckpt = load_checkpoint(qat_path)
    assert ckpt["qat"]["weight_qmax"] == WEIGHT_QMAX and ckpt["qat"]["act_ranges"]
    assert ckpt["qat"]["start_metrics"]["test"]
    net = AgeGenderNet(ModelArgs.from_dict(ckpt["model_args"]))
    net.load_state_dict(ckpt["model"])
    for _, conv, bn in conv_bn_pairs(net, SIZE):
        w = conv.weight.detach()
        scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / WEIGHT_QMAX
        q = w / scale.clamp_min(1e-12)
        assert torch.allclose(q, q.round(), atol=1e-3)  # exactly on the -64..64 grid
        if bn is not None:  # folded: the norm only adds the bias
            assert torch.allclose(bn.weight, torch.ones_like(bn.weight))
            assert torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    out = tmp_path / "m"
    rep = run_export(ExportConfig(checkpoint=str(qat_path), out=str(out), quantize=True, **LOOSE))
    assert rep["int8"]["settings"]["reduce_range"] is True
    agree = rep["int8"]["gate"]["qat"]["agreement_with_fakequant"]
    assert agree["age"] >= 0.9 and agree["gender"] >= 0.9  # the int8 file computes what QAT simulated
    assert "reduce_range" in OnnxClassifier(out / "agegender_int8.onnx").meta.quantization


def test_qat_without_its_data_says_which_data_it_needs(tiny, tmp_path):
    ckpt = load_checkpoint(tiny["ckpt"])
    ckpt["data"] = {**ckpt["data"], "root": str(tmp_path / "gone.csv")}
    save_checkpoint(tmp_path / "moved.pt", ckpt)
    with pytest.raises(Exception, match="needs the data the checkpoint was trained on"):
        run_qat(QatConfig(checkpoint=str(tmp_path / "moved.pt"), out=str(tmp_path / "q.pt"), progress=False))


def test_train_adience_qat_from_writes_a_qat_checkpoint_and_refuses_options_it_ignores(tiny, tmp_path):
    from click.testing import CliRunner

    from agegender.train.cli import main

    out = tmp_path / "qat"
    res = CliRunner().invoke(main, ["--qat-from", str(tiny["ckpt"]), "--out", str(out), "--batch-size", "16", "-q"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out / "qat.pt")["qat"]["epochs"] == 1  # the --qat-from default
    summary = json.loads((out / "qat.json").read_text())
    assert set(summary["calibration"]) == {"age", "gender"}
    res = CliRunner().invoke(main, ["--qat-from", str(tiny["ckpt"]), "--out", str(tmp_path / "q2"), "--arch", "resnet50"])
    assert res.exit_code == 2 and "--arch: not used by --qat-from" in res.output
    res = CliRunner().invoke(main, ["--qat-from", str(tiny["ckpt"]), "--out", str(out)])
    assert res.exit_code == 1 and "already exists" in res.output
