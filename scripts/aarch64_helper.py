"""Host-side helper of scripts/check-aarch64.sh (run with the host runtime's Python).

    pins OUT                     constraints file: the host's numpy / opencv-python-headless / onnxruntime
    images OUTDIR [--from DIR]   face images: OUTDIR/none (pre-cropped faces) and OUTDIR/haar (faces on canvases)
    compare HOSTDIR ARMDIR       compare the JSON Lines of the x86 and arm64 runs; exit 1 on any difference
    rss DIR                      print the peak RSS each run recorded

``images`` needs numpy and opencv (both are runtime dependencies); the others need only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

RUNTIME_PINS = ("numpy", "opencv-python-headless", "onnxruntime")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MODELS = ("int8", "fp32")
DETECTORS = ("none", "haar")


# --------------------------------------------------------------------------- pins
def cmd_pins(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for name in RUNTIME_PINS:
        try:
            lines.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            print(f"aarch64-check: {name} is not installed in the host runtime ({sys.executable})", file=sys.stderr)
            return 2
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(" ".join(lines))
    return 0


# --------------------------------------------------------------------------- images
def drawn_face(size: int, skin, hair, seed: int):
    """A BGR drawing of a frontal face, size x size, that OpenCV's frontal Haar cascade finds."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 0, np.uint8)
    img[:] = rng.integers(60, 140, 3)
    c, s = size // 2, size / 200
    cv2.ellipse(img, (c, c), (int(80 * s), int(105 * s)), 0, 0, 360, skin, -1)
    cv2.ellipse(img, (c, c - int(90 * s)), (int(85 * s), int(40 * s)), 0, 180, 360, hair, -1)
    for dx in (-35, 35):
        cv2.ellipse(img, (c + int(dx * s), c - int(20 * s)), (int(18 * s), int(9 * s)), 0, 0, 360, (40, 40, 50), -1)
        cv2.line(img, (c + int((dx - 20) * s), c - int(38 * s)), (c + int((dx + 20) * s), c - int(38 * s)),
                 hair, max(1, int(6 * s)))
    cv2.line(img, (c, c - int(10 * s)), (c, c + int(25 * s)), tuple(int(v * 0.75) for v in skin), max(1, int(5 * s)))
    cv2.ellipse(img, (c, c + int(55 * s)), (int(30 * s), int(8 * s)), 0, 0, 360, (60, 60, 140), -1)
    img = cv2.GaussianBlur(img, (0, 0), 3 * s)
    noise = rng.integers(-6, 7, img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def canvas(faces, wh=(640, 480), grey=110, seed=0):
    """A BGR canvas with each (face, (x, y, side)) pasted in, resized to side x side."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.clip(np.full((wh[1], wh[0], 3), grey, np.int16) + rng.integers(-10, 11, (wh[1], wh[0], 3)), 0, 255)
    img = img.astype(np.uint8)
    for face, (x, y, side) in faces:
        img[y:y + side, x:x + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    return img


def _write(path: Path, img) -> None:
    import cv2

    if not cv2.imwrite(str(path), img):
        raise SystemExit(f"aarch64-check: cannot write {path}")


def generated_images(out: Path) -> None:
    """Drawn faces in several skins, hair colours, sizes and formats; canvases for the Haar run."""
    import numpy as np

    styles = [((150, 170, 200), (30, 30, 40)), ((90, 120, 160), (20, 60, 90)), ((180, 200, 225), (60, 90, 150)),
              ((70, 100, 140), (10, 10, 10)), ((160, 180, 210), (120, 140, 170)), ((120, 150, 190), (40, 40, 120))]
    faces = [drawn_face(200, skin, hair, seed) for seed, (skin, hair) in enumerate(styles)]
    for i, face in enumerate(faces):  # pre-cropped faces for --detector none: JPEG, PNG and odd sizes
        ext = ".png" if i % 3 == 2 else ".jpg"
        if i == 4:
            import cv2
            face = cv2.resize(face, (173, 211))
        _write(out / "none" / f"face_{i}{ext}", face)
    _write(out / "none" / "grey_face_5.png", np.mean(faces[5], axis=2).astype(np.uint8))  # a grey image
    # canvases for --detector haar: one face at several sizes / places, two faces, and no face at all
    _write(out / "haar" / "one_face_a.jpg", canvas([(faces[0], (220, 140, 200))], seed=1))
    _write(out / "haar" / "one_face_b.png", canvas([(faces[1], (60, 200, 150))], seed=2))
    _write(out / "haar" / "one_face_c.jpg", canvas([(faces[2], (300, 60, 260))], (800, 600), seed=3))
    _write(out / "haar" / "two_faces.jpg", canvas([(faces[3], (40, 120, 180)), (faces[4], (380, 100, 220))], seed=4))
    _write(out / "haar" / "no_face.jpg", canvas([], seed=5))


def images_from(src: Path, out: Path, limit: int) -> None:
    """The first ``limit`` images of ``src`` (sorted): as they are for ``none``; on canvases for ``haar``."""
    import cv2

    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)[:limit]
    if not files:
        raise SystemExit(f"aarch64-check: no images ({', '.join(sorted(IMAGE_EXTS))}) in {src}")
    for i, p in enumerate(files):
        name = f"{i:03d}_{p.name}"
        shutil.copyfile(p, out / "none" / name)
        face = cv2.imread(str(p))
        if face is None:
            continue  # an unreadable input still goes through the none run (both sides must agree on the error)
        _write(out / "haar" / (Path(name).stem + ".png"), canvas([(face, (220, 140, 200))], seed=i))


def cmd_images(args) -> int:
    out = Path(args.outdir)
    for det in DETECTORS:
        (out / det).mkdir(parents=True, exist_ok=True)
    if args.src:
        images_from(Path(args.src), out, args.max)
    else:
        generated_images(out)
    for det in DETECTORS:  # the list each run reads on stdin: relative names, so both sides print the same paths
        names = sorted(p.name for p in (out / det).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        (out / f"{det}.list").write_text("\n".join(names) + "\n")
        print(f"{det}: {len(names)} images")
    return 0


# --------------------------------------------------------------------------- compare
def _load(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _box_diff(a, b) -> int:
    return max(abs(int(x) - int(y)) for x, y in zip(a, b))


def compare_run(host: list[dict], arm: list[dict], model: str, tol: float, box_tol: int) -> tuple[list[str], dict]:
    """Differences (one line each) and a summary of one (model, detector) run."""
    diffs: list[str] = []
    stats = {"images": len(host), "faces": 0, "max_dp": 0.0, "max_box": 0, "errors": 0, "reordered": 0}
    if len(host) != len(arm):
        diffs.append(f"{len(host)} x86 results but {len(arm)} arm64 results")
    for h, a in zip(host, arm):
        where = h.get("path")
        if h.get("path") != a.get("path"):
            diffs.append(f"result order differs: {h.get('path')} vs {a.get('path')}")
            continue
        if h.get("error") or a.get("error"):
            stats["errors"] += 1
            if h.get("error") != a.get("error"):
                diffs.append(f"{where}: error x86={h.get('error')!r} arm64={a.get('error')!r}")
        if (h.get("width"), h.get("height")) != (a.get("width"), a.get("height")):
            diffs.append(f"{where}: size x86={h.get('width')}x{h.get('height')} arm64={a.get('width')}x{a.get('height')}")
        hf, af = h.get("faces") or [], a.get("faces") or []
        # faces are matched by box: the order of one image's faces is not part of the answer (OpenCV's
        # Haar detector lists them in a thread-dependent order)
        if [f["box"] for f in hf] != [f["box"] for f in af]:
            hf, af = sorted(hf, key=lambda f: f["box"]), sorted(af, key=lambda f: f["box"])
            if [f["box"] for f in hf] == [f["box"] for f in af]:
                stats["reordered"] += 1
        if len(hf) != len(af):
            diffs.append(f"{where}: {len(hf)} faces on x86, {len(af)} on arm64")
            continue
        for k, (fh, fa) in enumerate(zip(hf, af)):
            stats["faces"] += 1
            tag = f"{where} face {k}"
            bd = _box_diff(fh["box"], fa["box"])
            stats["max_box"] = max(stats["max_box"], bd)
            if bd > box_tol:
                diffs.append(f"{tag}: box x86={fh['box']} arm64={fa['box']}")
            for key in ("age", "gender"):
                if fh.get(key) != fa.get(key):
                    diffs.append(f"{tag}: {key} x86={fh.get(key)} arm64={fa.get(key)}"
                                 f" (x86 probs {fh.get('age_probs') if key == 'age' else fh.get('gender_score')})")
            dps = []
            if fh.get("age_probs") is not None and fa.get("age_probs") is not None:
                dps += [abs(fh["age_probs"][g] - fa["age_probs"].get(g, float("nan"))) for g in fh["age_probs"]]
            if fh.get("gender_score") is not None and fa.get("gender_score") is not None:
                # the score is the probability of the predicted gender: compare it only when both agree
                if fh.get("gender") == fa.get("gender"):
                    dps.append(abs(fh["gender_score"] - fa["gender_score"]))
            if abs(fh.get("det_score", 1.0) - fa.get("det_score", 1.0)) > tol:
                diffs.append(f"{tag}: det_score x86={fh.get('det_score')} arm64={fa.get('det_score')}")
            dp = max(dps, default=0.0)
            if dp != dp:  # NaN: an age group missing on one side
                diffs.append(f"{tag}: age groups x86={list(fh['age_probs'])} arm64={list(fa['age_probs'])}")
                continue
            stats["max_dp"] = max(stats["max_dp"], dp)
            if model == "fp32" and dp > tol:
                diffs.append(f"{tag}: fp32 probabilities differ by {dp:.2e} > {tol:g}")
    return diffs, stats


def cmd_compare(args) -> int:
    host_dir, arm_dir = Path(args.host), Path(args.arm)
    all_diffs = 0
    print(f"(the JSON has 4 decimals: a |dp| of 0 means equal to 1e-4)")
    print(f"{'model':5} {'detector':8} {'images':>6} {'faces':>5} {'errors':>6} {'max |dp|':>9} {'max box px':>10}  result")
    for model in MODELS:
        for det in args.detectors.split():
            name = f"{model}-{det}.jsonl"
            try:
                diffs, st = compare_run(_load(host_dir / name), _load(arm_dir / name), model, args.tol, args.box_tol)
            except FileNotFoundError as e:
                print(f"{model:5} {det:8} missing {e}")
                all_diffs += 1
                continue
            verdict = "same" if not diffs else f"{len(diffs)} DIFFERENCES"
            print(f"{model:5} {det:8} {st['images']:>6} {st['faces']:>5} {st['errors']:>6} {st['max_dp']:>9.1e}"
                  f" {st['max_box']:>10}  {verdict}")
            if st["reordered"]:
                print(f"    {model}/{det}: {st['reordered']} image(s) list the same faces in another order (not a difference)")
            for d in diffs[:20]:
                print(f"    {model}/{det}: {d}")
            if len(diffs) > 20:
                print(f"    ... and {len(diffs) - 20} more")
            if st["faces"] == 0:
                print(f"    {model}/{det}: no face was found on either side: nothing compared")
                diffs.append("no faces")
            all_diffs += len(diffs)
    return 1 if all_diffs else 0


def cmd_rss(args) -> int:
    sides = sorted((p for p in Path(args.dir).iterdir() if p.is_dir()), key=lambda p: (p.name != "x86", p.name))
    for side in sides:
        for model in MODELS:
            for det in (*DETECTORS, "yunet"):
                p = side / f"{model}-{det}.rss"
                if p.is_file():
                    print(f"peak RSS {side.name:18} {model} {det:4}: {int(p.read_text().split()[0]) / 1024:7.1f} MiB")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pins")
    p.add_argument("out")
    p.set_defaults(fn=cmd_pins)
    p = sub.add_parser("images")
    p.add_argument("outdir")
    p.add_argument("--from", dest="src")
    p.add_argument("--max", type=int, default=8)
    p.set_defaults(fn=cmd_images)
    p = sub.add_parser("compare")
    p.add_argument("host")
    p.add_argument("arm")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--box-tol", type=int, default=0)
    p.add_argument("--detectors", default=" ".join(DETECTORS), help="space-separated (default: none haar)")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("rss")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_rss)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
