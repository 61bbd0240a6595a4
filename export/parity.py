"""Gate images and the two export gates: fp32 parity (ORT vs torch) and int8 (accuracy + agreement).

Every image goes through the runtime's own reading and preprocessing: a pre-cropped dataset face
is the whole image, prepared exactly as training evaluated it and as the runtime does for
detector ``none`` (``preprocess.prepare_precropped``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..runtime.datasets import IMAGE_EXTS, DataFormatError, Record, is_holdout, label_arrays, read_dataset
from ..runtime.imageio import ImageError, read_image
from ..runtime.metrics import age_gender_metrics
from ..runtime.model import create_session
from ..runtime.timing import timed
from ..runtime.preprocess import prepare_precropped, to_input

log = logging.getLogger(__name__)

PARITY_MIN_IMAGES = 64
CONFIDENT_MARGIN = 0.1
METRIC_KEYS = ("age_exact", "age_1off", "gender_acc")
# the int8 gate's defaults (export-onnx options and ExportConfig read these)
DEFAULT_MAX_DROP_PT = 0.5
DEFAULT_MIN_AGREEMENT: tuple[tuple[str, float], ...] = (("age", 0.97), ("gender", 0.99))


def face_of(path: str | os.PathLike, size: int) -> np.ndarray:
    """A pre-cropped face image as the model sees it: (size, size, 3) uint8 RGB."""
    return prepare_precropped(read_image(path), size)


@dataclass
class FaceSet:
    """Decoded faces with their records (labels may be absent)."""

    faces: np.ndarray  # uint8 [N, S, S, 3]
    records: list[Record]
    failed: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def take(self, n: int) -> "FaceSet":
        return FaceSet(self.faces[:n], self.records[:n], 0)


def load_faces(records: list[Record], size: int, limit: int, desc: str, seed: int = 0,
               progress: bool = True) -> FaceSet:
    """Decode up to ``limit`` faces from ``records`` in a seeded random order, skipping unreadable ones."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    faces: list[np.ndarray] = []
    kept: list[Record] = []
    failed = 0
    with tqdm(total=min(limit, len(records)), desc=desc, unit="img", leave=False, disable=not progress,
              mininterval=1) as bar:
        for i in order:
            if len(kept) >= limit:
                break
            try:
                faces.append(face_of(records[i].path, size))
            except ImageError as e:
                failed += 1
                log.debug("skipped %s", e)
                continue
            kept.append(records[i])
            bar.update(1)
    if failed:
        log.warning("%s: %d unreadable or missing images skipped", desc, failed)
    arr = np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)
    return FaceSet(arr, kept, failed)


def _plain_images(root: Path) -> list[Record]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    return [Record(str(p), None, None, p.name, None) for p in files]


@dataclass
class GateSources:
    """Which records calibrate and which judge, and why (``notes`` end up in parity.json)."""

    calib: list[Record]
    test: list[Record]
    calib_source: str
    test_source: str | None
    notes: list[str] = field(default_factory=list)


def resolve_sources(ckpt: dict[str, Any], calib_data: str | None, data_root: str | None = None) -> GateSources:
    """Calibration records (``--calib-data`` or the checkpoint's training folds) and test-fold records.

    Test = the checkpoint's test fold (fold == data.fold) without the holdout; training = the other
    folds without the holdout, as train-adience split them (holdout by file name); for a
    ``train-adience --final`` model (no test fold), test = its validation split, named in the
    checkpoint, and training = the rest. ``data_root``
    replaces the checkpoint's data root (the same dataset moved to another place).
    """
    notes: list[str] = []
    data = ckpt.get("data") or {}
    records: list[Record] = []
    root = data_root or data.get("root")
    if not root:
        notes.append("the checkpoint names no training data")
    elif not Path(root).exists():
        notes.append(f"the checkpoint's data {root} are absent")
    else:
        try:
            records, report = read_dataset(root, data.get("format") or "auto")
            log.info("checkpoint data: %s", report.describe())
        except DataFormatError as e:
            notes.append(f"the checkpoint's data cannot be read ({e})")
    holdout = float(data.get("holdout") or 0.0)
    if holdout:
        records = [r for r in records if not is_holdout(Path(r.path).name, holdout)]
    fold = data.get("fold")
    val_files = set(data.get("val_files") or []) if data.get("final") else set()
    if records and val_files:  # train-adience --final: no test fold; its validation split never trained
        test = [r for r in records if Path(r.path).name in val_files]
        train = [r for r in records if Path(r.path).name not in val_files]
        test_source = f"{root} validation split of the --final model (not trained on, holdout excluded)"
    elif records and fold is not None:
        test = [r for r in records if r.fold == fold]
        train = [r for r in records if r.fold != fold]
        test_source = f"{root} fold {fold} (test fold, holdout excluded)"
    else:
        if records:
            notes.append("the checkpoint has no test fold (trained on all folds)")
        test, train, test_source = [], records, None
    if calib_data:
        calib, calib_source = _calib_records(Path(calib_data)), str(calib_data)
        test_paths = {r.path for r in test}
        calib = [r for r in calib if r.path not in test_paths and not is_holdout(Path(r.path).name, holdout)]
    else:
        calib, calib_source = train, f"{root} training folds" if train else "none"
    return GateSources(calib, test, calib_source, test_source, notes)


