"""The arm64 (Raspberry Pi) emulation check: scripts/check-aarch64.sh must find the same answers on
arm64 (Debian under qemu-user) as on this host. Slow (a rootfs build on first use, then minutes
of emulation): runs only with --runslow, and is skipped where the host cannot emulate arm64.

Models: the shipped models/agegender_{int8,fp32}.onnx when both exist, else stand-ins built with
scripts/aarch64_standin_models.py (needs onnx). Images: $AGEGENDER_AARCH64_IMAGES if set, else
the script's generated faces. Detectors: none and haar, and yunet when ../shared has the test
YuNet. The rootfs cache is $AGEGENDER_AARCH64_CACHE (script default).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check-aarch64.sh"
CANNOT_EMULATE = 77

pytestmark = pytest.mark.aarch64


def _models(tmp_path: Path) -> tuple[Path, Path]:
    int8, fp32 = REPO / "models" / "agegender_int8.onnx", REPO / "models" / "agegender_fp32.onnx"
    if int8.is_file() and fp32.is_file():
        return int8, fp32
    pytest.importorskip("onnx", reason="building stand-in models needs onnx (the dev extra)")
    out = tmp_path / "standin"
    subprocess.run([sys.executable, str(REPO / "scripts" / "aarch64_standin_models.py"), str(out)], check=True,
                   capture_output=True, text=True)
    return out / "agegender_int8.onnx", out / "agegender_fp32.onnx"


def test_arm64_answers_match_x86(tmp_path):
    if sys.platform != "linux":
        pytest.skip("the arm64 emulation check needs Linux (binfmt_misc, chroot)")
    int8, fp32 = _models(tmp_path)
    cmd = ["bash", str(SCRIPT), "--model-int8", str(int8), "--model-fp32", str(fp32)]
    if os.environ.get("AGEGENDER_AARCH64_IMAGES"):
        cmd += ["--images", os.environ["AGEGENDER_AARCH64_IMAGES"]]
    detectors = ["none", "haar"]
    yunet = SHARED / "models" / "face_detection_yunet_2026may.onnx"
    if yunet.is_file():
        cmd += ["--yunet-model", str(yunet)]
        detectors.append("yunet")
    env = dict(os.environ)
    # the x86 side is this interpreter's agegender-run
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3 * 3600)
    report = f"--- stdout\n{res.stdout}\n--- stderr\n{res.stderr[-6000:]}"
    if res.returncode == CANNOT_EMULATE:
        pytest.skip(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "cannot emulate arm64")
    assert res.returncode == 0, report
    assert "same" in res.stdout and "DIFFERENCES" not in res.stdout, report
    # every (model, detector) run was compared, on each emulated CPU, and found faces
    lines = res.stdout.splitlines()
    cpus = [line for line in lines if line.startswith("== x86 vs arm64")]
    assert cpus, report
    for model in ("int8", "fp32"):
        for det in detectors:
            rows = [line for line in lines if line.split()[:2] == [model, det]]
            assert len(rows) == len(cpus) and all(r.rstrip().endswith("same") for r in rows), report
