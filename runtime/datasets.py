"""Dataset readers: Adience (official folds), UTKFace (labels in file names), CSV.

They live in the runtime (stdlib only) because training, the export gates and evaluation all
read labelled data, and imports only point train -> export -> runtime.

Every reader returns one record type and a report of what it skipped; none needs the images
to exist (EDA works on metadata alone), and missing images are counted, never a crash.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .imageio import IMAGE_EXTS
from .labels import AGE_GROUPS, age_in_group, age_to_group, gender_to_index

ADIENCE_FOLDS = 5
ADIENCE_HEADER = ("user_id", "original_image", "face_id", "age", "gender")
_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)


class DataFormatError(ValueError):
    """The data directory or a label file is not in a format this reader understands."""


@dataclass(frozen=True)
class Record:
    """One labelled face image."""

    path: str
    age: int | None  # age-group index or None (no age label)
    gender: int | None  # 0 male, 1 female, None unknown
    subject: str  # identity / group id (folds and validation never split a subject)
    fold: int | None
    exact_age: float | None = None  # an exact age when the source has one (UTKFace, CSV)


@dataclass
class DataReport:
    format: str
    root: str
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    missing_images: int = 0

    def describe(self) -> str:
        parts = [f"{self.rows} rows ({self.format}, {self.root})"]
        if self.missing_images:
            parts.append(f"{self.missing_images} images missing")
        for reason, n in sorted(self.skipped.items()):
            parts.append(f"{n} skipped: {reason}")
        return "; ".join(parts)


def stable_bucket(name: str, buckets: int, salt: str = "") -> int:
    """A bucket in [0, buckets) from a hash of ``name`` that never changes between runs."""
    digest = hashlib.sha1(f"{salt}{name}".encode("utf-8")).hexdigest()
    return int(digest[:12], 16) % buckets


def is_holdout(name: str, fraction: float) -> bool:
    """True for the stable ``fraction`` of names kept out of training and CV entirely."""
    return fraction > 0 and stable_bucket(name, 10_000, salt="holdout:") < fraction * 10_000


# --------------------------------------------------------------------------- Adience
def adience_image_path(root: Path, user_id: str, face_id: str, original: str) -> Path | None:
    """The image of one fold-file row in either real Adience layout, or None when absent."""
    for folder, prefix in (("aligned", "landmark_aligned_face"), ("faces", "coarse_tilt_aligned_face")):
        p = root / folder / user_id / f"{prefix}.{face_id}.{original}"
        if p.is_file():
            return p
    return None


def _fold_file(root: Path, k: int) -> Path:
    return root / f"fold_{k}_data.txt"


def read_adience(root: str | os.PathLike, check_images: bool = True) -> tuple[list[Record], DataReport]:
    root = Path(root)
    report = DataReport("adience", str(root))
    records: list[Record] = []
    missing_files = [str(_fold_file(root, k).name) for k in range(ADIENCE_FOLDS) if not _fold_file(root, k).is_file()]
    if missing_files:
        raise DataFormatError(f"{root}: not an Adience data dir: missing {', '.join(missing_files)} "
                              f"(expected fold_0_data.txt ... fold_4_data.txt and images in aligned/ or faces/)")
    for k in range(ADIENCE_FOLDS):
        path = _fold_file(root, k)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataFormatError(f"{path}: cannot read fold file: {e}") from e
        if not lines:
            raise DataFormatError(f"{path}:1: empty fold file (expected a tab-separated header "
                                  f"starting with {', '.join(ADIENCE_HEADER)})")
        header = tuple(c.strip() for c in lines[0].split("\t"))
        if header[: len(ADIENCE_HEADER)] != ADIENCE_HEADER:
            raise DataFormatError(f"{path}:1: unexpected header {lines[0][:80]!r}; expected tab-separated "
                                  f"columns starting with {', '.join(ADIENCE_HEADER)}")
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < len(ADIENCE_HEADER):
                raise DataFormatError(f"{path}:{lineno}: expected at least {len(ADIENCE_HEADER)} tab-separated "
                                      f"columns, found {len(cols)}: {line[:80]!r}")
            user, original, face_id, age_raw, gender_raw = (c.strip() for c in cols[:5])
            if not user or not original or not face_id:
                raise DataFormatError(f"{path}:{lineno}: empty user_id, original_image or face_id")
            report.rows += 1
            img = adience_image_path(root, user, face_id, original) if check_images else None
            if check_images and img is None:
                report.missing_images += 1
            rel = img if img is not None else root / "aligned" / user / f"landmark_aligned_face.{face_id}.{original}"
            records.append(Record(str(rel), age_to_group(age_raw), gender_to_index(gender_raw), user, k))
    return records, report


# --------------------------------------------------------------------------- UTKFace
def parse_utkface_name(name: str) -> tuple[int, int] | None:
    """(age, gender) from ``age_gender_race_datetime.jpg.chip.jpg``; None when malformed."""
    m = _UTK_NAME.match(name)
    if not m:
        return None
    age, gender = int(m.group(1)), int(m.group(2))
    if gender not in (0, 1) or age > 120:
        return None
    return age, gender


def read_utkface(root: str | os.PathLike, folds: int = ADIENCE_FOLDS) -> tuple[list[Record], DataReport]:
    root = Path(root)
    report = DataReport("utkface", str(root))
    records: list[Record] = []
    if not root.is_dir():
        raise DataFormatError(f"{root}: not a directory (expected UTKFace images named age_gender_race_datetime.jpg)")
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS:
            continue
        parsed = parse_utkface_name(p.name)
        if parsed is None:
            report.skipped["malformed UTKFace name"] += 1
            continue
        age, gender = parsed
        report.rows += 1
        records.append(Record(str(p), age_to_group(age), gender, p.name, stable_bucket(p.name, folds), float(age)))
    if not records:
        raise DataFormatError(f"{root}: no UTKFace images found (expected names like 25_1_0_20170116174525125.jpg.chip.jpg)")
    return records, report


# --------------------------------------------------------------------------- CSV
def read_csv(path: str | os.PathLike, folds: int = ADIENCE_FOLDS) -> tuple[list[Record], DataReport]:
    """``path,age,gender[,fold][,subject]``; paths relative to the CSV's folder; age an integer or a group."""
    path = Path(path)
    report = DataReport("csv", str(path))
    records: list[Record] = []
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as e:
        raise DataFormatError(f"{path}: cannot open CSV: {e}") from e
    with fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if not {"path", "age", "gender"} <= set(cols):
            raise DataFormatError(f"{path}:1: CSV header must contain path,age,gender (optional fold,subject); got {cols}")
        for lineno, row in enumerate(reader, start=2):
            if None in row:  # DictReader's key for fields beyond the header's
                raise DataFormatError(f"{path}:{lineno}: {len(cols) + len(row[None])} fields, the header has "
                                      f"{len(cols)} (quote a path or label that holds a comma)")
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                raise DataFormatError(f"{path}:{lineno}: empty path")
            report.rows += 1
            img = Path(row["path"])
            if not img.is_absolute():
                img = path.parent / img
            if not img.is_file():
                report.missing_images += 1
            age_raw = row.get("age", "")
            exact = float(age_raw) if re.fullmatch(r"\d+(\.\d+)?", age_raw) else None
            age = age_to_group(exact if exact is not None else (age_raw or None))
            gender = gender_to_index(row.get("gender") or None)
            subject = row.get("subject") or img.name
            fold_raw = row.get("fold", "")
            if fold_raw:
                try:
                    fold = int(fold_raw)
                except ValueError:
                    raise DataFormatError(f"{path}:{lineno}: fold must be an integer, got {fold_raw!r}") from None
            else:
                fold = stable_bucket(subject, folds)
            records.append(Record(str(img), age, gender, subject, fold, exact))
    return records, report


