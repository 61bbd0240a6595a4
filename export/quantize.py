"""int8 post-training quantization with onnxruntime, and the float-island search that holds the gate.

``quantize_static`` (QDQ, per-channel S8 weights, U8 activations) after ``quant_pre_process``.
The classifier after the global pool and the softmax always stay float (see ``head_nodes``).
The search tries, in order, until the gate passes:

1. ``plain`` — every other op onnxruntime quantizes; with calibration ``auto`` first with MinMax,
   then with percentile ranges (outliers clipped), and the better of the two climbs on;
2. ``cheap-islands`` — also the first conv and the squeeze-excite branches in float (little compute,
   much of MobileNetV3's hard-sigmoid/Mul noise);
3. ``sensitive-N%`` — in addition the N % of the remaining quantized convs whose quantization noise
   is largest, measured once with ``onnxruntime.quantization.qdq_loss_debug`` (SQNR of each conv's
   weights and of its input activation, before vs. after quantization), for growing N; each with
   the element-wise ops that feed it, so that its input is float too.

Calibration ranges are computed once per method and reused by every attempt
(``calibration_cache_path``, where the installed onnxruntime has it).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..runtime.preprocess import to_input

log = logging.getLogger(__name__)

CALIB_METHODS = ("auto", "minmax", "percentile", "entropy")
AUTO_METHODS = ("minmax", "percentile")
SENSITIVE_FRACTIONS = (0.1, 0.25, 0.5)
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
POOL_OPS = ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool")
SENSITIVITY_IMAGES = 32


class QuantizeError(RuntimeError):
    """onnxruntime could not quantize the model with the requested settings."""


@dataclass(frozen=True)
class QuantSettings:
    """The fixed part of every attempt (the islands vary)."""

    calib_method: str = "auto"
    reduce_range: bool = False
    per_channel: bool = True
    calib_batch: int = 16

    def describe(self) -> str:
        return (f"QDQ static int8 (U8 activations, S8 {'per-channel' if self.per_channel else 'per-tensor'} weights"
                f"{', reduce_range' if self.reduce_range else ''}), {self.calib_method} calibration")


class FaceReader:
    """onnxruntime CalibrationDataReader over prepared faces (uint8 [N, S, S, 3]).

    All batches have one size (the largest divisor of N up to ``batch``): onnxruntime's histogram
    calibrators (entropy, percentile) stack the batches and fail on a shorter last one.
    """

    def __init__(self, faces: np.ndarray, batch: int = 16):
        n = max(1, len(faces))
        self.faces, self.batch = faces, max(d for d in range(1, max(1, batch) + 1) if n % d == 0)
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
    """The first conv and the squeeze-excite branches: every node from a pooling op to the Mul that
    scales a feature map by its result (the head is left to ``head_nodes``). Little compute, much of
    MobileNetV3's quantization noise."""
    shapes = _shapes(model)
    cons = _consumers(model)
    nodes = list(model.graph.node)
    keep: list[str] = []
    first = next((n for n in nodes if n.op_type in QUANTIZED_OPS), None)
    if first is not None and first.op_type == "Conv":
        keep.append(first.name)
    for pool in nodes:
        if pool.op_type not in POOL_OPS:
            continue
        keep.append(pool.name)
        stack, seen = [pool], {pool.name}
        while stack:
            for o in stack.pop().output:
                for c in cons.get(o, []):
                    if c.name in seen:
                        continue
                    seen.add(c.name)
                    if any(_spatial(shapes.get(out)) for out in c.output):
                        if c.op_type == "Mul":  # the rescaling of the feature map ends the branch
                            keep.append(c.name)
                        continue
                    keep.append(c.name)
                    stack.append(c)
    head = set(head_nodes(model))
    return [n for n in dict.fromkeys(keep) if n not in head]


