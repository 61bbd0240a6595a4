"""Checkpoint -> self-describing fp32 ONNX (and int8 ONNX), each behind its gate.

The ONNX file is the only contract with the runtime: input ``image`` float32 [N, 3, S, S] RGB
0..255 (normalisation inside the graph), outputs ``age_probs`` / ``gender_probs``, and
``metadata_props`` the runtime reads with onnxruntime alone. A file only appears under its final
name once its gate has passed (temp file + rename).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from . import kernels, parity
from .net import ProbsModel, load_checkpoint, net_from_checkpoint
from .quantize import QuantizeError, QuantSettings, describe_choice, preprocess, search
from ..runtime.fsutil import atomic_path, write_json
from ..runtime.labels import AGE_GROUPS, GENDERS
from ..runtime.model import FORMAT_VERSION, ModelError, OnnxClassifier

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
PARITY_TOL = 1e-4


class ExportError(RuntimeError):
    """The export cannot go on; the message is one line for the user."""


class GateFailed(ExportError):
    """A gate did not pass (the report is still written)."""


@dataclass(frozen=True)
class ExportConfig:
    """The export-onnx options (everything about the model comes from the checkpoint)."""

    checkpoint: str
    out: str
    name: str = "agegender"
    quantize: bool = False
    calib_data: str | None = None
    data_root: str | None = None
    calib_size: int = 300
    eval_size: int = 2000
    parity_size: int = 128
    opset: int = DEFAULT_OPSET
    max_drop: float = parity.DEFAULT_MAX_DROP_PT
    min_agreement: tuple[tuple[str, float], ...] = parity.DEFAULT_MIN_AGREEMENT
    agreement_margin: float = 0.0
    crop_margin: float | None = None
    calib_method: str = "auto"
    reduce_range: bool = False
    islands: bool = True
    latency_runs: int = 50
    emulated_size: int = 300
    force: bool = False
    progress: bool = True

    @property
    def fp32_path(self) -> Path:
        return Path(self.out) / f"{self.name}_fp32.onnx"

    @property
    def int8_path(self) -> Path:
        return Path(self.out) / f"{self.name}_int8.onnx"

    @property
    def report_path(self) -> Path:
        return Path(self.out) / ("parity.json" if self.name == "agegender" else f"{self.name}_parity.json")


# --------------------------------------------------------------------------- fp32 export
def metadata(ckpt: dict[str, Any], quantization: str, opset: int) -> dict[str, str]:
    """The metadata_props the runtime reads (README, "export-onnx"), plus provenance: epoch, fold, opset."""
    labels = ckpt.get("labels") or {}
    age_groups = list(labels.get("age_groups", AGE_GROUPS))
    genders = list(labels.get("genders", GENDERS))
    if tuple(age_groups) != AGE_GROUPS or tuple(genders) != GENDERS:
        raise ExportError(f"checkpoint labels {age_groups} / {genders} differ from this package's "
                          f"{list(AGE_GROUPS)} / {list(GENDERS)}: the runtime would refuse the model")
    args = ckpt["model_args"]
    return {
        "agegender_format": FORMAT_VERSION,
        "age_groups": json.dumps(age_groups),
        "genders": json.dumps(genders),
        "input_size": str(int(args["img_size"])),
        "crop_margin": repr(float(ckpt.get("crop_margin", 0.0))),
        "arch": str(args["arch"]),
        "task": str(args.get("task", "both")),
        "quantization": quantization,
        "train_data": str(ckpt.get("train_data") or "unknown"),
        "metrics": json.dumps(ckpt.get("metrics") or {}, default=_jsonable),
        "package_version": __version__,
        "checkpoint_epoch": str(ckpt.get("epoch", "")),
        "checkpoint_fold": "" if ckpt.get("fold") is None else str(ckpt.get("fold")),
        "opset": str(opset),
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def export_onnx(model: ProbsModel, path: Path, size: int, opset: int) -> None:
    """TorchScript exporter (``dynamo=False``): one self-contained file, dynamic batch axis."""
    dummy = torch.rand(2, 3, size, size) * 255.0
    names = list(model.output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, input_names=["image"], output_names=names,
                          dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=opset, do_constant_folding=True)


def finish_model(path: Path, props: dict[str, str]) -> None:
    """Write the metadata into ``path`` (kept in one file) and run the full ONNX checker."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: {len(external)} tensors are stored outside the file")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported model fails onnx.checker: {str(e).splitlines()[0]}") from e
    onnx.save_model(model, str(path), save_as_external_data=False)


