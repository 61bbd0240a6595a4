"""int8 post-training quantization with onnxruntime, and the float-island search that holds the gate.

``quantize_static`` (QDQ, per-channel S8 weights, U8 activations) after ``quant_pre_process``.
The classifier after the global pool and the softmax always stay float (see ``head_nodes``).
Networks with hard-swish and squeeze-excite (MobileNetV3) lose accuracy under plain PTQ, so the
search tries, in order, until the gate passes:

1. ``plain`` — every other op onnxruntime quantizes;
2. ``cheap-islands`` — also the first conv and the squeeze-excite branches in float (little compute);
3. ``sensitive-N%`` — in addition the N % of the remaining quantized convs whose quantization noise
   is largest, measured once with ``onnxruntime.quantization.qdq_loss_debug`` (SQNR of each conv's
   weights and of its input activation, before vs. after quantization), for growing N.

Calibration ranges are computed once and reused by every attempt (``calibration_cache_path``).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from agegender.runtime.preprocess import to_input

log = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
SENSITIVE_FRACTIONS = (0.1, 0.25, 0.5)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
SENSITIVITY_IMAGES = 32


class QuantizeError(RuntimeError):
    """onnxruntime could not quantize the model with the requested settings."""


@dataclass(frozen=True)
class QuantSettings:
    """The fixed part of every attempt (the islands vary)."""

    calib_method: str = "minmax"
    reduce_range: bool = False
    per_channel: bool = True
    calib_batch: int = 16

    def describe(self) -> str:
        return (f"QDQ static int8 (U8 activations, S8 {'per-channel' if self.per_channel else 'per-tensor'} weights"
                f"{', reduce_range' if self.reduce_range else ''}), {self.calib_method} calibration")


class FaceReader:
    """onnxruntime CalibrationDataReader over prepared faces (uint8 [N, S, S, 3])."""

    def __init__(self, faces: np.ndarray, batch: int = 16):
        self.faces, self.batch = faces, max(1, batch)
        self.start, self.end = 0, len(faces)
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.end:
            return None
        stop = min(self._pos + self.batch, self.end)
        x = to_input(self.faces[self._pos:stop])
        self._pos = stop
        return {"image": x}

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return math.ceil((self.end - self.start) / self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.faces))
        self._pos = self.start

    def rewind(self) -> None:
        self._pos = self.start


def preprocess(fp32_path: Path, out_path: Path) -> None:
    """onnxruntime's recommended pre-processing: symbolic + ONNX shape inference, basic graph optimisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path))
    model = onnx.load(str(out_path))
    names = {n.name for n in model.graph.node}
    for i, n in enumerate(model.graph.node):  # the optimiser leaves some nodes unnamed; exclusion is by name
        if not n.name:
            n.name = f"{n.op_type}_prep_{i}"
            while n.name in names:
                n.name += "_"
            names.add(n.name)
    onnx.save(model, str(out_path))


# --------------------------------------------------------------------------- graph structure
def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    out: dict[str, list[int | str]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the compute nodes that carry int8 weights (in graph order)."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Always float: the global pool and everything after it (classifier, softmax) and every node that
    writes a graph output. It is little compute, and int8 logits or probabilities would round close
    classes onto the same value (argmax ties) and report probabilities in steps of 1/255."""
    shapes = _shapes(model)
    outputs = {o.name for o in model.graph.output}
    keep = _after_global_pool(model, shapes) | {n.name for n in model.graph.node if set(n.output) & outputs}
    return [n.name for n in model.graph.node if n.name in keep]


def cheap_islands(model: onnx.ModelProto) -> list[str]:
    """The first conv and the squeeze-excite branches: every node on pooled (1x1) tensors and the Mul
    that scales a feature map by them (the head is left to ``head_nodes``). Little compute, much of
    MobileNetV3's quantization noise."""
    shapes = _shapes(model)
    nodes = list(model.graph.node)
    keep: list[str] = []
    first = next((n for n in nodes if n.op_type in QUANTIZED_OPS), None)
    if first is not None and first.op_type == "Conv":
        keep.append(first.name)
    for n in nodes:
        vector_out = n.output and not any(_spatial(shapes.get(o)) for o in n.output)
        vector_in = n.op_type == "Mul" and any(i in shapes and not _spatial(shapes[i]) and len(shapes[i]) == 4
                                               for i in n.input)
        if vector_out or vector_in:
            keep.append(n.name)
    head = set(head_nodes(model))
    return [n for n in dict.fromkeys(keep) if n not in head]


def _spatial(shape: list[int | str] | None) -> bool:
    """A feature map with more than one pixel (unknown shapes count as spatial)."""
    if not shape or len(shape) != 4:
        return shape is None or len(shape) > 2
    h, w = shape[2], shape[3]
    return not (h == 1 and w == 1)


def _after_global_pool(model: onnx.ModelProto, shapes: dict[str, list[int | str]]) -> set[str]:
    """The global pool and the nodes downstream of it: the last pooling after which no tensor is
    spatial any more (a squeeze-excite pool is multiplied back onto a feature map)."""
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    for n in reversed(model.graph.node):
        if n.op_type not in ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool"):
            continue
        seen: set[str] = set()
        stack, spatial = [n], False
        while stack and not spatial:
            cur = stack.pop()
            for o in cur.output:
                for c in cons.get(o, []):
                    if c.name in seen:
                        continue
                    seen.add(c.name)
                    if any(_spatial(shapes.get(out)) for out in c.output):
                        spatial = True
                    stack.append(c)
        if not spatial:
            return seen | {n.name}
    return set()


# --------------------------------------------------------------------------- quantize
def _calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def quantize(prep_path: Path, out_path: Path, faces: np.ndarray, settings: QuantSettings, exclude: list[str],
             cache_path: Path) -> None:
    """One quantize_static call; ranges come from ``cache_path`` once it exists."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra = {"CalibMaxIntermediateOutputs": 8}
    kwargs = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # newer onnxruntime: calibrate once
        kwargs["calibration_cache_path"] = str(cache_path)
    try:
        quantize_static(str(prep_path), str(out_path), FaceReader(faces, settings.calib_batch),
                        quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                        calibrate_method=_calibrate_method(settings.calib_method), extra_options=extra, **kwargs)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many unrelated types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "; try --calib-method minmax" if settings.calib_method != "minmax" else ""
        raise QuantizeError(f"onnxruntime quantize_static failed ({settings.calib_method} calibration): "
                            f"{first}{hint}") from e


def conv_noise(prep_path: Path, qdq_path: Path, faces: np.ndarray, workdir: Path) -> dict[str, float]:
    """Quantization noise-to-signal ratio of each quantized compute node (weights + input activation).

    From ``qdq_loss_debug``: SQNR of each weight (float vs. dequantized) and of each activation
    before vs. after its QuantizeLinear/DequantizeLinear pair; the two noise powers are added.
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         compute_signal_to_quantization_noice_ratio,
                                                         compute_weight_error, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    aug = workdir / "sensitivity_qdq.onnx"
    modify_model_output_intermediate_tensors(str(qdq_path), str(aug))
    acts = collect_activations(str(aug), FaceReader(faces, 8))
    act_err = {name: compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"])
               for name, m in create_activation_matching(acts).items()}
    w_err = compute_weight_error(create_weight_matching(str(prep_path), str(qdq_path)))
    aug.unlink(missing_ok=True)

    def nsr(sqnr_db: float | None) -> float:
        return 0.0 if sqnr_db is None or not math.isfinite(sqnr_db) else 10.0 ** (-sqnr_db / 10.0)

    model = onnx.load(str(prep_path), load_external_data=False)
    out: dict[str, float] = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        a = act_err.get(n.input[0])
        w = w_err.get(n.input[1]) if len(n.input) > 1 else None
        if a is None and w is None:
            continue  # not quantized in this attempt
        out[n.name] = nsr(a) + nsr(w)
    return out


# --------------------------------------------------------------------------- search
@dataclass
class Attempt:
    name: str
    excluded: list[str]
    path: Path
    gate: dict[str, Any]
    seconds: float
    quantized_nodes: int = 0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "float_nodes": len(self.excluded), "quantized_nodes": self.quantized_nodes,
                "passed": bool(self.gate.get("passed")), "failures": self.gate.get("failures", []),
                "agreement": self.gate.get("agreement"), "drop_pt": self.gate.get("drop_pt"),
                "seconds": round(self.seconds, 2), "excluded": self.excluded}


