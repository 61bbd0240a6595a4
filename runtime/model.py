"""The ONNX classifier: one onnxruntime session, metadata read and validated on load."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .labels import AGE_GROUPS, GENDERS

FORMAT_VERSION = "1"
REQUIRED_KEYS = ("agegender_format", "age_groups", "genders", "input_size", "crop_margin", "arch", "task",
                 "quantization", "train_data", "metrics", "package_version")
TASK_OUTPUTS = {"both": ("age_probs", "gender_probs"), "age": ("age_probs",), "gender": ("gender_probs",)}


MAX_META_CHARS = 65536  # a metadata value longer than this is not ours (and json.loads of it could be slow)


class ModelError(ValueError):
    """A model file that cannot be used; the message says which file and what is wrong."""


def _json_value(props: dict[str, str], key: str) -> Any:
    """``props[key]`` parsed as JSON; hostile values (huge, deeply nested) are a ValueError."""
    text = props[key]
    if len(text) > MAX_META_CHARS:
        raise ValueError(f"{key} is {len(text):,} characters long")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{key} is nested too deeply") from None


def _label_list(props: dict[str, str], key: str) -> tuple[str, ...]:
    value = _json_value(props, key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a JSON list of strings")
    return tuple(value)


@dataclass(frozen=True)
class ModelMeta:
    """What an agegender ONNX file says about itself (its ``metadata_props``)."""

    age_groups: tuple[str, ...]
    genders: tuple[str, ...]
    input_size: int
    crop_margin: float
    arch: str
    task: str
    quantization: str
    train_data: str
    metrics: dict[str, Any]
    package_version: str
    raw: dict[str, str]

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMeta":
        missing = [k for k in REQUIRED_KEYS if k not in props]
        if missing:
            raise ModelError(f"{source}: not an agegender model: metadata lacks {', '.join(missing)}")
        if props["agegender_format"] != FORMAT_VERSION:
            raise ModelError(f"{source}: agegender_format {props['agegender_format']!r} is not supported "
                             f"(this runtime reads {FORMAT_VERSION!r})")
        try:
            age_groups = _label_list(props, "age_groups")
            genders = _label_list(props, "genders")
            metrics = _json_value(props, "metrics")
            input_size = int(props["input_size"])
            crop_margin = float(props["crop_margin"])
        except (ValueError, TypeError) as e:
            raise ModelError(f"{source}: malformed metadata ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(metrics, dict) or not math.isfinite(crop_margin):
            raise ModelError(f"{source}: malformed metadata (metrics must be an object, crop_margin finite)")
        if props["task"] not in TASK_OUTPUTS:
            raise ModelError(f"{source}: unknown task {props['task']!r} in metadata")
        if input_size < 8 or input_size > 2048 or not (-0.3 <= crop_margin <= 2.0):
            raise ModelError(f"{source}: implausible input_size {input_size} or crop_margin {crop_margin}")
        return cls(age_groups, genders, input_size, crop_margin, props["arch"], props["task"],
                   props["quantization"], props["train_data"], metrics, props["package_version"], dict(props))


def session_options(threads: int | None = None, exact: bool = False):
    """The runtime's onnxruntime options; ``exact`` turns off the fused int8 kernels (QDQ arithmetic as
    written: the int8 gate's reference, see ``export/kernels.py``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # Idle onnxruntime threads sleep instead of spinning: the reader thread, YuNet and the classifier
    # share the cores, and spinning took ~30 % more CPU for the same or a slower wall time at 2 threads
    # (benchmarks/README.md, throughput); at 1 thread nothing spins anyway.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def create_session(path: str | os.PathLike, threads: int | None = None, exact: bool = False):
    """An onnxruntime CPU session with the runtime's options (the export gates use this one too)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads, exact),
                                providers=["CPUExecutionProvider"])


class OnnxClassifier:
    """An agegender ONNX model: ``run(batch)`` -> {"age_probs": [N, 8], "gender_probs": [N, 2]}."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such model file")
        try:
            self.session = create_session(self.path, threads)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = ModelMeta.from_props(props, str(self.path))
        self._check_consistency()

    def _check_consistency(self) -> None:
        src = str(self.path)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "image":
            raise ModelError(f"{src}: expected one input named 'image', found {[i.name for i in inputs]}")
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"{src}: input 'image' is {inputs[0].type}, expected tensor(float) (float32)")
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3 or any(isinstance(s, int) and s != self.meta.input_size for s in shape[2:]):
            raise ModelError(f"{src}: input shape {shape} does not match [N, 3, {self.meta.input_size}, "
                             f"{self.meta.input_size}] from metadata")
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        expected = TASK_OUTPUTS[self.meta.task]
        if set(outputs) != set(expected):
            raise ModelError(f"{src}: task {self.meta.task!r} needs outputs {list(expected)}, model has {list(outputs)}")
        types = {o.name: o.type for o in self.session.get_outputs()}
        for name, labels in (("age_probs", self.meta.age_groups), ("gender_probs", self.meta.genders)):
            if name in outputs:
                shape = outputs[name]
                if types[name] != "tensor(float)" or len(shape) != 2:
                    raise ModelError(f"{src}: {name} is {types[name]} {shape}, expected float32 [N, {len(labels)}]")
                if isinstance(shape[-1], int) and shape[-1] != len(labels):
                    raise ModelError(f"{src}: {name} has {shape[-1]} classes but metadata lists {len(labels)}")
        if "age_probs" in outputs and tuple(self.meta.age_groups) != AGE_GROUPS:
            raise ModelError(f"{src}: age groups {list(self.meta.age_groups)} differ from this runtime's {list(AGE_GROUPS)}")
        if "gender_probs" in outputs and tuple(self.meta.genders) != GENDERS:
            raise ModelError(f"{src}: genders {list(self.meta.genders)} differ from this runtime's {list(GENDERS)}")
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def input_size(self) -> int:
        return self.meta.input_size

    @property
    def crop_margin(self) -> float:
        return self.meta.crop_margin

    def run(self, batch: np.ndarray, flip: bool = False) -> dict[str, np.ndarray]:
        """Probabilities for a float32 [N, 3, S, S] RGB 0..255 batch (see preprocess.to_input).

        ``flip``: average with the mirrored faces (one batch of 2N; about 1.8x the model time).
        """
        n = batch.shape[0]
        if n == 0:
            return {name: np.zeros((0, len(self.meta.age_groups if name == "age_probs" else self.meta.genders)),
                                   np.float32) for name in self.output_names}
        batch = batch.astype(np.float32, copy=False)
        if flip:
            batch = np.concatenate([batch, batch[..., ::-1]])
        outs = self.session.run(self.output_names, {"image": batch})
        if flip:
            outs = [(o[:n] + o[n:]) / 2 for o in outs]
        for name, o in zip(self.output_names, outs):
            if o.shape[0] != n or not np.isfinite(o).all():
                raise ModelError(f"{self.path}: {name} has non-finite values or a wrong shape {list(o.shape)} "
                                 f"for this input")
        return dict(zip(self.output_names, outs))