def runtime_check(path: Path) -> OnnxClassifier:
    """Load the file the way the runtime does; its refusal is an export error."""
    try:
        return OnnxClassifier(path, threads=1)
    except ModelError as e:
        raise ExportError(f"the runtime refuses the exported model: {e}") from e


# --------------------------------------------------------------------------- pipeline
def _thresholds(cfg: ExportConfig) -> parity.Int8Thresholds:
    return parity.Int8Thresholds(cfg.max_drop, tuple(cfg.min_agreement), cfg.agreement_margin)


def check_outputs(cfg: ExportConfig) -> None:
    if cfg.force:
        return
    targets = [cfg.fp32_path] + ([cfg.int8_path] if cfg.quantize else [])
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise ExportError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                          f"use --force to overwrite")


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """The whole export; returns the report (also written to parity.json). Raises GateFailed."""
    check_outputs(cfg)
    ckpt = load_checkpoint(cfg.checkpoint)
    if cfg.crop_margin is not None:  # measured after training (benchmarks/measure_crop_margin.py)
        ckpt["crop_margin"] = float(cfg.crop_margin)
    bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{cfg.checkpoint}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}): "
                          f"the training run diverged; export an earlier checkpoint")
    net = net_from_checkpoint(ckpt)
    size = int(ckpt["model_args"]["img_size"])
    model = ProbsModel(net).eval()
    rep: dict[str, Any] = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "arch": net.args.arch, "task": net.args.task,
                  "input_size": size, "crop_margin": float(ckpt.get("crop_margin", 0.0)),
                  "package_version": __version__, "options": _options(cfg)}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    try:
        _run(cfg, ckpt, model, size, rep)
    finally:
        write_json(cfg.report_path, finite_json(rep))
    return rep


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as null: parity.json stays valid JSON for every reader."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _options(cfg: ExportConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["min_agreement"] = dict(cfg.min_agreement)
    d.pop("progress")
    return d


def _run(cfg: ExportConfig, ckpt: dict[str, Any], model: ProbsModel, size: int, rep: dict[str, Any]) -> None:
    src = parity.resolve_sources(ckpt, cfg.calib_data, cfg.data_root)
    for note in src.notes:  # also in parity.json, and in the error when images run short
        log.info("%s", note)
    n_test = cfg.eval_size if cfg.quantize else cfg.parity_size
    test = parity.load_faces(src.test, size, n_test, "test-fold faces", progress=cfg.progress)
    need_calib = cfg.calib_size if cfg.quantize else 0
    calib = parity.load_faces(src.calib, size, max(need_calib, cfg.parity_size), "calibration faces", seed=1,
                              progress=cfg.progress)
    gate_faces = _parity_faces(test, calib, cfg.parity_size)
    rep["data"] = {"calibration_source": src.calib_source, "test_source": src.test_source, "notes": src.notes,
                   "test_images": len(test), "calibration_images_available": len(calib),
                   "unreadable_skipped": test.failed + calib.failed}
    if len(gate_faces) < parity.PARITY_MIN_IMAGES:
        where = "; ".join(src.notes) or f"{src.calib_source} / {src.test_source}"
        raise ExportError(f"only {len(gate_faces)} readable images for the parity gate (need "
                          f"{parity.PARITY_MIN_IMAGES}): {where}; give --calib-data DIR with face images")

    with atomic_path(cfg.fp32_path, suffix=".onnx") as tmp:
        export_onnx(model, tmp, size, cfg.opset)
        finish_model(tmp, metadata(ckpt, "none", cfg.opset))
        ref = parity.predict_torch(model, gate_faces.faces)
        got = parity.predict_ort(parity.ort_session(tmp), gate_faces.faces)
        gate = parity.parity_gate(ref, got, PARITY_TOL)
        rep["fp32"] = {"path": str(cfg.fp32_path), "parity": gate, "bytes": tmp.stat().st_size}
        if not gate["passed"]:
            _remove_stale(cfg, both=True)
            if gate["nonfinite"]:
                raise GateFailed(f"fp32 parity gate failed: the model outputs NaN/inf "
                                 f"({'; '.join(gate['nonfinite'])}); no model written")
            raise GateFailed(f"fp32 parity gate failed: max |Δprob| {gate['max_abs_diff']:.2e} (limit "
                             f"{PARITY_TOL:g}), top-1 mismatches {gate['top1_mismatches']} on {gate['images']} "
                             f"images; no model written (see {cfg.report_path})")
        runtime_check(tmp)
    log.info("fp32 parity passed: max |Δprob| %.2e on %d images", gate["max_abs_diff"], gate["images"])
    one_face = gate_faces.faces[0]
    rep["fp32"]["latency_ms_1thread"] = parity.latency_ms(cfg.fp32_path, one_face, cfg.latency_runs)
    if cfg.quantize:
        _quantize(cfg, ckpt, test, calib, gate_faces, rep)


