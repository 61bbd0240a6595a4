"""The runtime installs and runs without torch, timm or onnx (a Raspberry Pi has none of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
from contract_model import build_contract_model, closed_port_url

BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = {"torch", "timm", "onnx", "torchvision", "albumentations", "pandas", "sklearn", "matplotlib"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
""")


def _python(code: str, tmp_path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGEGENDER_CACHE_DIR": str(tmp_path / "cache"), "AGEGENDER_DETECTOR_URL": closed_port_url()}
    for key in ("AGEGENDER_MODEL", "AGEGENDER_DETECTOR_MODEL"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=120)


def test_runtime_and_cli_work_with_torch_timm_onnx_blocked(tmp_path):
    model = build_contract_model(tmp_path / "m.onnx")
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.full((48, 48, 3), 150, np.uint8))
    code = textwrap.dedent("""
        import agegender.runtime as rt
        assert "onnxruntime" not in sys.modules and "cv2" not in sys.modules, "labels must import light"
        faces = rt.Predictor(sys.argv[1], detector="none").predict(sys.argv[2])
        assert len(faces) == 1 and faces[0].age in rt.AGE_GROUPS
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        from agegender.runtime.cli import main
        sys.argv = ["agegender-run", "--json", "--model", sys.argv[1], "--detector", "auto", sys.argv[2]]
        main()
    """)
    res = _python(code, tmp_path, str(model), str(image))
    assert res.returncode == 0, res.stderr
    (row,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert row["path"] == str(image) and row["error"] is None and (row["width"], row["height"]) == (48, 48)
    assert "Traceback" not in res.stderr
    assert "Haar" in res.stderr  # offline: auto fell back with its warning


def test_entry_point_module_reads_stdin_and_reports_bad_files(tmp_path):
    model = build_contract_model(tmp_path / "m.onnx")
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((30, 30, 3), 80, np.uint8))
    code = "from agegender.runtime.cli import main\nsys.argv[0] = 'agegender-run'\nmain()\n"
    res = _python(code, tmp_path, "--model", str(model), "--detector", "none", "--json", "-",
                  stdin=f"{tmp_path / 'gone.jpg'}\n{good}\n")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["error"] is None for r in rows] == [False, True]
    assert res.stderr.strip().splitlines()[-1] == f"agegender-run: error: {tmp_path / 'gone.jpg'}: no such file"
