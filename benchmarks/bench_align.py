"""Does levelling the eyes (YuNet's landmarks) help the classifier on detected faces?

The scenes of ``bench_detect.py`` (held-out UTKFace faces pasted with rotations of up to +-25
degrees, blur, low light, JPEG), detected with the runtime's default YuNet settings; every face
matched to a pasted face (IoU >= 0.4) of at least ``--min-side`` px is classified twice by the
shipped model: the crop as today, and the same crop rotated so the eyes are level. Labels come
from the UTKFace names. (Levelling did not help, so it lives here, not in runtime/preprocess.py.)

    python benchmarks/bench_align.py --data ../shared/data/utkface \\
        --yunet ../shared/models/face_detection_yunet_2026may.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detect import make_scenes, match  # noqa: E402

from agegender.runtime.detect import YuNetDetector  # noqa: E402
from agegender.runtime.labels import age_in_group, age_to_group  # noqa: E402
from agegender.runtime.metrics import age_gender_metrics  # noqa: E402
from agegender.runtime.predictor import load_classifier, resolve_model_path  # noqa: E402
from agegender.runtime.preprocess import prepare_face, resize_square, square_box, to_input  # noqa: E402


def eye_angle(landmarks) -> float:
    """Degrees that level the eyes of YuNet's landmarks (right eye, left eye, ...); 0 without them."""
    if landmarks is None:
        return 0.0
    (xr, yr), (xl, yl) = landmarks[0], landmarks[1]
    return float(np.degrees(np.arctan2(yl - yr, xl - xr)))


def prepare_levelled(image: np.ndarray, box, margin: float, size: int, angle: float) -> np.ndarray:
    """``prepare_face``'s square crop, taken from the image rotated by ``angle`` about the box centre."""
    x1, y1, x2, y2 = square_box(box, margin)
    m = cv2.getRotationMatrix2D(((x1 + x2) / 2.0, (y1 + y2) / 2.0), angle, 1.0)
    m[:, 2] -= (x1, y1)
    crop = cv2.warpAffine(image, m, (x2 - x1, x2 - x1), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return resize_square(crop, size)


def collect(scenes, det: YuNetDetector, min_side: int):
    """(image, detection, face) for every pasted face found, of at least ``min_side`` px."""
    for scene in scenes:
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(scene.jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        dets = det.detect(img)
        owner, _ = match(dets, scene.faces)
        for face, o in zip(scene.faces, owner):
            if o >= 0 and face.box[2] - face.box[0] >= min_side:
                yield img, dets[o], face


def score(clf, crops: list[np.ndarray], faces) -> dict[str, float]:
    out = {"age_probs": [], "gender_probs": []}
    for i in range(0, len(crops), 64):
        res = clf.run(to_input(crops[i:i + 64]))
        for k in out:
            out[k].append(res[k])
    age_true = np.array([age_to_group(f.age) for f in faces])
    mask = np.array([age_in_group(f.age) for f in faces])
    return age_gender_metrics(age_true, np.concatenate(out["age_probs"]).argmax(1),
                              np.array([f.gender for f in faces]), np.concatenate(out["gender_probs"]).argmax(1),
                              age_mask=mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--yunet", type=Path, required=True)
    ap.add_argument("--model", help="agegender ONNX (default: the shipped int8 model)")
    ap.add_argument("--photos", type=Path, help="scikit-image's data folder (CC0 backgrounds), as bench_detect")
    ap.add_argument("--scenes", default="640x480:40,1280x886:40,1920x1080:10")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-side", type=int, default=40)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    clf = load_classifier(resolve_model_path(args.model), threads=1)
    size, margin = clf.meta.input_size, clf.meta.crop_margin
    scenes = make_scenes(args.data, args.scenes, args.seed, args.photos)
    rows = list(collect(scenes, YuNetDetector(args.yunet), args.min_side))
    faces = [f for _, _, f in rows]
    angles = [eye_angle(d.landmarks) for _, d, _ in rows]
    plain = [prepare_face(img, d.box, margin, size) for img, d, _ in rows]
    level = [prepare_levelled(img, d.box, margin, size, a) for (img, d, _), a in zip(rows, angles)]
    err = np.abs(np.array(angles) + np.array([f.angle for f in faces]))
    print(f"{len(scenes)} scenes, {len(rows)} detected faces >= {args.min_side} px; eye angle vs pasted rotation: "
          f"median |error| {np.median(err):.1f} deg")
    tilted = np.array([abs(f.angle) >= 10 for f in faces])
    print("| crop | faces | age exact | age 1-off | gender |\n|---|---|---|---|---|")
    for name, crops in (("as today", plain), ("eyes levelled", level)):
        for subset, sel in (("all", np.ones(len(faces), bool)), ("tilted >= 10 deg", tilted)):
            m = score(clf, [c for c, s in zip(crops, sel) if s], [f for f, s in zip(faces, sel) if s])
            print(f"| {name}, {subset} | {int(sel.sum())} | {m['age_exact']:.3f} | {m['age_1off']:.3f} | "
                  f"{m['gender_acc']:.3f} |")


if __name__ == "__main__":
    main()