def _parity_faces(test: parity.FaceSet, calib: parity.FaceSet, n: int) -> parity.FaceSet:
    """Held-out faces first, topped up with calibration faces."""
    t = test.take(n)
    if len(t) >= n or not len(calib):
        return t
    c = calib.take(n - len(t))
    return parity.FaceSet(np.concatenate([t.faces, c.faces]) if len(t) else c.faces, t.records + c.records)


def _remove_stale(cfg: ExportConfig, both: bool) -> None:
    """Under --force a failed gate must not leave an older file under the final name."""
    for p in ([cfg.fp32_path] if both else []) + ([cfg.int8_path] if cfg.quantize else []):
        if p.exists():
            log.warning("removing the older %s (its gate failed in this run)", p)
            p.unlink()


def quant_settings(cfg: ExportConfig, ckpt: dict[str, Any]) -> QuantSettings:
    """The requested settings; a quantization-aware checkpoint brings its own scheme (its weights sit on
    the 7-bit grid of ``fakequant``, so they are quantized with onnxruntime's reduce_range and MinMax)."""
    if ckpt.get("qat"):
        if not cfg.reduce_range or cfg.calib_method not in ("auto", "minmax"):
            log.info("quantization-aware checkpoint: 7-bit weights (reduce_range), MinMax calibration")
        return QuantSettings("minmax", reduce_range=True)
    return QuantSettings(cfg.calib_method, cfg.reduce_range)


def qat_reference(ckpt: dict[str, Any], faces: np.ndarray) -> dict[str, np.ndarray] | None:
    """For a quantization-aware checkpoint: the torch fake-quant model's outputs (what the int8 file
    must reproduce); None for any other checkpoint."""
    qat = ckpt.get("qat")
    if not qat:
        return None
    from .fakequant import FakeQuantized, conv_bn_pairs

    net = net_from_checkpoint(ckpt)
    FakeQuantized(net, conv_bn_pairs(net, int(ckpt["model_args"]["img_size"])), qat.get("act_ranges"))
    return parity.predict_torch(ProbsModel(net).eval(), faces)


def qat_gate(ckpt: dict[str, Any], fakequant: dict[str, np.ndarray], int8: dict[str, np.ndarray],
             gate: dict[str, Any], th: parity.Int8Thresholds) -> dict[str, Any]:
    """A fine-tuned model is a new model: its int8 must agree with the fake-quant model it came from,
    and lose no more than ``max_drop`` against the checkpoint the fine-tuning started from."""
    failures = list(gate["failures"])
    # the torch model simulates rounding at conv inputs only; onnxruntime also rounds conv outputs and
    # residual sums, so faces whose two best classes nearly tie may flip: judged where the fake-quant
    # model's top-1 leads by at least CONFIDENT_MARGIN, every face recorded
    agree = parity.agreement(fakequant, int8, parity.CONFIDENT_MARGIN)
    for head, need in th.min_agreement:
        if head in agree and agree[head] < need:
            failures.append(f"fake-quant: {head} agreement {agree[head]:.4f} < {need:.4f} "
                            f"(faces with a top-1 lead >= {parity.CONFIDENT_MARGIN})")
    start = ((ckpt["qat"].get("start_metrics") or {}).get("test")) or {}
    got = gate.get("int8_metrics") or {}
    drops = {k: (start[k] - got[k]) * 100.0 for k in parity.METRIC_KEYS if k in start and k in got}
    for k, d in drops.items():
        if d > th.max_drop_pt + 1e-9:
            failures.append(f"vs the checkpoint fine-tuning started from: {k} drop {d:.2f} pt > {th.max_drop_pt:g} pt")
    return {"qat": {"agreement_with_fakequant": agree, "agreement_with_fakequant_all_faces": parity.agreement(fakequant, int8),
                    "start_test_metrics": start, "drop_vs_start_pt": drops,
                    "note": "start metrics are over the whole test fold; int8 over the gate's test faces"},
            "failures": failures, "passed": not failures}


