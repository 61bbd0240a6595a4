"""train-adience (and export-onnx's options) against careless or hostile inputs: stale caches, odd
batch sizes, malformed CSV rows and run configs, non-finite numbers, a full disk, one-class labels.
Each problem is one line on stderr with exit 1 (2 for a bad option value), never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agegender.export import cli as export_cli
from agegender.export import net as net_module
from agegender.export.net import CheckpointWriteError, ModelArgs, load_checkpoint, save_checkpoint
from agegender.runtime.cliutil import FiniteFloat
from agegender.runtime.datasets import read_dataset
from agegender.train import cli as train_cli
from agegender.train.config import TrainConfig
from agegender.train.data import build_cache
from agegender.train.engine import _make_optim
from agegender.train.run import check_labels
from fakedata import make_csv

TRAIN = [sys.executable, "-c", "from agegender._entry import train_adience; train_adience()"]
TINY = ["--arch", "mobilenetv3_small_050", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
        "--no-pretrained", "-q", "--folds", "0"]


def train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + list(map(str, args)), capture_output=True, text=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, code: int = 1) -> str:
    assert res.returncode == code, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return res.stderr.strip().splitlines()[-1]


@pytest.fixture()
def csv40(tmp_path) -> Path:
    return make_csv(tmp_path / "c", n=40, size=40)


# --------------------------------------------------------------------------- config and defaults
def test_options_are_the_config_fields_with_its_defaults():
    """One name list (the options), one source of defaults (TrainConfig, which reads ModelArgs)."""
    params = {p.name for p in train_cli.main.params} - set(train_cli.NOT_CONFIG)
    assert params == set(TrainConfig.field_names()) - {"timm_kwargs"}
    given = train_cli.main.make_context("train-adience", ["--data", ".", "--out", "o"]).params
    for name in params - {"data", "out", "folds"}:
        assert given[name] == TrainConfig.default(name), name
    model = ModelArgs()
    assert (TrainConfig.default("arch"), TrainConfig.default("img_size"), TrainConfig.default("drop_rate")) == \
        (model.arch, model.img_size, model.drop_rate)
    eparams = {p.name for p in export_cli.main.params} - set(export_cli.NOT_CONFIG)
    assert eparams <= set(export_cli.ExportConfig.__dataclass_fields__)


# --------------------------------------------------------------------------- #13 non-finite values
def _float_options(command: click.Command) -> list[click.Parameter]:
    return [p for p in command.params if isinstance(p.type, click.types.FloatParamType)]


@pytest.mark.parametrize("command,base", [
    (train_cli.main, ["--data", ".", "--out", "o"]),
    (export_cli.main, ["ckpt.pt", "--out", "o"]),
], ids=["train-adience", "export-onnx"])
def test_every_float_option_refuses_nan_and_inf(command, base):
    floats = _float_options(command)
    assert floats and all(isinstance(p.type, FiniteFloat) for p in floats), \
        [p.name for p in floats if not isinstance(p.type, FiniteFloat)]
    for p in floats:
        for bad in ("nan", "inf", "-inf"):
            res = CliRunner().invoke(command, [*base, p.opts[0], bad])
            assert res.exit_code == 2, (p.name, bad, res.output)
            assert "finite" in res.output or "range" in res.output, res.output
            assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("value", ["nan", "age=nan", "gender=inf"])
def test_export_min_agreement_refuses_non_finite(value):
    res = CliRunner().invoke(export_cli.main, ["ckpt.pt", "--out", "o", "--min-agreement", value])
    assert res.exit_code == 2 and "--min-agreement" in res.output


def test_export_defaults_are_the_gate_defaults():
    from agegender.export import parity

    given = export_cli.main.make_context("export-onnx", ["ckpt.pt", "--out", "o"]).params
    assert given["min_agreement"] == parity.DEFAULT_MIN_AGREEMENT and given["max_drop"] == parity.DEFAULT_MAX_DROP_PT
    for name in set(given) - set(export_cli.NOT_CONFIG) - {"checkpoint", "out", "data_root", "calib_data"}:
        assert given[name] == export_cli.ExportConfig.__dataclass_fields__[name].default, name


# --------------------------------------------------------------------------- #5 the face cache
def test_cache_is_keyed_by_image_content(csv40, tmp_path):
    records, _ = read_dataset(csv40)
    records = records[:6]
    cache = tmp_path / "cache"
    faces, ok = build_cache(records, 32, cache, progress=False)
    assert ok.all() and len(list(cache.glob("faces_32_*.npz"))) == 1
    # one image changes (same name, same size class): the cache must not answer with the old face
    img = cv2.imread(records[2].path)
    cv2.imwrite(records[2].path, 255 - img)
    st = os.stat(records[2].path)
    os.utime(records[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    faces2, ok2 = build_cache(records, 32, cache, progress=False)
    assert not np.array_equal(faces2[2], faces[2])
    np.testing.assert_array_equal(faces2, build_cache(records, 32, None, progress=False)[0])
    # a missing image that appears later is a new key too
    os.rename(records[4].path, records[4].path + ".away")
    _, ok3 = build_cache(records, 32, cache, progress=False)
    os.rename(records[4].path + ".away", records[4].path)
    _, ok4 = build_cache(records, 32, cache, progress=False)
    assert not ok3[4] and ok4.all()


def test_truncated_cache_is_rebuilt_with_a_warning(csv40, tmp_path, caplog):
    records, _ = read_dataset(csv40)
    records = records[:5]
    faces, _ = build_cache(records, 32, tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("faces_32_*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:300])
    again, ok = build_cache(records, 32, tmp_path, progress=False)
    np.testing.assert_array_equal(again, faces)
    assert ok.all() and "unreadable" in caplog.text and str(cache_file) in caplog.text
    with np.load(cache_file) as z:  # replaced by a good one
        np.testing.assert_array_equal(z["faces"], faces)


def test_force_starts_clean_even_over_a_corrupt_run(csv40, tmp_path):
    """A run whose images were missing, then added: --force reads them (no stale cache), and a corrupt
    config.json does not stand in the way of --force."""
    out = tmp_path / "o"
    away = tmp_path / "away"
    shutil.move(str(csv40.parent), str(away))
    (tmp_path / "c").mkdir()
    shutil.copy(away / "labels.csv", csv40)
    line = one_line_error(train("--data", csv40, "--out", out, *TINY))
    assert "none of the 40 images could be read" in line
    assert list((out / "cache").glob("*.npz"))
    for f in away.glob("*.jpg"):
        shutil.move(str(f), str(csv40.parent / f.name))
    (out / "config.json").write_text("{\n")
    line = one_line_error(train("--data", csv40, "--out", out, *TINY))
    assert str(out / "config.json") in line and "--force" in line
    external = tmp_path / "shared_cache"
    external.mkdir()
    (external / "faces_32_0000000000000000.npz").write_bytes(b"kept")
    stale = out / "cache" / "faces_32_ffffffffffffffff.npz"
    stale.write_bytes(b"stale")
    res = train("--data", csv40, "--out", out, *TINY, "--force")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "missing or unreadable" not in res.stderr and not stale.exists()
    assert json.loads((out / "config.json").read_text())["folds"] == [0]
    # an external --cache-dir may serve other runs (and is keyed by content): not ours to delete
    train_cli.clean_for_force(TrainConfig(data=str(csv40), out=str(out), cache_dir=str(external)))
    assert (external / "faces_32_0000000000000000.npz").is_file() and not (out / "fold0").exists()


# --------------------------------------------------------------------------- #10 tracebacks
def test_onecycle_of_four_steps_does_not_divide_by_zero():
    cfg = TrainConfig(data=".", out=".", lr=1e-3)
    net = torch.nn.Linear(2, 2)
    for steps in range(1, 12):
        opt, sched = _make_optim(cfg, net, steps)
        for _ in range(steps):
            opt.step()
            sched.step()


def test_batch_larger_than_the_data_trains_and_says_so(tmp_path):
    csv_path = make_csv(tmp_path / "c", n=120, size=32)
    res = train("--data", csv_path, "--out", tmp_path / "o", *TINY, "--epochs", "4", "--batch-size", "1024")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "one batch per epoch" in res.stderr and (tmp_path / "o" / "fold0" / "best.pt").is_file()


def test_csv_row_with_extra_fields_names_the_line(csv40, tmp_path):
    lines = csv40.read_text().splitlines()
    lines[3] += ",extra,fields"
    csv40.write_text("\n".join(lines) + "\n")
    line = one_line_error(train("--data", csv40, "--out", tmp_path / "o", *TINY))
    assert f"{csv40}:4:" in line and "header has 4" in line


@pytest.mark.parametrize("content", ["[1, 2]", "{\n", '{"folds": "abc"}', "\udcff"])
def test_unusable_run_config_names_the_file(csv40, tmp_path, content):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    for extra in ([], ["--resume"]):
        res = CliRunner().invoke(train_cli.main, ["--data", str(csv40), "--out", str(out), *TINY, *extra])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        line = res.output.strip().splitlines()[-1]
        assert str(out / "config.json") in line and "--force" in line


@pytest.mark.parametrize("content", ["{", "[]", '{"fold": 0}'])
def test_unusable_fold_result_names_the_file(tmp_path, content):
    from agegender.train.engine import load_result

    (tmp_path / "result.json").write_text(content)
    with pytest.raises(ValueError, match="result.json") as err:
        load_result(tmp_path)
    assert len(str(err.value).splitlines()) == 1


def test_resume_and_force_together_is_a_usage_error(csv40, tmp_path):
    res = CliRunner().invoke(train_cli.main, ["--data", str(csv40), "--out", str(tmp_path / "o"), "--resume",
                                              "--force"])
    assert res.exit_code == 2 and "--force" in res.output


# --------------------------------------------------------------------------- #17 a full disk
def _tiny_ckpt(epoch: int) -> dict:
    return {"format": net_module.CKPT_FORMAT, "format_version": 1, "model": {"w": torch.ones(1000) * epoch},
            "model_args": {}, "epoch": epoch}


def test_checkpoint_on_a_full_disk_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _tiny_ckpt(1))

    def full_disk_save(obj, f):  # what torch's zip writer raises when the disk fills up mid-file
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(net_module.torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=100))
    with pytest.raises(CheckpointWriteError, match="disk full") as err:
        save_checkpoint(path, _tiny_ckpt(2))
    assert str(path) in str(err.value) and "enforce fail" not in str(err.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def _can_mount_tmpfs(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs '{where}'"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_training_onto_a_full_disk_names_the_checkpoint(csv40, tmp_path):
    """A real full disk: --out on a 12 MB tmpfs (a private mount namespace) holds epoch 1's checkpoints
    but not epoch 2's last.pt."""
    out = tmp_path / "small_disk"
    out.mkdir()
    if not _can_mount_tmpfs(out):
        pytest.skip("cannot mount a private tmpfs here (unshare/user namespaces unavailable)")
    cmd = " ".join(f"'{a}'" for a in [*TRAIN, "--data", str(csv40), "--out", str(out / "run"),
                                      *TINY, "--epochs", "2", "--cache-dir", str(tmp_path / "cache")])
    script = (f"mount -t tmpfs -o size=12m tmpfs '{out}' && {cmd}; rc=$?; "
              f"{TRAIN[0]} -c 'import sys, torch; from agegender.export.net import load_checkpoint; "
              f"print(\"EPOCH\", load_checkpoint(sys.argv[1])[\"epoch\"])' '{out}/run/fold0/last.pt'; exit $rc")
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    line = next(ln for ln in err if ln.startswith("Error:"))
    assert "disk full" in line and "/run/fold0/" in line and ".pt" in line, line
    assert "Traceback" not in res.stderr and "enforce fail" not in res.stderr
    assert "EPOCH 1" in res.stdout  # the earlier checkpoint is intact


# --------------------------------------------------------------------------- #21 one class
@pytest.mark.parametrize("column,value,task,hint", [("age", "30", "age", "--task gender"),
                                                    ("gender", "f", "gender", "--task age")])
def test_one_class_for_a_trained_head_is_refused(csv40, tmp_path, column, value, task, hint):
    rows = csv40.read_text().splitlines()
    header = rows[0].split(",")
    i = header.index(column)
    csv40.write_text("\n".join([rows[0]] + [",".join(value if j == i else c for j, c in enumerate(r.split(",")))
                                            for r in rows[1:]]) + "\n")
    line = one_line_error(train("--data", csv40, "--out", tmp_path / "o", *TINY))
    assert f"every {task}-labelled image is" in line and hint in line
    # the other head alone may train
    records, _ = read_dataset(csv40)
    check_labels(TrainConfig(data=str(csv40), out="o", task=hint.split()[-1]), records)
    with pytest.raises(ValueError, match="one class"):
        check_labels(TrainConfig(data=str(csv40), out="o", task=task), records)