def _calib_records(path: Path) -> list[Record]:
    """Any dataset the readers know, or else a plain folder of images."""
    try:
        records, report = read_dataset(path, "auto")
        log.info("calibration data: %s", report.describe())
        return records
    except DataFormatError:
        if path.is_dir():
            recs = _plain_images(path)
            if recs:
                log.info("calibration data: %d plain images under %s", len(recs), path)
                return recs
        raise


# --------------------------------------------------------------------------- inference
def ort_session(path: str | os.PathLike, threads: int | None = None):
    """The runtime's own session (same options as ``agegender-run``)."""
    return create_session(path, threads)


def predict_ort(session, faces: np.ndarray, batch: int = 64, desc: str | None = None,
                progress: bool = True) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    steps = range(0, len(faces), batch)
    for s in tqdm(steps, desc=desc, leave=False, disable=not progress or desc is None or len(steps) < 4):
        for n, v in zip(names, session.run(names, {"image": to_input(faces[s:s + batch])})):
            outs[n].append(v)
    return {n: np.concatenate(v) for n, v in outs.items()}


def predict_torch(model, faces: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    import torch

    outs: dict[str, list[np.ndarray]] = {n: [] for n in model.output_names}
    with torch.inference_mode():
        for s in range(0, len(faces), batch):
            res = model(torch.from_numpy(to_input(faces[s:s + batch])))
            for n, v in zip(model.output_names, res):
                outs[n].append(v.float().numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


# --------------------------------------------------------------------------- gates
def nonfinite(probs: dict[str, np.ndarray]) -> list[str]:
    """Outputs that hold NaN or inf (a diverged model): every gate fails on them."""
    return [f"{name} has {int((~np.isfinite(v)).sum())} non-finite values" for name, v in probs.items()
            if not np.isfinite(v).all()]


def parity_gate(torch_probs: dict[str, np.ndarray], ort_probs: dict[str, np.ndarray],
                tol: float = 1e-4) -> dict[str, Any]:
    """fp32 ONNX vs torch: finite outputs, max |Δprob| <= tol and identical top-1 on every image."""
    bad = nonfinite(torch_probs) + nonfinite(ort_probs)
    max_diff = 0.0
    mismatches: dict[str, int] = {}
    for name, ref in torch_probs.items():
        got = ort_probs[name]
        if ref.size and not bad:
            max_diff = max(max_diff, float(np.max(np.abs(got - ref))))
        mismatches[name] = int((got.argmax(1) != ref.argmax(1)).sum())
    n = len(next(iter(torch_probs.values())))
    passed = not bad and max_diff <= tol and not any(mismatches.values())
    return {"passed": passed, "images": n, "max_abs_diff": None if bad else max_diff, "tolerance": tol,
            "top1_mismatches": mismatches, "nonfinite": bad}


def metrics_of(probs: dict[str, np.ndarray], records: list[Record]) -> dict[str, float | int]:
    age, gender, scored = label_arrays(records)
    ap = probs["age_probs"].argmax(1) if "age_probs" in probs else None
    gp = probs["gender_probs"].argmax(1) if "gender_probs" in probs else None
    return age_gender_metrics(age if ap is not None else None, ap, gender if gp is not None else None, gp, scored)


def _top1_lead(probs: np.ndarray) -> np.ndarray:
    """How far each row's top-1 probability leads its second."""
    top2 = np.sort(probs, 1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], margin: float = 0.0) -> dict[str, float]:
    """Top-1 agreement per head: {"age": ..., "gender": ...}; with ``margin`` > 0 only over the faces
    whose top-1 probability in ``a`` leads the second by at least ``margin`` (1.0 when there are none)."""
    out = {}
    for name, pa in a.items():
        if not len(pa):
            continue
        same = (pa.argmax(1) == b[name].argmax(1))[_top1_lead(pa) >= margin]
        out[name.removesuffix("_probs")] = float(same.mean()) if len(same) else 1.0
    return out


def confident_agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray], margin: float = CONFIDENT_MARGIN
                        ) -> dict[str, dict[str, float]]:
    """For the report: agreement on the faces where ``a`` is not near a tie, and their share. Flips
    between two nearly equal classes change no accuracy but weigh on plain agreement."""
    agree = agreement(a, b, margin)
    return {name.removesuffix("_probs"): {"margin": margin,
                                          "share_of_faces": float((_top1_lead(pa) >= margin).mean()),
                                          "agreement": agree[name.removesuffix("_probs")]}
            for name, pa in a.items() if len(pa)}


