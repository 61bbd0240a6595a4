"""Quantization-aware fine-tuning: a trained checkpoint -> one whose int8 answers like its float self.

Starts from the checkpoint's weights, folds its batch norms, and trains a few epochs on the
checkpoint's own training folds with the int8 scheme of ``export/fakequant.py`` simulated in the
forward pass (7-bit per-channel weights that no CPU kernel saturates, u8 activations). The best
epoch on the validation split (carved out of the training folds by subject, as training did) is
kept. The result is a new model: its float weights sit exactly on the int8 grid, so its fp32 ONNX
twin and its int8 ONNX differ only by activation rounding; the export gate judges the int8 against
both the new float weights and the checkpoint it started from (``qat.start_test_metrics``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..export.fakequant import FakeQuantized, conv_bn_pairs, fold_batchnorm, freeze_norms, set_range
from ..export.net import CheckpointError, load_checkpoint, net_from_checkpoint, save_checkpoint
from ..runtime.datasets import is_holdout, label_arrays, read_dataset
from .calibrate import calibrate
from .data import FaceDataset, build_cache, train_transform
from .engine import _loss, seed_everything
from .evaluate import evaluate, predict, score_of
from .run import final_split, fold_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QatConfig:
    checkpoint: str
    out: str
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 64
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    val_frac: float = 0.1
    seed: int = 42
    data: str | None = None
    cache_dir: str | None = None
    progress: bool = True


@dataclass
class Split:
    records: list
    faces: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    scored: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def load_split(ckpt: dict[str, Any], cfg: QatConfig) -> Split:
    """The checkpoint's own folds: training folds (minus validation), validation, test fold."""
    data = ckpt.get("data") or {}
    root = cfg.data or data.get("root")
    if not root or not Path(root).exists():
        raise CheckpointError(f"quantization-aware fine-tuning needs the data the checkpoint was trained on "
                              f"({root or 'not named in the checkpoint'}, format {data.get('format', '?')}, "
                              f"fold {data.get('fold')}, holdout {data.get('holdout', 0)}): give --data PATH")
    records, report = read_dataset(root, data.get("format") or "auto")
    holdout = float(data.get("holdout") or 0.0)
    if holdout:
        records = [r for r in records if not is_holdout(Path(r.path).name, holdout)]
    size = int(ckpt["model_args"]["img_size"])
    faces, ok = build_cache(records, size, cfg.cache_dir, progress=cfg.progress)
    if not ok.any():
        raise CheckpointError(f"{root}: none of the {len(records)} images could be read")
    age, gender, scored = label_arrays(records)
    k = data.get("fold")
    if data.get("final"):  # train-adience --final: every fold trained, validation carved as it was
        tr, va, test = final_split(records, ok, float(data.get("val_frac", cfg.val_frac)),
                                   int(data.get("seed", cfg.seed)))
    elif k is None:
        raise CheckpointError("the checkpoint names no test fold and is no --final model: quantization-aware "
                              "fine-tuning needs the split it was trained with")
    else:
        tr, va, test = fold_split(records, ok, int(k), cfg.val_frac, cfg.seed)
    log.info("QAT data: %s; train %d, val %d, test %d", report.describe(), len(tr), len(va), len(test))
    return Split(records, faces, age, gender, scored, tr, va, test)


def metrics(net: torch.nn.Module, s: Split, idx: np.ndarray) -> dict[str, float]:
    """The fold's metrics, computed as training and the export gate compute them."""
    return evaluate(net, s.faces, s.records, idx, torch.device("cpu"))[0]


def _epoch(net, fq: FakeQuantized, loader, opt, sched, smoothing: float, desc: str, progress: bool) -> float:
    net.train()
    freeze_norms(net)
    fq.observe(True)
    total, n = 0.0, 0
    for x, age, gender in tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=2):
        loss = _loss(net(x), age, gender, smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, n = total + float(loss.detach()) * len(x), n + len(x)
    fq.observe(False)
    return total / max(n, 1)


def run_qat(cfg: QatConfig) -> dict[str, Any]:
    """Fine-tune, keep the best validation epoch, write OUT/qat.pt; returns its summary."""
    seed_everything(cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint)
    net = net_from_checkpoint(ckpt)
    size = int(ckpt["model_args"]["img_size"])
    s = load_split(ckpt, cfg)
    start = {"val": metrics(net, s, s.val), "test": metrics(net, s, s.test) if len(s.test) else {}}
    log.info("start (float): val %s", _fmt(start["val"]))
    pairs = conv_bn_pairs(net, size)
    fold_batchnorm(pairs)
    fq = FakeQuantized(net, pairs)
    ds = FaceDataset(s.faces, s.train, s.age, s.gender, train_transform(size))
    loader = DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=True, drop_last=len(ds) > cfg.batch_size)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(loader)))
    with torch.no_grad():  # observe the activation ranges once before the first step
        net.eval()
        fq.observe(True)
        predict(net, s.faces, s.train[:512], torch.device("cpu"))
        fq.observe(False)
    best, best_state, history = -1.0, None, []
    for epoch in range(1, cfg.epochs + 1):
        t = time.time()
        loss = _epoch(net, fq, loader, opt, sched, cfg.label_smoothing, f"QAT epoch {epoch}", cfg.progress)
        val = metrics(net, s, s.val)
        history.append({"epoch": epoch, "loss": loss, **val, "seconds": round(time.time() - t, 1)})
        better = score_of(val) > best
        log.info("QAT epoch %d/%d loss %.4f val %s | %.0fs%s", epoch, cfg.epochs, loss, _fmt(val), time.time() - t,
                 " *best*" if better else "")
        if better:
            best = score_of(val)
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            best_ranges = fq.ranges()
    assert best_state is not None
    net.load_state_dict(best_state)
    for name, (lo, hi) in best_ranges.items():
        set_range(fq.act[name], lo, hi)
    final = {"val": metrics(net, s, s.val), "test": metrics(net, s, s.test) if len(s.test) else {}}
    labels = {"age": np.where(s.scored, s.age, -1), "gender": s.gender}
    calibration = calibrate(net, s.faces, s.val, labels)  # with the int8 scheme on: what the int8 file computes
    scheme = fq.remove()
    return _save(cfg, ckpt, net, s, start, final, history, {**scheme, "calibration": calibration})


def _save(cfg: QatConfig, ckpt, net, s: Split, start, final, history, scheme) -> dict[str, Any]:
    out = dict(ckpt)
    out["model"] = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    out["metrics"] = final
    out["bn_folded"] = True
    if (ckpt.get("data") or {}).get("final"):  # the split export-onnx's gate scores on (see train/run.py)
        out["data"] = {**ckpt["data"], "val_files": sorted(Path(s.records[i].path).name for i in s.val)}
    out["calibration"] = scheme.pop("calibration")
    out["qat"] = {**scheme, "from": str(Path(cfg.checkpoint).resolve()), "epochs": cfg.epochs, "lr": cfg.lr,
                  "start_metrics": start, "history": history}
    path = Path(cfg.out)
    save_checkpoint(path, out)
    which = "test" if final["test"] else "val"
    log.info("wrote %s: %s (fake-quant) %s; started from %s", path, which, _fmt(final[which]), _fmt(start[which]))
    return {**out["qat"], "calibration": out["calibration"]}


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k} {m[k]:.4f}" for k in ("age_exact", "age_1off", "gender_acc") if k in m)