# --------------------------------------------------------------------------- auto
def detect_format(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".csv":
        return "csv"
    if p.is_dir():
        if _fold_file(p, 0).is_file():
            return "adience"
        for child in p.iterdir():
            if child.is_file() and _UTK_NAME.match(child.name):
                return "utkface"
    raise DataFormatError(
        f"{p}: cannot tell the data format. Expected an Adience dir (fold_0_data.txt ... fold_4_data.txt with "
        f"aligned/ or faces/), a UTKFace dir (age_gender_race_datetime.jpg files) or a .csv file "
        f"(path,age,gender[,fold][,subject])")


def read_dataset(path: str | os.PathLike, fmt: str = "auto", check_images: bool = True) -> tuple[list[Record], DataReport]:
    """Read any supported dataset; ``fmt`` is auto|adience|utkface|csv."""
    if not Path(path).exists():
        raise DataFormatError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "adience":
        return read_adience(path, check_images=check_images)
    if fmt == "utkface":
        return read_utkface(path)
    if fmt == "csv":
        return read_csv(path)
    raise DataFormatError(f"unknown data format {fmt!r} (auto, adience, utkface, csv)")


def age_group_name(idx: int | None) -> str:
    return "none" if idx is None else AGE_GROUPS[idx]


def label_arrays(records: list[Record]):
    """(age [-1 = none], gender [-1 = unknown], age-scored mask) numpy arrays of a record list.

    Exact ages outside every group (UTKFace's 3, 35, ...) train but are not scored.
    """
    import numpy as np

    age = np.array([-1 if r.age is None else r.age for r in records], np.int64)
    gender = np.array([-1 if r.gender is None else r.gender for r in records], np.int64)
    scored = np.array([r.age is not None and (r.exact_age is None or age_in_group(r.exact_age)) for r in records],
                      bool)
    return age, gender, scored