@dataclass
class SearchResult:
    chosen: Attempt | None  # the first attempt that passed, else the one closest to passing
    attempts: list[Attempt] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.chosen is not None and bool(self.chosen.gate.get("passed"))


def search(prep_path: Path, calib_faces: np.ndarray, evaluate: Callable[[Path], dict[str, Any]],
           settings: QuantSettings, workdir: Path, auto: bool = True) -> SearchResult:
    """Quantize with growing float islands until ``evaluate(path)["passed"]``; keep every attempt's gate."""
    model = onnx.load(str(prep_path))
    all_q = quantizable_nodes(model)
    cache = workdir / "calibration_ranges.json"
    result = SearchResult(None)

    def attempt(name: str, exclude: list[str]) -> Attempt:
        t = time.perf_counter()
        path = workdir / f"int8_{len(result.attempts)}_{name}.onnx"
        quantize(prep_path, path, calib_faces, settings, exclude, cache)
        gate = evaluate(path)
        a = Attempt(name, list(exclude), path, gate, time.perf_counter() - t, len(all_q) - len(exclude))
        result.attempts.append(a)
        log.info("int8 attempt %-16s float nodes %3d: %s", name, len(exclude),
                 "passed" if gate["passed"] else "; ".join(gate["failures"]))
        return a

    fixed = head_nodes(model)
    a = attempt("plain", fixed)
    if a.gate["passed"] or not auto:
        result.chosen = a
        return result
    islands = [n for n in cheap_islands(model) if n not in fixed]
    if islands:
        a = attempt("cheap-islands", fixed + islands)
        if a.gate["passed"]:
            result.chosen = a
            return result
    noise = conv_noise(prep_path, a.path, calib_faces[:SENSITIVITY_IMAGES], workdir)
    result.sensitivity = dict(sorted(noise.items(), key=lambda kv: -kv[1]))
    ranked = [n for n in result.sensitivity if n not in fixed and n not in islands]
    done: set[int] = set()
    for frac in SENSITIVE_FRACTIONS:
        k = max(1, math.ceil(frac * len(ranked)))
        if k in done or not ranked:
            continue
        done.add(k)
        a = attempt(f"sensitive-{int(frac * 100)}%", fixed + islands + ranked[:k])
        if a.gate["passed"]:
            result.chosen = a
            return result
    result.chosen = max(result.attempts, key=lambda x: x.gate.get("slack", -1.0))
    return result


def describe_choice(settings: QuantSettings, res: SearchResult, calib_images: int) -> str:
    """The metadata "quantization" string."""
    a = res.chosen
    assert a is not None
    text = (f"int8: {settings.describe()} on {calib_images} images, onnxruntime quantize_static; "
            f"strategy {a.name}: {a.quantized_nodes} nodes int8, {len(a.excluded)} kept float")
    if not res.passed:
        text += f"; INT8 GATE FAILED ({'; '.join(a.gate.get('failures', []))}), written with --force"
    return text
