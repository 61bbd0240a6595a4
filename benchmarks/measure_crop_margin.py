"""Measure the crop margin that makes a detected face look like a training face.

Runs the runtime's YuNet detector on training faces (pre-cropped chips) and compares its box to
the whole chip: the runtime crops side = box side x (1 + 2 x margin), so the margin that
reproduces the training framing is (chip side / box side - 1) / 2. Each chip is placed in the
middle of a canvas twice its size (edge-replicated, as the runtime pads) so the detector sees some context.

    python benchmarks/measure_crop_margin.py --data ../shared/data/utkface \
        --detector-model ../shared/models/face_detection_yunet_2026may.onnx --n 500

With ``--model M.onnx --margins -0.08,0,0.1`` it also scores the model through the detector path
(detect on the padded canvas, crop with each margin) on held-out faces (``--holdout``), which
says which framing the model prefers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import cv2
import numpy as np

from agegender.runtime.datasets import is_holdout, read_dataset
from agegender.runtime.labels import age_in_group
from agegender.runtime.metrics import age_gender_metrics
from agegender.runtime.model import OnnxClassifier
from agegender.runtime.preprocess import prepare_face, to_input
from agegender.runtime.detect import YuNetDetector
from agegender.runtime.imageio import read_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--detector-model", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--margins", default="-0.08,0,0.1")
    ap.add_argument("--holdout", type=float, default=0.1)
    a = ap.parse_args()
    records, _ = read_dataset(a.data)
    if a.model:
        records = [r for r in records if is_holdout(Path(r.path).name, a.holdout)]
        clf = OnnxClassifier(a.model)
        margins = [float(m) for m in a.margins.split(",")]
        crops: dict[float, list[np.ndarray]] = {m: [] for m in margins}
    random.Random(a.seed).shuffle(records)
    det = YuNetDetector(a.detector_model, score_threshold=0.6)
    ratios, dx, dy, found, kept = [], [], [], 0, []
    for r in records[: a.n]:
        img = read_image(r.path)
        h, w = img.shape[:2]
        side = max(h, w)
        canvas = cv2.copyMakeBorder(img, h // 2, h // 2, w // 2, w // 2, cv2.BORDER_REPLICATE)
        faces = det.detect(canvas)
        if not faces:
            continue
        found += 1
        best = max(faces, key=lambda f: f.score)
        x1, y1, x2, y2 = best.box
        if a.model:
            kept.append(r)
            for m in margins:
                crops[m].append(prepare_face(canvas, best.box, m, clf.input_size))
        bside = max(x2 - x1, y2 - y1)
        ratios.append(side / bside)
        dx.append(((x1 + x2) / 2 - (w // 2 + w / 2)) / bside)
        dy.append(((y1 + y2) / 2 - (h // 2 + h / 2)) / bside)
    r = np.array(ratios)
    out = {"faces": a.n, "detected": found, "side_ratio_median": float(np.median(r)),
           "side_ratio_iqr": [float(np.percentile(r, 25)), float(np.percentile(r, 75))],
           "crop_margin": round(float((np.median(r) - 1) / 2), 3),
           "box_centre_offset_median": [float(np.median(dx)), float(np.median(dy))]}
    if a.model:
        at = np.array([r.age for r in kept])
        gt = np.array([r.gender for r in kept])
        scored = np.array([age_in_group(r.exact_age) for r in kept])
        out["accuracy_by_margin"] = {}
        for m in margins:
            probs = clf.run(to_input(crops[m]))
            out["accuracy_by_margin"][str(m)] = age_gender_metrics(
                at, probs["age_probs"].argmax(1), gt, probs["gender_probs"].argmax(1), scored)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
