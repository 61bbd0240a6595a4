"""Dataset readers and the EDA: both Adience layouts, UTKFace names, CSV, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agegender.runtime.datasets import (DataFormatError, detect_format, parse_utkface_name, read_adience,
                                        read_csv, read_dataset, read_utkface, stable_bucket)
from fakedata import make_adience, make_csv

TRAIN = [sys.executable, "-c", "from agegender._entry import train_adience; train_adience()"]


@pytest.mark.parametrize("layout", ["aligned", "faces"])
def test_adience_both_layouts(tmp_path, layout):
    root = make_adience(tmp_path / "a", layout=layout)
    records, report = read_adience(root)
    assert len(records) == 60 and report.missing_images == 0
    assert all(Path(r.path).is_file() for r in records)
    assert {r.fold for r in records} == {0, 1, 2, 3, 4}
    # unknown gender and no-age rows are kept, labelled None
    assert any(r.gender is None for r in records) and any(r.age is None for r in records)
    # subject-exclusive folds
    by_subject = {}
    for r in records:
        by_subject.setdefault(r.subject, set()).add(r.fold)
    assert all(len(f) == 1 for f in by_subject.values())


def test_adience_missing_images_counted(tmp_path):
    root = make_adience(tmp_path / "a")
    victims = sorted((root / "aligned").rglob("*.jpg"))[:3]
    for v in victims:
        v.unlink()
    records, report = read_adience(root)
    assert len(records) == 60 and report.missing_images == 3


def test_adience_malformed_line_names_file_and_line(tmp_path):
    root = make_adience(tmp_path / "a")
    f = root / "fold_2_data.txt"
    lines = f.read_text().splitlines()
    lines.insert(3, "only\ttwo")
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"fold_2_data\.txt:4"):
        read_adience(root)


def test_adience_bad_header_and_missing_fold(tmp_path):
    root = make_adience(tmp_path / "a")
    (root / "fold_1_data.txt").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"fold_1_data\.txt:1: unexpected header"):
        read_adience(root)
    (root / "fold_4_data.txt").unlink()
    with pytest.raises(DataFormatError, match="fold_4_data.txt"):
        read_adience(root)


def test_wrong_directory_says_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="cannot tell the data format.*Adience.*UTKFace.*csv"):
        detect_format(tmp_path)


def test_utkface_names_and_stable_folds(tmp_path):
    d = tmp_path / "utk"
    d.mkdir()
    for name in ["25_1_0_20170116174525125.jpg.chip.jpg", "3_0_2_20161219140623097.jpg.chip.jpg",
                 "39_1_20170116174525125.jpg.chip.jpg", "x_0_0_1.jpg.chip.jpg"]:
        (d / name).write_bytes(b"x")
    records, report = read_utkface(d)
    assert [(r.exact_age, r.gender) for r in records] == [(25.0, 1), (3.0, 0)]
    assert report.skipped["malformed UTKFace name"] == 2
    assert records[0].fold == stable_bucket("25_1_0_20170116174525125.jpg.chip.jpg", 5)
    assert parse_utkface_name("116_0_0_20170120134921760.jpg.chip.jpg") == (116, 0)
    assert detect_format(d) == "utkface"


def test_csv_reader(tmp_path):
    csv_path = make_csv(tmp_path / "c", n=10)
    records, report = read_csv(csv_path)
    assert len(records) == 10 and report.missing_images == 0
    assert all(r.exact_age is not None and r.age is not None for r in records)
    extra = tmp_path / "c" / "more.csv"
    extra.write_text("path,age,gender\nimg_0000.jpg,25-32,f\nnope.jpg,,u\n")
    recs, rep = read_dataset(extra)
    assert recs[0].age == 4 and recs[0].gender == 1 and recs[1].age is None and recs[1].gender is None
    assert rep.missing_images == 1
    bad = tmp_path / "c" / "bad.csv"
    bad.write_text("file,label\na.jpg,3\n")
    with pytest.raises(DataFormatError, match="bad.csv:1: CSV header must contain path,age,gender"):
        read_dataset(bad)


def test_real_adience_metadata_counts(adience_meta):
    records, report = read_adience(adience_meta)
    assert len(records) == 19487 and len({r.subject for r in records}) == 168
    assert report.missing_images == 19487  # metadata only on this machine


def test_eda_reproduces_design_counts(adience_meta, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(TRAIN + ["--data", str(adience_meta), "--eda-only", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    s = json.loads((out / "eda" / "summary.json").read_text())
    assert s["rows"] == 19487 and s["users"] == 168 and s["no_age"] == 753
    assert s["age_groups"] == {"0-2": 2522, "4-6": 2181, "8-12": 2301, "15-20": 1805, "25-32": 5315,
                               "38-43": 2796, "48-53": 910, "60-100": 904}
    assert s["missing_images"] == 19487 and s["subjects_in_several_folds"] == 0
    assert sum(f["rows"] for f in s["per_fold"].values()) == 19487
    assert s["genders"]["male"] + s["genders"]["female"] + s["genders"]["unknown"] == 19487
    for name in ("label_counts.csv", "label.json", "age_gender_counts.png", "per_fold_counts.png"):
        assert (out / "eda" / name).stat().st_size > 0
    labels = json.loads((out / "eda" / "label.json").read_text())
    unique = {r.path for r in read_adience(adience_meta)[0]}  # a few fold rows repeat an image
    assert set(labels) == unique and all(v["age_group"] for v in labels.values())


def test_eda_bad_data_dir_is_one_clear_error(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    res = subprocess.run(TRAIN + ["--data", str(tmp_path), "--eda-only", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "cannot tell the data format" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "eda" / "summary.json").exists()
