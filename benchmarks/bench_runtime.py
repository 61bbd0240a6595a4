"""Runtime speed: per-face classification, end-to-end photo, process start, peak memory.

    python benchmarks/bench_runtime.py --model PATH [--image PHOTO] [--detector auto|yunet|haar]

Prints per-face classification latency at 1 thread (model alone, and crop + model), the
end-to-end time on a 640-px photo (decode + detect + crop + classify), the time from process
start to the first JSON line of ``agegender-run``, and that process's peak RSS. Without
``--image`` the photo is a UTKFace face from ../shared pasted on a 640x480 canvas (or noise).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime

from agegender.runtime.predictor import Predictor
from agegender.runtime.preprocess import prepare_face, to_input
from agegender.runtime.timing import timed

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGEGENDER_SHARED", REPO.parent / "shared"))
PHOTO_FACE = "17_1_4_20170103201233799.jpg.chip.jpg"  # a frontal face both YuNet and Haar find


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10) if len(times) >= 10 else [min(times)] * 9
    return f"median {statistics.median(times):7.2f} ms   p90 {q[8]:7.2f} ms   (n={len(times)})"


def make_photo(folder: Path) -> Path:
    """A 640x480 JPEG with one face (UTKFace from ../shared when present, else noise)."""
    canvas = np.full((480, 640, 3), 120, np.uint8)
    utk = SHARED / "data" / "utkface"
    faces = [p for p in (utk / PHOTO_FACE,) if p.is_file()] or sorted(utk.glob("*.jpg"))[:1]
    if faces:
        canvas[120:360, 200:440] = cv2.resize(cv2.imread(str(faces[0])), (240, 240))
    else:
        canvas[:] = np.random.default_rng(0).integers(0, 256, canvas.shape, dtype=np.uint8)
    path = folder / "photo.jpg"
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return path


def start_to_first_line(cmd: list[str]) -> tuple[float, float]:
    """Seconds from process start to its first stdout line, and its peak RSS in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not first.startswith("{"):
        raise SystemExit(f"agegender-run failed (exit {proc.returncode}): {' '.join(cmd)}")
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return elapsed, usage.ru_maxrss / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="agegender ONNX model")
    ap.add_argument("--image", help="a photo for the end-to-end timing (default: a generated 640x480 one)")
    ap.add_argument("--detector", default="auto", choices=["auto", "yunet", "haar", "none"])
    ap.add_argument("--detector-model", help="local YuNet file")
    ap.add_argument("--threads", type=int, default=None, help="threads for the end-to-end timing [all cores]")
    ap.add_argument("--repeat", type=int, default=200, help="timed runs per classification measurement")
    ap.add_argument("--starts", type=int, default=3, help="process starts to time")
    args = ap.parse_args()

    one = Predictor(args.model, detector="none", threads=1)
    meta = one.meta
    print(f"model      {args.model}: {meta.arch}, {meta.input_size} px, quantization {meta.quantization}")
    print(f"machine    {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"onnxruntime {onnxruntime.__version__}, opencv {cv2.__version__}")

    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    batch = to_input([prepare_face(face, None, meta.crop_margin, meta.input_size)])
    print(f"1 face, 1 thread, model only       {summary(timed(lambda: one.classifier.run(batch), args.repeat))}")
    print(f"1 face, 1 thread, model with flip  "
          f"{summary(timed(lambda: one.classifier.run(batch, flip=True), args.repeat))}")
    print(f"1 face, 1 thread, crop + model     {summary(timed(lambda: one.predict(face), args.repeat))}")

    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(args.image) if args.image else make_photo(Path(tmp))
        pred = Predictor(args.model, detector=args.detector, threads=args.threads,
                         detector_model=args.detector_model)
        det_model = getattr(pred.detector, "model_path", None)
        h, w = cv2.imread(str(photo)).shape[:2]
        n_faces = len(pred.predict(photo))
        e2e = timed(lambda: pred.predict(photo), max(20, args.repeat // 4), warmup=3)
        print(f"photo {w}x{h}, {pred.detector.name}, {n_faces} face(s), end to end "
              f"{summary(e2e)}  threads={args.threads or 'all'}")

        cmd = [sys.executable, "-m", "agegender.runtime.cli", "--json", "-q", "--model", args.model,
               "--detector", pred.detector.name, str(photo)]
        if det_model is not None:
            cmd[-1:-1] = ["--detector-model", str(det_model)]
        runs = [start_to_first_line(cmd) for _ in range(args.starts)]
        print(f"process start to first JSON line   median {statistics.median(r[0] for r in runs):.2f} s "
              f"(n={len(runs)})")
        print(f"peak RSS of that process           {max(r[1] for r in runs):.0f} MiB")


if __name__ == "__main__":
    main()