def with_inputs(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """``names`` plus the element-wise ops that feed them from the previous conv (hard-swish's
    HardSigmoid and Mul, Relu, Add, ...): otherwise a float conv would still read a quantized input."""
    producer = {o: n for n in model.graph.node for o in n.output}
    by_name = {n.name: n for n in model.graph.node}
    out: list[str] = []
    for name in names:
        out.append(name)
        stack = [t for t in by_name[name].input[:1]]
        while stack:
            p = producer.get(stack.pop())
            if p is None or p.op_type in QUANTIZED_OPS or p.op_type in POOL_OPS or p.name in out:
                continue
            out.append(p.name)
            stack.extend(p.input)
    return list(dict.fromkeys(out))


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return cons


def _spatial(shape: list[int | str] | None) -> bool:
    """A feature map with more than one pixel (unknown shapes count as spatial)."""
    if not shape or len(shape) != 4:
        return shape is None or len(shape) > 2
    h, w = shape[2], shape[3]
    return not (h == 1 and w == 1)


def _after_global_pool(model: onnx.ModelProto, shapes: dict[str, list[int | str]]) -> set[str]:
    """The global pool and the nodes downstream of it: the last pooling after which no tensor is
    spatial any more (a squeeze-excite pool is multiplied back onto a feature map)."""
    cons = _consumers(model)
    for n in reversed(model.graph.node):
        if n.op_type not in POOL_OPS:
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
             cache_path: Path, extra_options: dict[str, Any] | None = None) -> None:
    """One quantize_static call; ranges come from ``cache_path`` once it exists."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra = {"CalibMaxIntermediateOutputs": 8, **(extra_options or {})}
    kwargs = {}
    if "calibration_cache_path" in inspect.signature(quantize_static).parameters:  # newer onnxruntime: calibrate once
        kwargs["calibration_cache_path"] = str(cache_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints to stdout
            quantize_static(str(prep_path), str(out_path), FaceReader(faces, settings.calib_batch),
                            quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                            calibrate_method=_calibrate_method(settings.calib_method), extra_options=extra,
                            **kwargs)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many unrelated types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = "; try --calib-method minmax" if settings.calib_method != "minmax" else ""
        raise QuantizeError(f"onnxruntime quantize_static failed ({settings.calib_method} calibration): "
                            f"{first}{hint}") from e


def conv_noise(prep_path: Path, faces: np.ndarray, settings: QuantSettings, exclude: list[str], cache_path: Path,
               workdir: Path) -> dict[str, float]:
    """Quantization noise-to-signal ratio of each quantized compute node (weights + input activation).

    From ``qdq_loss_debug`` on a model quantized like the attempt (``exclude`` float) but keeping
    Relu/Clip explicit (``QDQKeepRemovableActivations``; otherwise an activation's own clipping would
    count as noise): SQNR of each weight (float vs. dequantized) and of each activation before vs.
    after its QuantizeLinear/DequantizeLinear pair; the two noise powers are added.
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         compute_signal_to_quantization_noice_ratio,
                                                         compute_weight_error, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    qdq_path, aug = workdir / "sensitivity_qdq.onnx", workdir / "sensitivity_aug.onnx"
    quantize(prep_path, qdq_path, faces, settings, exclude, cache_path, {"QDQKeepRemovableActivations": True})
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
    quantized_nodes: int
    settings: QuantSettings

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "calib_method": self.settings.calib_method, "float_nodes": len(self.excluded),
                "quantized_nodes": self.quantized_nodes,
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
    """Quantize with growing float islands until ``evaluate(path)["passed"]``; keep every attempt's gate.

    With ``settings.calib_method == "auto"`` the plain rung is tried with MinMax and, if that fails,
    with percentile calibration; the better of the two (closest to passing) goes on up the ladder.
    """
    model = onnx.load(str(prep_path))
    all_q = quantizable_nodes(model)
    result = SearchResult(None)

    def attempt(name: str, exclude: list[str], s: QuantSettings) -> Attempt:
        t = time.perf_counter()
        path = workdir / f"int8_{len(result.attempts)}_{name}.onnx"
        quantize(prep_path, path, calib_faces, s, exclude, workdir / f"ranges_{s.calib_method}.json")
        gate = evaluate(path)
        n_int8 = len(set(all_q) - set(exclude))
        a = Attempt(name, list(exclude), path, gate, time.perf_counter() - t, n_int8, s)
        result.attempts.append(a)
        log.info("int8 attempt %-16s %-10s float nodes %3d: %s", name, s.calib_method, len(exclude),
                 "passed" if gate["passed"] else "; ".join(gate["failures"]))
        return a

    def done(a: Attempt) -> SearchResult | None:
        if a.gate["passed"]:
            result.chosen = a
            return result
        return None

    fixed = head_nodes(model)
    methods = AUTO_METHODS if settings.calib_method == "auto" else (settings.calib_method,)
    for method in methods:
        a = attempt("plain", fixed, replace(settings, calib_method=method))
        if done(a):
            return result
    if not auto:
        result.chosen = max(result.attempts, key=lambda x: x.gate.get("slack", -1.0))
        return result
    s = max(result.attempts, key=lambda x: x.gate.get("slack", -1.0)).settings
    islands = [n for n in cheap_islands(model) if n not in fixed]
    if islands:
        a = attempt("cheap-islands", fixed + islands, s)
        if done(a):
            return result
    cache = workdir / f"ranges_{s.calib_method}.json"
    noise = conv_noise(prep_path, calib_faces[:SENSITIVITY_IMAGES], s, fixed + islands, cache, workdir)
    result.sensitivity = dict(sorted(noise.items(), key=lambda kv: -kv[1]))
    ranked = [n for n in result.sensitivity if n not in fixed and n not in islands]
    tried: set[int] = set()
    for frac in SENSITIVE_FRACTIONS:
        k = max(1, math.ceil(frac * len(ranked)))
        if k in tried or not ranked:
            continue
        tried.add(k)
        if done(attempt(f"sensitive-{int(frac * 100)}%", fixed + islands + with_inputs(model, ranked[:k]), s)):
            return result
    result.chosen = max(result.attempts, key=lambda x: x.gate.get("slack", -1.0))
    return result


def describe_choice(res: SearchResult, calib_images: int) -> str:
    """The metadata "quantization" string."""
    a = res.chosen
    assert a is not None
    text = (f"int8: {a.settings.describe()} on {calib_images} images, onnxruntime quantize_static; "
            f"strategy {a.name}: {a.quantized_nodes} nodes int8, {len(a.excluded)} kept float")
    if not res.passed:
        text += f"; INT8 GATE FAILED ({'; '.join(a.gate.get('failures', []))}), written with --force"
    return text
