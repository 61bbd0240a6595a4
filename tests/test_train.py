"""train-adience end to end on a small dataset in the real Adience layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch

from agegender.export.net import load_checkpoint, net_from_checkpoint
from agegender.export.parity import resolve_sources
from agegender.runtime.datasets import read_dataset
from agegender.runtime.imageio import read_image
from agegender.runtime.preprocess import prepare_precropped, to_input
from agegender.runtime.datasets import label_arrays
from agegender.train.data import FaceDataset, build_cache
from agegender.train.run import fold_split
from fakedata import make_adience, make_csv

TRAIN = [sys.executable, "-c", "from agegender._entry import train_adience; train_adience()"]
QUICK = ["--arch", "mobilenetv3_small_050", "--img-size", "64", "--epochs", "2", "--batch-size", "32",
         "--no-pretrained", "-q"]


def train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def adience(tmp_path_factory) -> Path:
    return make_adience(tmp_path_factory.mktemp("data") / "adience")


@pytest.fixture(scope="module")
def full_run(adience, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "o"
    res = train("--data", str(adience), "--folds", "all", "--out", str(out), *QUICK)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mean" in res.stdout  # the one-screen table
    return out


def test_five_folds_write_logs_checkpoints_and_summary(full_run, adience):
    records, _ = read_dataset(adience)
    for k in range(5):
        d = full_run / f"fold{k}"
        log = (d / "train_log.txt").read_text()
        assert "epoch   1/2" in log and "epoch   2/2" in log and "test (best epoch" in log
        assert (d / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
        ckpt = load_checkpoint(d / "best.pt")
        assert ckpt["fold"] == k and ckpt["model_args"]["arch"] == "mobilenetv3_small_050"
        assert ckpt["model_args"]["img_size"] == 64 and "test" in ckpt["metrics"]
        assert ckpt["labels"]["age_groups"][0] == "0-2" and "torch" in ckpt["versions"]
        assert ckpt["data"]["fold"] == k and Path(ckpt["data"]["root"]) == adience.resolve()
        assert (d / "last.pt").is_file() and (d / "confusion_age.png").is_file()
    s = json.loads((full_run / "summary.json").read_text())
    # the run tested each fold on the split fold_split gives (checked for exclusivity below)
    ok = np.ones(len(records), bool)
    assert [f["n_test"] for f in s["folds"]] == [len(fold_split(records, ok, k, 0.1, 42)[2]) for k in range(5)]
    assert [f["fold"] for f in s["folds"]] == [0, 1, 2, 3, 4]
    assert set(s["mean"]) == {"age_exact", "age_1off", "gender_acc"} == set(s["std"])
    assert all(f["n_test"] == 12 for f in s["folds"])
    assert (full_run / "summary.csv").is_file() and (full_run / "curves.png").is_file()
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["folds"] == [0, 1, 2, 3, 4] and cfg["arch"] == "mobilenetv3_small_050"


def _assert_subject_exclusive(records, ok, k: int) -> tuple[set, set, set]:
    tr, va, te = fold_split(records, ok, k, 0.1, 42)
    subjects = [{records[i].subject for i in part} for part in (tr, va, te)]
    assert all(len(part) for part in (tr, va, te))
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2]), k
    assert {records[i].fold for i in te} == {k} and ok[np.concatenate([tr, va, te])].all()
    return tuple(subjects)


def test_fold_splits_never_share_a_subject(adience, tmp_path):
    """No subject in two of train/validation/test, from the records' subject field: Adience's folds, and
    a CSV whose fold column puts one subject in two folds (its other-fold images leave training)."""
    records, _ = read_dataset(adience)
    ok = np.ones(len(records), bool)
    ok[3] = False  # an unreadable image is in no split
    for k in range(5):
        _assert_subject_exclusive(records, ok, k)
    csv_path = make_csv(tmp_path / "c", n=40)
    rows = csv_path.read_text().splitlines()
    rows = ["path,age,gender,fold,subject"] + [f"{r},{'s0' if i < 4 else f'u{i}'}" for i, r in enumerate(rows[1:])]
    csv_path.write_text("\n".join(rows) + "\n")  # s0 = rows 0-3, in folds 0, 1, 2, 3
    records, _ = read_dataset(csv_path)
    ok = np.ones(len(records), bool)
    for k in range(5):
        train_s, val_s, test_s = _assert_subject_exclusive(records, ok, k)
        assert ("s0" in test_s) == (k < 4) and len(train_s | val_s | test_s) == 37


def test_final_trains_one_model_on_every_fold_and_qat_fine_tunes_on_its_split(adience, tmp_path):
    """--final: every readable image trains or validates (no test fold, no subject in both); a resume
    keeps the finished model; --qat-from re-derives the same split from the checkpoint alone."""
    from agegender.train.qat import QatConfig, load_split
    from agegender.train.run import final_split

    out = tmp_path / "final"
    res = train("--data", str(adience), "--final", "--out", str(out), *QUICK, "--epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "final" in res.stdout and "no test fold" in res.stdout
    ckpt = load_checkpoint(out / "final" / "best.pt")
    assert ckpt["fold"] is None and ckpt["data"]["final"] is True and ckpt["data"]["fold"] is None
    records, _ = read_dataset(adience)
    tr, va, te = final_split(records, np.ones(len(records), bool), 0.1, 42)
    assert len(te) == 0 and len(tr) + len(va) == len(records)
    assert not {records[i].subject for i in tr} & {records[i].subject for i in va}
    log = (out / "final" / "train_log.txt").read_text()
    assert f"train={len(tr)} val={len(va)} test=0" in log
    summary = json.loads((out / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == ["final"]
    assert json.loads((out / "final" / "result.json").read_text())["scored_on"] == "validation"
    assert json.loads((out / "config.json").read_text())["final"] is True
    again = train("--data", str(adience), "--final", "--out", str(out), *QUICK, "--epochs", "1", "--resume")
    assert again.returncode == 0 and "finished earlier" in again.stderr
    split = load_split(ckpt, QatConfig(checkpoint="x", out="y", cache_dir=str(tmp_path / "cache"), progress=False))
    assert sorted(split.train) == sorted(tr) and sorted(split.val) == sorted(va) and len(split.test) == 0
    # export-onnx's gate scores a --final model on its validation faces, calibrates on the rest
    src = resolve_sources(ckpt, None)
    assert sorted(r.path for r in src.test) == sorted(records[i].path for i in va)
    assert sorted(r.path for r in src.calib) == sorted(records[i].path for i in tr)


def test_final_with_folds_is_a_usage_error(adience, tmp_path):
    res = train("--data", str(adience), "--final", "--folds", "0", "--out", str(tmp_path / "o"), *QUICK)
    assert res.returncode == 2 and "--final" in res.stderr and "Traceback" not in res.stderr


def test_checkpoint_rebuilds_the_model_from_the_file_alone(full_run):
    ckpt = load_checkpoint(full_run / "fold0" / "best.pt")
    net = net_from_checkpoint(ckpt)
    out = net(torch.zeros(2, 3, 64, 64))
    assert out["age"].shape == (2, 8) and out["gender"].shape == (2, 2)


def test_distillation_from_a_teacher_checkpoint(full_run, adience, tmp_path):
    out = tmp_path / "student"
    res = train("--data", str(adience), "--folds", "0", "--out", str(out), *QUICK, "--img-size", "48",
                "--arch", "mobilenetv3_small_050", "--teacher", str(full_run / "fold0" / "best.pt"), "--epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt = load_checkpoint(out / "fold0" / "best.pt")
    assert ckpt["config"]["teacher"].endswith("best.pt") and ckpt["model_args"]["img_size"] == 48


def test_existing_out_is_refused_without_resume_or_force(full_run, adience):
    res = train("--data", str(adience), "--folds", "0", "--out", str(full_run), *QUICK)
    assert res.returncode == 1 and "--resume" in res.stderr and "Traceback" not in res.stderr


def test_resume_keeps_finished_folds_and_continues_the_running_one(adience, tmp_path, monkeypatch):
    from agegender.train import engine
    from agegender.train.cli import main

    out = tmp_path / "o"
    args = ["--data", str(adience), "--folds", "0,1", "--out", str(out), *QUICK]
    real_save = engine.save_checkpoint

    def interrupted_save(path, ckpt):  # the process dies right after fold 1 saved epoch 1
        real_save(path, ckpt)
        if Path(path).name == "last.pt" and ckpt["fold"] == 1 and ckpt["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", interrupted_save)
    with pytest.raises((KeyboardInterrupt, click.exceptions.Abort)):
        main(args, standalone_mode=False)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert (out / "fold0" / "result.json").is_file() and not (out / "fold1" / "result.json").exists()
    # the summary of the folds finished so far is already written
    assert [f["fold"] for f in json.loads((out / "summary.json").read_text())["folds"]] == [0]
    fold0_mtime = (out / "fold0" / "best.pt").stat().st_mtime_ns

    res = train(*args, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fold 0: finished earlier" in res.stderr and "fold 1: resuming at epoch 2" in res.stderr
    assert (out / "fold0" / "best.pt").stat().st_mtime_ns == fold0_mtime
    assert (out / "fold1" / "result.json").is_file()
    assert (out / "fold1" / "metrics.csv").read_text().count("\n") == 3
    assert "epoch   1/2" in (out / "fold1" / "train_log.txt").read_text()
    # a resume with different options is refused
    res = train("--data", str(adience), "--folds", "0,1", "--out", str(out), "--resume", *QUICK, "--lr", "0.1")
    assert res.returncode == 1 and "differ" in res.stderr and "lr" in res.stderr
    # a resume without --folds continues the saved folds only; one naming fewer folds keeps the others
    for folds in ([], ["--folds", "1"]):
        res = train("--data", str(adience), *folds, "--out", str(out), "--resume", *QUICK)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "fold 0: finished earlier" in res.stderr and "fold 1: finished earlier" in res.stderr
        assert "fold 2" not in res.stderr
        assert [f["fold"] for f in json.loads((out / "summary.json").read_text())["folds"]] == [0, 1]
        assert json.loads((out / "config.json").read_text())["folds"] == [0, 1]
    # naming a new fold adds it: trained, the others untouched, the summary covers all three
    res = train("--data", str(adience), "--folds", "2", "--out", str(out), "--resume", *QUICK)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fold 0: finished earlier" in res.stderr and (out / "fold2" / "result.json").is_file()
    assert (out / "fold0" / "best.pt").stat().st_mtime_ns == fold0_mtime
    assert [f["fold"] for f in json.loads((out / "summary.json").read_text())["folds"]] == [0, 1, 2]


def test_eval_transform_is_the_runtime_preprocessing(adience):
    records, _ = read_dataset(adience)
    faces, ok = build_cache(records[:5], 48, progress=False)
    age, gender, _ = label_arrays(records[:5])
    ds = FaceDataset(faces, np.arange(5), age, gender, transform=None)
    for i in range(5):
        x, a, g = ds[i]
        runtime_input = to_input([prepare_precropped(read_image(records[i].path), 48)])[0]
        np.testing.assert_array_equal(x.numpy(), runtime_input)


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    csv_path = make_csv(tmp_path / "c", n=40, size=40)
    (tmp_path / "c" / "img_0003.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "c" / "img_0007.jpg").unlink()
    res = train("--data", str(csv_path), "--folds", "0", "--out", str(tmp_path / "o"),
                "--arch", "mobilenetv3_small_050", "--epochs", "1", "--batch-size", "16", "--img-size", "32",
                "--no-pretrained", "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 of 40 images missing or unreadable" in res.stderr


def test_task_without_labels_is_a_clear_error(tmp_path):
    d = tmp_path / "c"
    csv_path = make_csv(d, n=10)
    csv_path.write_text("\n".join(l.split(",")[0] + ",," + ("u" if i else "gender") if i else "path,age,gender"
                                  for i, l in enumerate(csv_path.read_text().splitlines())) + "\n")
    res = train("--data", str(csv_path), "--task", "age", "--out", str(tmp_path / "o"), *QUICK)
    assert res.returncode == 1 and "no image has an age label" in res.stderr and "Traceback" not in res.stderr


def test_pretrained_failure_names_the_alternatives(adience, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(TRAIN + ["--data", str(adience), "--out", str(tmp_path / "o"), "--arch",
                                  "mobilenetv3_small_050", "--epochs", "1"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 1
    assert "--no-pretrained" in res.stderr and "--init-weights" in res.stderr and "Traceback" not in res.stderr


def test_torchrun_two_cpu_ranks(adience, tmp_path):
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           "-m", "agegender.train", "--data", str(adience), "--folds", "0", "--out", str(out), *QUICK,
           "--device", "cpu", "--epochs", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "fold0" / "best.pt").is_file() and (out / "summary.json").is_file()
    log = (out / "fold0" / "train_log.txt").read_text()
    assert log.count("epoch   1/1") == 1  # only rank 0 writes
