"""Face detection benchmark: held-out UTKFace faces pasted into generated scenes.

Scenes (seeded, deterministic): 1-12 held-out UTKFace chips (``is_holdout(name, 0.1)``: never
training faces) pasted at 16 px to most of the frame, rotated, onto textured noise, gradients,
dark or bright backgrounds, or CC0/public-domain photos (``--photos``: scikit-image's data folder);
then blur, low light and JPEG. Ground truth is the pasted chip's square (YuNet's box covers
~97 % of a UTKFace chip); a detection matches an unmatched face when IoU >= 0.4, best score first;
every other detection is a false face. Detections under the runtime's ``DEFAULT_MIN_FACE_SIZE``
are dropped, as ``Predictor`` does. Pasted faces are easier than faces in context (no occlusion,
no neighbouring bodies): read recall here as an upper bound.

    python benchmarks/bench_detect.py --data ../shared/data/utkface \\
        --yunet ../shared/models/face_detection_yunet_2026may.onnx --out /tmp/bench_detect.md
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agegender.runtime.datasets import is_holdout, parse_utkface_name
from agegender.runtime.detect import (DEFAULT_DET_THRESHOLD, DEFAULT_MIN_FACE_SIZE, SECOND_LOOK_FLOOR, Detection,
                                      HaarDetector, Passes, YuNetDetector, iou, nms)
from agegender.runtime.yunet import CvYuNet

SIZE_BINS = (16, 24, 40, 80, 160, 320, 640, 100_000)
MATCH_IOU = 0.4
# scikit-image data files with a clear licence (CC0 or public domain, per skimage.data's docstrings), no people
PHOTO_BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "coffee.png", "rocket.jpg", "chelsea.png")
SCENE_SIZES = "640x480:28,1280x886:28,1920x1080:12,4000x3000:3"
YUNET_SCHEMES: dict[str, tuple[Passes | None, bool]] = {  # (passes, dark photos brightened)
    "640, retry 320 (before)": (None, False),  # the runtime before issue 14 (640 px, 320 px retry if none)
    "L/4 in [640, 1024] + 320 (previous default)": (Passes(640, 0.25, 1024, 320), False),
    "L/4 in [640, 1024] + 320, OpenCV backend": (Passes(640, 0.25, 1024, 320), False),
    "960 + 320": (Passes(960, 1.0, 960, 320), False),
    "L/3 in [896, 1280] + 320": (Passes(896, 1 / 3, 1280, 320), False),
    "L/3 in [896, 1280] + 320, dark brightened": (Passes(896, 1 / 3, 1280, 320), True),
    "L/3 in [832, 1280] + 320, dark brightened": (Passes(832, 1 / 3, 1280, 320), True),
    "1280 + 320": (Passes(1280, 1.0, 1280, 320), False),
    "1280 + 320, dark brightened": (Passes(1280, 1.0, 1280, 320), True),
    "L/3 in [896, 1280] + 320, dark brightened, second look": (Passes(896, 1 / 3, 1280, 320), True),
}
# "second look" rows: near-misses (score >= SECOND_LOOK_FLOOR, under the threshold) re-run at their own
# resolution (YuNetDetector's second_look); run once per threshold. Every other row has it off.
# "before" ran cv2.FaceDetectorYN, one net re-sized for every pass; the "OpenCV backend" row too (with a net
# per size); every other row runs the runtime's default backend (onnxruntime for a free-size export).


class _OneCvNet:
    """The runtime before: one cv2.FaceDetectorYN, ``setInputSize`` before every call."""

    backend = "opencv, one net"

    def __init__(self, path: Path, score_threshold: float, nms_threshold: float):
        self.net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, 5000)

    def detect(self, bgr: np.ndarray):
        self.net.setInputSize((bgr.shape[1], bgr.shape[0]))
        return self.net.detect(bgr)[1]


@dataclass
class Face:
    name: str
    box: tuple[float, float, float, float]
    angle: float
    age: int
    gender: int


@dataclass
class Scene:
    jpeg: bytes
    faces: list[Face]
    size: tuple[int, int]
    kind: str


@dataclass
class Tally:
    found: dict = field(default_factory=lambda: defaultdict(lambda: np.zeros(2, int)))  # (thr, bin) -> [hit, n]
    false: dict = field(default_factory=lambda: defaultdict(int))  # thr -> false faces
    ms: dict = field(default_factory=lambda: defaultdict(list))  # scene width -> ms per image
    cond: dict = field(default_factory=lambda: defaultdict(lambda: np.zeros(2, int)))  # (thr, cond) -> [hit, n]
    by_width: dict = field(default_factory=lambda: defaultdict(lambda: np.zeros(2, int)))  # (thr, width) -> [hit, n]


def holdout_faces(data: Path) -> list[tuple[Path, int, int]]:
    """(path, age, gender) of the held-out UTKFace faces, sorted by name."""
    out = []
    for p in sorted(data.iterdir()):
        lab = parse_utkface_name(p.name)
        if lab is not None and is_holdout(p.name, 0.1):
            out.append((p, lab[0], lab[1]))
    return out


def background(rng: np.random.Generator, w: int, h: int, photos: list[np.ndarray]) -> tuple[np.ndarray, str]:
    kinds = ["noise", "gradient", "dark", "bright"] + (["photo"] if photos else [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "photo":
        img = cv2.resize(photos[rng.integers(len(photos))], (w, h), interpolation=cv2.INTER_LINEAR)
    elif kind == "noise":
        img = np.zeros((h, w, 3), np.float32)
        for cells in (4, 16, 64):
            layer = rng.uniform(0, 255, (cells, max(1, cells * w // h), 3)).astype(np.float32)
            img += cv2.resize(layer, (w, h), interpolation=cv2.INTER_CUBIC) / 3
        img = np.clip(img, 0, 255).astype(np.uint8)
    elif kind == "gradient":
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8)
    else:
        level = rng.uniform(10, 45) if kind == "dark" else rng.uniform(205, 250)
        img = np.full((h, w, 3), level, np.uint8)
    noise = rng.normal(0, 4, (h, w, 1)).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8), kind


def paste(img: np.ndarray, chip: np.ndarray, x: int, y: int, side: int, angle: float) -> None:
    """``chip`` resized to ``side``, rotated by ``angle`` about its centre, blended in at (x, y)."""
    face = cv2.resize(chip, (side, side), interpolation=cv2.INTER_AREA if side < chip.shape[0] else cv2.INTER_LINEAR)
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    face = cv2.warpAffine(face, m, (side, side), borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(np.ones((side, side), np.float32), m, (side, side))
    k = max(1, side // 40) * 2 + 1
    mask = cv2.GaussianBlur(mask, (k, k), 0)[:, :, None]
    roi = img[y:y + side, x:x + side].astype(np.float32)
    img[y:y + side, x:x + side] = (roi * (1 - mask) + face.astype(np.float32) * mask).astype(np.uint8)


def place(rng: np.random.Generator, w: int, h: int, sides: list[int]) -> list[tuple[int, int, int]]:
    """Non-overlapping (x, y, side) squares inside the frame; faces that do not fit are dropped."""
    taken: list[tuple[int, int, int]] = []
    for s in sorted(sides, reverse=True):
        for _ in range(50):
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            if all(x + s <= a or a + c <= x or y + s <= b or b + c <= y for a, b, c in taken):
                taken.append((x, y, s))
                break
    return taken


def make_scene(rng: np.random.Generator, w: int, h: int, pool: list, photos: list[np.ndarray]) -> Scene:
    img, kind = background(rng, w, h, photos)
    n = int(rng.integers(1, 13))
    top = min(0.8 * min(w, h), 1.1 * np.sqrt(w * h / n))
    sides = [int(np.exp(rng.uniform(np.log(16), np.log(top)))) for _ in range(n)]
    faces = []
    for x, y, s in place(rng, w, h, sides):
        path, age, gender = pool[rng.integers(len(pool))]
        chip = cv2.imread(str(path))
        chip = cv2.convertScaleAbs(chip, alpha=rng.uniform(0.8, 1.2), beta=rng.uniform(-20, 20))
        angle = float(rng.uniform(-25, 25) if rng.random() < 0.6 else rng.uniform(-5, 5))
        paste(img, chip, x, y, s, angle)
        faces.append(Face(path.name, (x, y, x + s, y + s), angle, age, gender))
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.6, 2.0) * max(1.0, min(w, h) / 900))
        kind += "+blur"
    if rng.random() < 0.25:
        img = cv2.convertScaleAbs(img, alpha=rng.uniform(0.2, 0.45))
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        kind += "+lowlight"
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 96))])
    return Scene(buf.tobytes(), faces, (w, h), kind)


def make_scenes(data: Path, spec: str, seed: int, photo_dir: Path | None) -> list[Scene]:
    pool = holdout_faces(data)
    photos = [cv2.imread(str(photo_dir / f)) for f in PHOTO_BACKGROUNDS] if photo_dir else []
    photos = [p for p in photos if p is not None]
    rng = np.random.default_rng(seed)
    scenes = []
    for item in spec.split(","):
        dims, count = item.split(":")
        w, h = (int(v) for v in dims.split("x"))
        scenes += [make_scene(rng, w, h, pool, photos) for _ in range(int(count))]
    return scenes


def match(dets: list[Detection], faces: list[Face]) -> tuple[list[int], int]:
    """Index of the detection matched to each face (-1: missed) and the number of false faces."""
    owner = [-1] * len(faces)
    false = 0
    for i, d in sorted(enumerate(dets), key=lambda t: -t[1].score):
        cands = [(iou(d.box, f.box), j) for j, f in enumerate(faces) if owner[j] < 0]
        best = max(cands, default=(0.0, -1))
        if best[0] >= MATCH_IOU:
            owner[best[1]] = i
        else:
            false += 1
    return owner, false


def size_bin(side: float) -> int:
    return int(np.searchsorted(SIZE_BINS, side, side="right")) - 1


def runtime_filter(dets: list[Detection]) -> list[Detection]:
    return [d for d in dets if min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= DEFAULT_MIN_FACE_SIZE]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1000


def yunet_candidates(det: YuNetDetector, img: np.ndarray, scheme: Passes | None, thresholds):
    """{threshold: detections} and ms for one scheme; run once at the lowest threshold, then filtered."""
    if scheme is not None and det.second_look is not None:
        det.passes, out, ms = scheme, {}, 0.0
        for t in thresholds:
            det.score_threshold = t
            floor = det.second_look
            det.second_look = floor if floor < t else None
            out[t], took = timed(det.detect, img)
            det.second_look = floor
            ms = took if t == DEFAULT_DET_THRESHOLD else ms
        return out, ms
    if scheme is not None:
        det.passes = scheme
        dets, ms = timed(det.detect, img)
        return {t: [d for d in dets if d.score >= t] for t in thresholds}, ms
    first, ms = timed(det._detect_at, img, 640)  # the runtime before issue 14
    retry, ms_retry = timed(det._detect_at, img, 320)
    out, main_t = {}, max(thresholds)
    for t in thresholds:
        kept = nms(first, t, det.nms_threshold)
        out[t] = kept or nms(retry, t, det.nms_threshold)
        if t == main_t and not kept:
            ms += ms_retry
    return out, ms


CONDITIONS = ("clean", "blur", "low light", "tilt >= 15 deg")


def conditions(kind: str, face: Face) -> list[str]:
    """The conditions of a face: clean, or any of blur / low light / tilt."""
    out = [c for c, key in (("blur", "+blur"), ("low light", "+lowlight")) if key in kind]
    out += ["tilt >= 15 deg"] if abs(face.angle) >= 15 else []
    return out or ["clean"]


def tally(t: Tally, by_thr: dict, scene: Scene, ms: float) -> None:
    faces = scene.faces
    for thr, dets in by_thr.items():
        owner, false = match(runtime_filter(dets), faces)
        t.false[thr] += false
        for f, o in zip(faces, owner):
            t.found[(thr, size_bin(f.box[2] - f.box[0]))] += (o >= 0, 1)
            if f.box[2] - f.box[0] >= 40:
                for c in conditions(scene.kind, f):
                    t.cond[(thr, c)] += (o >= 0, 1)
                t.by_width[(thr, scene.size[0])] += (o >= 0, 1)
    width = scene.size[0]
    t.ms[width].append(ms)


def detectors(yunet: Path, thresholds: list[float], threads: int) -> dict[str, YuNetDetector]:
    """One YuNetDetector per scheme (see YUNET_SCHEMES), sharing the runtime's backend where they can."""
    thr = min(thresholds)
    runtime = YuNetDetector(yunet, score_threshold=thr, threads=threads, second_look=None)
    looking = YuNetDetector(yunet, threads=threads, second_look=min(thr, SECOND_LOOK_FLOOR))
    out = {}
    for name, (scheme, brighten) in YUNET_SCHEMES.items():
        det = copy.copy(looking if "second look" in name else runtime)
        det.brighten = brighten
        if scheme is None:
            det._net = _OneCvNet(yunet, thr, det.nms_threshold)
        elif "OpenCV" in name:
            det._net = CvYuNet(yunet, thr, det.nms_threshold)
        out[name] = det
    return out


