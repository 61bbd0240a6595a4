"""Runtime test helpers: a tiny ONNX model that follows the agegender contract, built with
``onnx.helper`` (no torch), and an isolated, offline environment.

Graph: image [N, 3, S, S] * ramp -> GlobalAveragePool -> Flatten -> (x / 255) @ W + b -> Softmax,
one head per output; ramp rises from 0.5 to 1.5 across the columns (mean 1), so the answer is a
left-right weighted mean colour of the face crop: not mirror-symmetric, and tests can compute it
exactly in numpy to check the runtime's preprocessing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from agegender.runtime.labels import AGE_GROUPS, GENDERS

TASK_HEADS = {"both": ("age_probs", "gender_probs"), "age": ("age_probs",), "gender": ("gender_probs",)}


def head_weights(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights [3, n] and bias [n] of one head (deterministic)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 4, (3, n)).astype(np.float32), rng.normal(0, 0.5, n).astype(np.float32))


def contract_metadata(task: str = "both", input_size: int = 32, crop_margin: float = 0.1) -> dict[str, str]:
    return {
        "agegender_format": "1", "age_groups": json.dumps(list(AGE_GROUPS)), "genders": json.dumps(list(GENDERS)),
        "input_size": str(input_size), "crop_margin": str(crop_margin), "arch": "contract-test",
        "task": task, "quantization": "none", "train_data": "none (test model)",
        "metrics": json.dumps({"age_exact": 0.0}), "package_version": "0.1.0",
    }


def column_ramp(size: int) -> np.ndarray:
    """The per-column weights [1, 1, 1, S] the model applies before pooling."""
    return np.linspace(0.5, 1.5, size, dtype=np.float32).reshape(1, 1, 1, size)


def reference_probs(batch: np.ndarray, task: str = "both") -> dict[str, np.ndarray]:
    """What the model computes, in numpy, for a float32 [N, 3, S, S] batch."""
    x = (batch * column_ramp(batch.shape[-1])).mean(axis=(2, 3)) / 255.0
    out = {}
    for name in TASK_HEADS[task]:
        w, b = head_weights(8 if name == "age_probs" else 2, 1 if name == "age_probs" else 2)
        z = x @ w + b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        out[name] = e / e.sum(axis=1, keepdims=True)
    return out


def build_contract_model(path: str | Path, task: str = "both", input_size: int = 32, crop_margin: float = 0.1,
                         metadata: dict[str, str] | None = None, drop_keys: Iterable[str] = (),
                         age_classes: int = 8) -> Path:
    """Write the model to ``path``; ``metadata`` overrides keys, ``drop_keys`` removes some."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["image", "ramp"], ["weighted"]),
        helper.make_node("GlobalAveragePool", ["weighted"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Div", ["flat", "c255"], ["x"]),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
             numpy_helper.from_array(column_ramp(input_size), "ramp")]
    outputs = []
    for name in TASK_HEADS[task]:
        n, seed = (age_classes, 1) if name == "age_probs" else (2, 2)
        w, b = head_weights(n, seed)
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
        nodes += [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_z"]),
                  helper.make_node("Softmax", [f"{name}_z"], [name], axis=1)]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", n]))
    graph = helper.make_graph(
        nodes, "agegender_contract",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="agegender-tests")
    model.ir_version = 8
    meta = contract_metadata(task, input_size, crop_margin)
    meta.update(metadata or {})
    for key in drop_keys:
        meta.pop(key, None)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- other runtime test helpers
FACE_NAME = "17_1_4_20170103201233799.jpg.chip.jpg"  # a UTKFace face both YuNet and Haar find on a canvas


def closed_port_url(name: str = "face_detection_yunet_2026may.onnx") -> str:
    """A URL on 127.0.0.1 where nothing listens: a fetch fails at once, never reaching the internet."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def isolate_runtime_env(monkeypatch, cache: Path) -> None:
    """No user settings, a private cache, and a detector URL that cannot reach the network."""
    for key in ("AGEGENDER_MODEL", "AGEGENDER_DETECTOR_MODEL", "AGEGENDER_DETECTOR_SHA256"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGEGENDER_CACHE_DIR", str(cache))
    monkeypatch.setenv("AGEGENDER_DETECTOR_URL", closed_port_url())
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def face_on_canvas(face_file: Path, canvas_wh: tuple[int, int] = (640, 480),
                   box: tuple[int, int, int, int] = (220, 140, 420, 340)) -> np.ndarray:
    """A BGR canvas with a UTKFace face resized into ``box`` (x1, y1, x2, y2)."""
    import cv2

    face = cv2.imread(str(face_file))
    canvas = np.full((canvas_wh[1], canvas_wh[0], 3), 120, np.uint8)
    x1, y1, x2, y2 = box
    canvas[y1:y2, x1:x2] = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    return canvas


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