@dataclass(frozen=True)
class Int8Thresholds:
    max_drop_pt: float = DEFAULT_MAX_DROP_PT  # accuracy drop allowed on every metric, percentage points
    min_agreement: tuple[tuple[str, float], ...] = DEFAULT_MIN_AGREEMENT
    agreement_margin: float = 0.0  # > 0: agreement counted only where fp32's top-1 leads by this much

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop_pt": self.max_drop_pt, "min_agreement": dict(self.min_agreement),
                "agreement_margin": self.agreement_margin}


def int8_gate(fp32_probs: dict[str, np.ndarray], int8_probs: dict[str, np.ndarray],
              records: list[Record] | None, th: Int8Thresholds) -> dict[str, Any]:
    """Accuracy drop (when ``records`` carry labels) and top-1 agreement of int8 with fp32."""
    failures: list[str] = [f"fp32 {b}" for b in nonfinite(fp32_probs)] + [f"int8 {b}" for b in nonfinite(int8_probs)]
    agree = agreement(fp32_probs, int8_probs, th.agreement_margin)
    for head, need in th.min_agreement:
        if head in agree and agree[head] < need:
            failures.append(f"{head} agreement {agree[head]:.4f} < {need:.4f}")
    out: dict[str, Any] = {"images": len(next(iter(fp32_probs.values()))), "agreement": agree,
                           "agreement_all_faces": agreement(fp32_probs, int8_probs),
                           "agreement_confident": confident_agreement(fp32_probs, int8_probs)}
    if "age_probs" in fp32_probs and len(fp32_probs["age_probs"]):
        a32, a8 = fp32_probs["age_probs"].argmax(1), int8_probs["age_probs"].argmax(1)
        out["age_agreement_1off"] = float((np.abs(a32 - a8) <= 1).mean())
    if records is not None:
        m32, m8 = metrics_of(fp32_probs, records), metrics_of(int8_probs, records)
        drops = {k: (m32[k] - m8[k]) * 100.0 for k in METRIC_KEYS if k in m32 and not math.isnan(m32[k])}
        for k, d in drops.items():
            if d > th.max_drop_pt + 1e-9:
                failures.append(f"{k} drop {d:.2f} pt > {th.max_drop_pt:g} pt")
        out.update(fp32_metrics=m32, int8_metrics=m8, drop_pt=drops)
    out["failures"] = failures
    out["passed"] = not failures
    out["slack"] = _slack(out, th)
    return out


def _slack(res: dict[str, Any], th: Int8Thresholds) -> float:
    """The smallest margin to a threshold (negative = failed), to pick the best of failed attempts."""
    margins = [res["agreement"][h] - need for h, need in th.min_agreement if h in res["agreement"]]
    margins += [(th.max_drop_pt - d) / 100.0 for d in res.get("drop_pt", {}).values()]
    return min(margins) if margins else 0.0


def latency_ms(path: str | os.PathLike, face: np.ndarray, runs: int = 50, warmup: int = 5) -> float:
    """Median ORT latency for one face (batch 1) at 1 thread, in milliseconds."""
    sess = ort_session(path, threads=1)
    names = [o.name for o in sess.get_outputs()]
    x = to_input(face[None])
    return float(statistics.median(timed(lambda: sess.run(names, {"image": x}), runs, warmup)))