def evaluate(scenes: list[Scene], yunet: Path | None, thresholds: list[float],
             threads: int = 1, with_haar: bool = True) -> tuple[dict[str, Tally], dict]:
    """Tallies per method (yunet schemes, haar) and the JPEG decode ms per scene width."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    decode: dict[int, list[float]] = defaultdict(list)
    dets_by = detectors(yunet, thresholds, threads) if yunet else {}
    haar = HaarDetector(min_size=24) if with_haar else None
    for scene in scenes:
        bgr, ms = timed(cv2.imdecode, np.frombuffer(scene.jpeg, np.uint8), cv2.IMREAD_COLOR)
        decode[scene.size[0]].append(ms)
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        for name, (scheme, _) in YUNET_SCHEMES.items() if yunet else ():
            by_thr, ms = yunet_candidates(dets_by[name], img, scheme, thresholds)
            tally(tallies[f"yunet {name}"], by_thr, scene, ms)
        if haar is not None:
            dets, ms = timed(haar.detect, img)
            tally(tallies["haar (1280 px, 5 neighbours)"], {1.0: dets}, scene, ms)
    return tallies, decode


def bin_label(i: int) -> str:
    lo, hi = SIZE_BINS[i], SIZE_BINS[i + 1]
    return f"{lo}+" if hi >= 100_000 else f"{lo}-{hi}"


def recall_table(tallies: dict[str, Tally], n_images: int) -> list[str]:
    bins = range(len(SIZE_BINS) - 1)
    head = "| method | threshold | " + " | ".join(bin_label(i) for i in bins) + " | >= 40 px | false faces / image |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, t in tallies.items():
        for thr in sorted(t.false):
            cells = []
            for i in bins:
                hit, n = t.found[(thr, i)]
                cells.append(f"{hit / n:.3f}" if n else "-")
            big = sum((t.found[(thr, i)] for i in bins if SIZE_BINS[i] >= 40), np.zeros(2, int))
            lines.append(f"| {name} | {thr:g} | " + " | ".join(cells) + f" | **{big[0] / max(1, big[1]):.3f}** | "
                         f"{t.false[thr] / n_images:.2f} |")
    return lines


def condition_table(tallies: dict[str, Tally]) -> list[str]:
    n = next(iter(tallies.values())).cond
    lines = ["| method | threshold | " + " | ".join(f"{c} ({n[(0.9, c)][1] if (0.9, c) in n else '?'})"
                                                  for c in CONDITIONS) + " |", "|---|---|" + "---|" * len(CONDITIONS)]
    for name, t in tallies.items():
        for thr in sorted(t.false):
            cells = [f"{t.cond[(thr, c)][0] / max(1, t.cond[(thr, c)][1]):.3f}" for c in CONDITIONS]
            lines.append(f"| {name} | {thr:g} | " + " | ".join(cells) + " |")
    return lines


def width_table(tallies: dict[str, Tally], threshold: float) -> list[str]:
    """Recall of faces >= 40 px by photo width, at one threshold."""
    any_t = next(iter(tallies.values())).by_width
    widths = sorted({w for (_, w) in any_t})
    lines = ["| method | " + " | ".join(f"{w} px ({any_t[(threshold, w)][1]})" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for name, t in tallies.items():
        thr = threshold if (threshold, widths[0]) in t.by_width else max(t.false)
        lines.append(f"| {name} | " + " | ".join(f"{t.by_width[(thr, w)][0] / max(1, t.by_width[(thr, w)][1]):.3f}"
                                                 for w in widths) + " |")
    return lines


def time_table(tallies: dict[str, Tally], decode: dict) -> list[str]:
    widths = sorted(decode)
    lines = ["| method | " + " | ".join(f"{w} px: detect / + decode ms (x before)" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    base = next(iter(tallies.values())).ms
    for name, t in tallies.items():
        cells = []
        for w in widths:
            det, dec, ref = np.mean(t.ms[w]), np.mean(decode[w]), np.mean(base[w])
            cells.append(f"{det:.0f} / {det + dec:.0f} ({(det + dec) / (ref + dec):.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| (JPEG decode, for scale) | " + " | ".join(f"{np.mean(decode[w]):.0f}" for w in widths) + " |")
    return lines


def real_photo_check(yunet: Path | None, photo_dir: Path | None, thresholds: list[float]) -> list[str]:
    """Faces found on licence-clear real photos shipped in pip packages (expected counts known)."""
    import matplotlib

    known = {}
    if photo_dir:
        known.update({photo_dir / "astronaut.png": 1, photo_dir / "camera.png": 1})
        known.update({photo_dir / f: 0 for f in PHOTO_BACKGROUNDS})
    known[Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"] = 1
    known = {p: n for p, n in known.items() if p.is_file()}
    if not known or yunet is None:
        return ["(no real photos reachable)"]
    dets_by = detectors(yunet, thresholds, 1)
    lines = ["| photo (expected faces) | " + " | ".join(YUNET_SCHEMES) + " |", "|---|" + "---|" * len(YUNET_SCHEMES)]
    for path, n in known.items():
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        cells = []
        for name, (scheme, _) in YUNET_SCHEMES.items():
            by_thr, _ = yunet_candidates(dets_by[name], img, scheme, thresholds)
            counts = [len(runtime_filter(by_thr[t])) for t in thresholds]
            cells.append("/".join(map(str, counts)))
        lines.append(f"| {path.name} ({n}) | " + " | ".join(cells) + " |")
    lines.append(f"\nfaces found at thresholds {'/'.join(f'{t:g}' for t in thresholds)}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="UTKFace folder (held-out faces are used)")
    ap.add_argument("--yunet", type=Path, help="YuNet ONNX file (without it: haar only)")
    ap.add_argument("--photos", type=Path, help="scikit-image's skimage/data folder: CC0 backgrounds + real photos")
    ap.add_argument("--scenes", default=SCENE_SIZES, help="WxH:count,... [%(default)s]")
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV and onnxruntime threads (1: fair timings)")
    ap.add_argument("--no-haar", action="store_true", help="YuNet schemes only (Haar takes most of the time)")
    ap.add_argument("--only", help="run only the YuNet rows whose name contains one of these (comma-separated)")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args()
    if args.only:
        keep = [k for k in YUNET_SCHEMES if any(part.strip() in k for part in args.only.split(","))]
        for k in [k for k in YUNET_SCHEMES if k not in keep]:
            del YUNET_SCHEMES[k]
    cv2.setNumThreads(args.threads)
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    scenes = make_scenes(args.data, args.scenes, args.seed, args.photos)
    n_faces = sum(len(s.faces) for s in scenes)
    tallies, decode = evaluate(scenes, args.yunet, thresholds, args.threads, not args.no_haar)
    md = [f"{len(scenes)} scenes ({args.scenes}), {n_faces} faces, seed {args.seed}, {args.threads} thread(s) (OpenCV, onnxruntime); "
          f"match: IoU >= {MATCH_IOU} with the pasted chip; detections < {DEFAULT_MIN_FACE_SIZE} px dropped.", "",
          "Recall by face side (px) and false faces per image:", "", *recall_table(tallies, len(scenes)), "",
          "Recall of faces >= 40 px by condition (faces; a face can be in several):", "",
          *condition_table(tallies), "",
          f"Recall of faces >= 40 px by photo width (faces), threshold {DEFAULT_DET_THRESHOLD:g}:", "",
          *width_table(tallies, DEFAULT_DET_THRESHOLD), "",
          "Mean time per image (detector only, after decoding):", "", *time_table(tallies, decode), "",
          "Real photos (licence-clear, shipped in pip packages):", "",
          *real_photo_check(args.yunet, args.photos, thresholds)]
    text = "\n".join(md)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
