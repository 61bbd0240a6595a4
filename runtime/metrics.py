"""Evaluation metrics (numpy only): age exact / 1-off accuracy and gender accuracy.

Missing labels are -1: they count in no metric. Age metrics take an optional mask so that,
on UTKFace, only exact ages that fall inside a group are scored.
"""

from __future__ import annotations

import numpy as np


def age_gender_metrics(age_true: np.ndarray | None, age_pred: np.ndarray | None,
                       gender_true: np.ndarray | None, gender_pred: np.ndarray | None,
                       age_mask: np.ndarray | None = None) -> dict[str, float | int]:
    """{"age_exact", "age_1off", "n_age", "gender_acc", "n_gender"} for whichever tasks are given."""
    out: dict[str, float | int] = {}
    if age_true is not None and age_pred is not None:
        at, ap = np.asarray(age_true), np.asarray(age_pred)
        keep = at >= 0
        if age_mask is not None:
            keep &= np.asarray(age_mask, bool)
        n = int(keep.sum())
        out["age_exact"] = float((at[keep] == ap[keep]).mean()) if n else float("nan")
        out["age_1off"] = float((np.abs(at[keep] - ap[keep]) <= 1).mean()) if n else float("nan")
        out["n_age"] = n
    if gender_true is not None and gender_pred is not None:
        gt, gp = np.asarray(gender_true), np.asarray(gender_pred)
        keep = gt >= 0
        n = int(keep.sum())
        out["gender_acc"] = float((gt[keep] == gp[keep]).mean()) if n else float("nan")
        out["n_gender"] = n
    return out


def confusion(true: np.ndarray, pred: np.ndarray, n_classes: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Confusion matrix [true, pred] over labelled (>= 0) samples."""
    t, p = np.asarray(true), np.asarray(pred)
    keep = t >= 0
    if mask is not None:
        keep &= np.asarray(mask, bool)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t[keep], p[keep]), 1)
    return cm


def per_class_accuracy(cm: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    rows = cm.sum(axis=1)
    return {n: (float(cm[i, i] / rows[i]) if rows[i] else float("nan")) for i, n in enumerate(names)}



def _top1(probs: np.ndarray, true: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 confidence, top-1 right) of the labelled (and masked-in) faces."""
    t = np.asarray(true)
    keep = t >= 0
    if mask is not None:
        keep &= np.asarray(mask, bool)
    p = np.asarray(probs)[keep]
    return p.max(1), p.argmax(1) == t[keep]


def _ece(conf: np.ndarray, right: np.ndarray, bins: int) -> float:
    if len(conf) == 0:
        return float("nan")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(conf[sel].mean() - right[sel].mean())
    return float(total)


def calibration_error(probs: np.ndarray, true: np.ndarray, bins: int = 10,
                      mask: np.ndarray | None = None) -> float:
    """Expected calibration error: top-1 confidence vs accuracy over ``bins`` equal-width bins, weighted
    by the share of faces in each (labelled faces only; NaN when there are none)."""
    return _ece(*_top1(probs, true, mask), bins)


def calibration_error_floor(probs: np.ndarray, true: np.ndarray, bins: int = 10, mask: np.ndarray | None = None,
                            draws: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these confidences would show on this many faces
    (each face right with probability = its confidence), as (mean, 95th percentile) over ``draws``.

    ECE is biased upwards on a finite sample: a measured ECE within this range cannot be told apart
    from perfect calibration at this sample size."""
    conf, _ = _top1(probs, true, mask)
    if len(conf) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    sims = [_ece(conf, rng.random(len(conf)) < conf, bins) for _ in range(draws)]
    return float(np.mean(sims)), float(np.percentile(sims, 95))
