"""Does an int8 model answer like its fp32 twin on every CPU kind? Through the real command.

Runs ``agegender-run --json --detector none --threads 1`` on N held-out UTKFace faces with each
fp32 model on this host, and with its int8 twin on this host and under ``qemu-x86_64-static -cpu
Haswell`` (an AVX2-only x86 CPU: answers only, emulation says nothing of speed), then prints the
top-1 agreement of every int8 run with its fp32 twin and the accuracy of each run.

    python benchmarks/int8_paths.py --data ../shared/data/utkface --n 400 \
        --pair models/agegender_fp32.onnx models/agegender_int8.onnx [--pair FP32 INT8 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from agegender.export.kernels import host_kind
from agegender.runtime.datasets import is_holdout, label_arrays, read_utkface
from agegender.runtime.labels import AGE_GROUPS, GENDERS
from agegender.runtime.metrics import age_gender_metrics

EMULATOR = ["qemu-x86_64-static", "-cpu", "Haswell"]


def answers(model: str, listing: Path, emulate: bool) -> tuple[np.ndarray, np.ndarray]:
    cmd = [*(EMULATOR if emulate else []), sys.executable, "-m", "agegender.runtime.cli", "--json", "--detector",
           "none", "--threads", "1", "--model", model, "-q", "-"]
    res = subprocess.run(cmd, stdin=listing.open(), capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    age = np.array([AGE_GROUPS.index(r["faces"][0]["age"]) for r in rows])
    gender = np.array([GENDERS.index(r["faces"][0]["gender"]) for r in rows])
    return age, gender


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--holdout", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("FP32", "INT8"))
    a = ap.parse_args()
    records, _ = read_utkface(a.data)
    records = [r for r in records if is_holdout(Path(r.path).name, a.holdout)][:a.n]
    at, gt, scored = label_arrays(records)
    print(f"{len(records)} held-out faces ({int(scored.sum())} age-scored), agegender-run --detector none --threads 1")
    print("| run | agrees with its fp32 twin (age / gender) | age exact | age 1-off | gender |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "faces.txt"
        listing.write_text("".join(r.path + "\n" for r in records))
        for fp32, int8 in a.pair:
            ref = answers(fp32, listing, emulate=False)
            runs = [(f"{fp32} (this host)", ref), (f"{int8} (this host: {host_kind()})", answers(int8, listing, False))]
            if shutil.which(EMULATOR[0]):
                runs.append((f"{int8} (emulated AVX2-only x86)", answers(int8, listing, emulate=True)))
            for name, (age, gender) in runs:
                m = age_gender_metrics(at, age, gt, gender, scored)
                print(f"| {name} | {(age == ref[0]).mean():.3f} / {(gender == ref[1]).mean():.3f} | "
                      f"{m['age_exact']:.3f} | {m['age_1off']:.3f} | {m['gender_acc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
