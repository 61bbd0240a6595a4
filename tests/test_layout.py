"""The package works from any directory, the clone's root included: no folder there shadows it, and the
README's Python API example runs as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# .ci/run points this at its runtime-only venv (a plain, non-editable `pip install .`): there a folder
# of the clone named like the package would shadow the installed one. An editable install cannot show it.
PYTHON = os.environ.get("AGEGENDER_RUNTIME_PYTHON") or sys.executable


def readme_api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No network: the `auto` detector's fetch fails at once (closed local port) and falls back to Haar."""
    return {**os.environ, "AGEGENDER_CACHE_DIR": str(tmp_path / "cache"),
            "AGEGENDER_DETECTOR_URL": "http://127.0.0.1:9/face_detection_yunet.onnx"}


def test_no_folder_of_the_clone_shadows_the_package():
    assert not (REPO / "agegender").exists()
    assert (REPO / "__init__.py").is_file()  # the root is the package (package-dir "agegender" = ".")


def test_the_runtime_imports_from_the_clone_root(tmp_path):
    code = "import agegender.runtime, agegender.models; print(agegender.runtime.__file__)"
    res = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).parent.name == "runtime"


def test_the_readme_api_example_runs_from_the_clone_root(tmp_path):
    photo = tmp_path / "photo.jpg"
    img = np.full((240, 320, 3), 120, np.uint8)
    cv2.rectangle(img, (100, 60), (220, 200), (60, 90, 160), -1)
    cv2.imwrite(str(photo), img)
    code = readme_api_example().replace('"photo.jpg"', repr(str(photo)))
    assert "Predictor" in code
    res = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=offline_env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
