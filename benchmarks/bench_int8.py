"""Every int8 setting export-onnx can choose, measured on one checkpoint (a table for the README).

    python benchmarks/bench_int8.py CKPT [--data DIR] [--eval-size 2000] [--calib-method minmax ...]

For each calibration setting it exports the fp32 model once, then quantizes every rung of the
float-island ladder (plain, cheap-islands, sensitive-10/25/50 %) without stopping at the first that
passes, and prints agreement with fp32, accuracy drops, latency (1 thread, batch 1) and size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

import onnx

from agegender.export import parity
from agegender.export.net import ProbsModel, load_checkpoint, net_from_checkpoint
from agegender.export.onnx_export import export_onnx
from agegender.export.quantize import (SENSITIVE_FRACTIONS, SENSITIVITY_IMAGES, QuantSettings, cheap_islands,
                                       conv_noise, head_nodes, preprocess, quantize,
                                       with_inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", help="the checkpoint's dataset if it moved")
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--calib-size", type=int, default=300)
    ap.add_argument("--calib-method", nargs="+", default=["minmax"], choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--reduce-range", action="store_true")
    ap.add_argument("--runs", type=int, default=100, help="latency runs")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ckpt = load_checkpoint(a.checkpoint)
    size = int(ckpt["model_args"]["img_size"])
    model = ProbsModel(net_from_checkpoint(ckpt)).eval()
    src = parity.resolve_sources(ckpt, None, a.data)
    test = parity.load_faces(src.test, size, a.eval_size, "test faces")
    calib = parity.load_faces(src.calib, size, a.calib_size, "calibration faces", seed=1)
    records = test.records if len(test) else None
    judge = test.faces if len(test) else calib.faces
    th = parity.Int8Thresholds()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        wd = Path(work)
        fp32, prep = wd / "fp32.onnx", wd / "prep.onnx"
        export_onnx(model, fp32, size, 17)
        preprocess(fp32, prep)
        ref = parity.predict_ort(parity.ort_session(fp32), judge)
        face = judge[0]
        rows.append(_row("fp32", "-", 0, ref, ref, records, th, fp32, face, a.runs))
        m = onnx.load(str(prep))
        fixed, islands = head_nodes(m), cheap_islands(m)
        for method in a.calib_method:
            s = QuantSettings(method, a.reduce_range)
            cache = wd / f"ranges_{method}.json"
            rungs = [("plain", fixed), ("cheap-islands", fixed + islands)]
            for name, excl in rungs:
                rows.append(_measure(name, s, prep, wd, calib.faces, excl, cache, ref, judge, records, th, face,
                                     a.runs))
            noise = conv_noise(prep, calib.faces[:SENSITIVITY_IMAGES], s, fixed + islands, cache, wd)
            ranked = [n for n, _ in sorted(noise.items(), key=lambda kv: -kv[1]) if n not in fixed + islands]
            for frac in SENSITIVE_FRACTIONS:
                k = max(1, math.ceil(frac * len(ranked)))
                rows.append(_measure(f"sensitive-{int(frac * 100)}%", s, prep, wd, calib.faces,
                                     fixed + islands + with_inputs(m, ranked[:k]), cache, ref, judge, records, th,
                                     face, a.runs))
    cols = ["setting", "calib", "float nodes", "age agree", "gender agree", "age exact", "age 1-off", "gender",
            "gate", "ms/face", "MB"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


def _measure(name, s, prep, wd, calib_faces, excl, cache, ref, judge, records, th, face, runs):
    path = wd / f"{s.calib_method}_{name}.onnx"
    quantize(prep, path, calib_faces, s, excl, cache)
    probs = parity.predict_ort(parity.ort_session(path), judge)
    return _row(name, s.calib_method + (" rr" if s.reduce_range else ""), len(excl), ref, probs, records, th,
                path, face, runs)


def _row(name, calib, n_float, ref, probs, records, th, path, face, runs):
    g = parity.int8_gate(ref, probs, records, th)
    m = g.get("int8_metrics") or {}
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    return {"setting": name, "calib": calib, "float nodes": n_float,
            "age agree": fmt(g["agreement"].get("age")), "gender agree": fmt(g["agreement"].get("gender")),
            "age exact": fmt(m.get("age_exact")), "age 1-off": fmt(m.get("age_1off")),
            "gender": fmt(m.get("gender_acc")), "gate": "pass" if g["passed"] else "fail",
            "ms/face": f"{parity.latency_ms(path, face, runs):.2f}", "MB": f"{path.stat().st_size / 1e6:.2f}"}


if __name__ == "__main__":
    main()