def _quantize(cfg: ExportConfig, ckpt: dict[str, Any], test: parity.FaceSet, calib: parity.FaceSet,
              gate_faces: parity.FaceSet, rep: dict[str, Any]) -> None:
    th = _thresholds(cfg)
    calib_faces = calib.faces[:cfg.calib_size] if len(calib) else gate_faces.faces
    if len(test):
        judge, records, mode = test.faces, test.records, "test fold: accuracy drop and agreement with fp32"
    else:
        judge, records, mode = gate_faces.faces, None, "no labelled test fold: agreement with fp32 on parity images"
        log.warning("int8 gate: %s", mode)
    fp32_probs = parity.predict_ort(parity.ort_session(cfg.fp32_path), judge, desc="fp32 on gate images",
                                    progress=cfg.progress)
    settings = quant_settings(cfg, ckpt)

    fakequant_probs = qat_reference(ckpt, judge)

    def evaluate(path: Path) -> dict[str, Any]:
        gate = kernels.judge_paths(path, fp32_probs, judge, records, th, cfg.emulated_size)
        if fakequant_probs is not None:
            gate.update(qat_gate(ckpt, fakequant_probs, kernels.predict(path, judge), gate, th))
        return gate

    with tempfile.TemporaryDirectory(prefix="agegender-quant-") as work:
        wd = Path(work)
        prep = wd / "prep.onnx"
        preprocess(cfg.fp32_path, prep)
        try:
            res = search(prep, calib_faces, evaluate, settings, wd, auto=cfg.islands)
        except QuantizeError as e:
            rep["int8"] = {"error": str(e), "written": False}
            raise
        chosen = res.chosen
        assert chosen is not None
        info = {"path": str(cfg.int8_path), "settings": asdict(chosen.settings), "requested": asdict(settings),
                "calibration_images": len(calib_faces),
                "gate_mode": mode, "thresholds": th.to_dict(), "passed": res.passed, "strategy": chosen.name,
                "gate": chosen.gate, "attempts": [a.summary() for a in res.attempts],
                "sensitivity_nsr": {k: round(v, 6) for k, v in res.sensitivity.items()}, "written": False}
        rep["int8"] = info
        if not res.passed and not cfg.force:
            _remove_stale(cfg, both=False)
            raise GateFailed(f"int8 gate failed ({'; '.join(chosen.gate['failures'])}) after "
                             f"{len(res.attempts)} attempts (best: {chosen.name}); no int8 model written, "
                             f"see {cfg.report_path}; --force writes it anyway")
        with atomic_path(cfg.int8_path, suffix=".onnx") as tmp:
            shutil.copyfile(chosen.path, tmp)
            props = metadata(ckpt, describe_choice(res, len(calib_faces)), cfg.opset)
            props["int8_gate"] = json.dumps({k: chosen.gate.get(k) for k in
                                             ("images", "agreement", "fp32_metrics", "int8_metrics", "drop_pt")
                                             if chosen.gate.get(k) is not None})
            finish_model(tmp, props)
            runtime_check(tmp)
            info["bytes"] = tmp.stat().st_size
        info["written"] = True
    info["latency_ms_1thread"] = parity.latency_ms(cfg.int8_path, gate_faces.faces[0], cfg.latency_runs)
    rep["speedup_1thread"] = rep["fp32"]["latency_ms_1thread"] / max(info["latency_ms_1thread"], 1e-9)
    if rep["speedup_1thread"] < 1.0:
        log.warning("the int8 model (%s) is not faster than fp32 on this CPU: %.2f vs %.2f ms/face",
                    chosen.name, info["latency_ms_1thread"], rep["fp32"]["latency_ms_1thread"])
    if not res.passed:
        raise GateFailed(f"int8 gate failed ({'; '.join(chosen.gate['failures'])}); written anyway "
                         f"(--force) to {cfg.int8_path}, the failure is recorded in its metadata")
