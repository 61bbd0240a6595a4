"""Calibration error and its finite-sample floor."""

from __future__ import annotations

import numpy as np

from agegender.runtime.metrics import calibration_error, calibration_error_floor


def _sample(n: int, rng, overconfident: float = 0.0):
    """Two-class probabilities and labels drawn from them; ``overconfident`` inflates the stated
    confidence beyond the true rate."""
    p_true = rng.uniform(0.5, 1.0, n)
    labels = np.where(rng.random(n) < p_true, 0, 1)
    stated = np.clip(p_true + overconfident, 0.5, 0.999)
    return np.stack([stated, 1 - stated], 1), labels


def test_ece_of_a_calibrated_model_lies_within_its_floor_and_a_miscalibrated_one_above():
    rng = np.random.default_rng(0)
    inside = 0
    for _ in range(20):
        probs, labels = _sample(1300, rng)
        _, p95 = calibration_error_floor(probs, labels, draws=200, seed=1)
        inside += calibration_error(probs, labels) <= p95
    assert inside >= 16  # ~95 % expected; a floor that is too low fails this
    probs, labels = _sample(1300, rng, overconfident=0.08)
    mean, p95 = calibration_error_floor(probs, labels, draws=200)
    assert calibration_error(probs, labels) > p95 > mean > 0.005  # a finite sample never reads 0


def test_floor_shrinks_with_more_faces_and_respects_the_mask():
    rng = np.random.default_rng(2)
    small, big = _sample(300, rng), _sample(30000, rng)
    assert calibration_error_floor(*big, draws=50)[0] < calibration_error_floor(*small, draws=50)[0] / 4
    probs, labels = small
    labels = labels.copy()
    labels[:100] = -1  # unlabelled faces are left out, like the mask
    assert calibration_error_floor(probs, labels, draws=50) == calibration_error_floor(
        probs[100:], labels[100:], draws=50)
    assert np.isnan(calibration_error_floor(probs, np.full(300, -1))[0])
