"""A cross-validation run: data once, then one fresh model per test fold, then the summary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.model_selection import GroupShuffleSplit

from ..export.net import default_model_args
from ..runtime.datasets import Record, is_holdout, label_arrays, read_dataset
from ..runtime.fsutil import write_json, write_text
from .config import TrainConfig
from .data import build_cache
from .engine import DistInfo, FoldData, load_result, train_fold
from .plots import plot_curves, plot_fold_confusions

log = logging.getLogger(__name__)
METRIC_KEYS = ("age_exact", "age_1off", "gender_acc")


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join a torchrun job when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def split_train_val(records: list[Record], idx: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation carved out of the training folds by subject (no subject in both)."""
    groups = np.array([records[i].subject for i in idx])
    if len(set(groups)) < 2:
        raise ValueError("the training folds hold fewer than 2 subjects: cannot carve a validation split")
    splitter = GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
    tr, va = next(splitter.split(idx, groups=groups))
    return idx[tr], idx[va]


def describe_data(cfg: TrainConfig, fmt: str, n: int) -> str:
    name = Path(cfg.data).name or cfg.data
    extra = f", holdout {cfg.holdout:.0%} by file-name hash excluded" if cfg.holdout else ""
    return f"{fmt}:{name} ({n} images{extra})"


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train every requested fold (skipping finished ones on resume) and write the summary."""
    di = init_distributed(cfg)
    out = Path(cfg.out)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // di.world))
    records, report = read_dataset(cfg.data, cfg.format)
    log.info("data: %s", report.describe())
    if cfg.holdout:
        before = len(records)
        records = [r for r in records if not is_holdout(Path(r.path).name, cfg.holdout)]
        log.info("holdout: %d of %d images kept out of training and CV", before - len(records), before)
    if cfg.max_images and len(records) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        records = [records[i] for i in sorted(rng.choice(len(records), cfg.max_images, replace=False))]
    age, gender, scored = label_arrays(records)
    if cfg.task in ("both", "age") and not (age >= 0).any():
        raise ValueError(f"{cfg.data}: no image has an age label, cannot train task {cfg.task!r}")
    if cfg.task in ("both", "gender") and not (gender >= 0).any():
        raise ValueError(f"{cfg.data}: no image has a gender label, cannot train task {cfg.task!r}")

    cache_dir = cfg.cache_dir or str(out / "cache")
    if di.main:
        faces, ok = build_cache(records, cfg.img_size, cache_dir, progress=progress)
    if di.world > 1:
        dist.barrier()
        if not di.main:
            faces, ok = build_cache(records, cfg.img_size, cache_dir, progress=False)
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d of %d images missing or unreadable: skipped", n_bad, len(records))
    if not ok.any():
        raise ValueError(f"{cfg.data}: none of the {len(records)} images could be read")
    folds_of = np.array([-1 if r.fold is None else r.fold for r in records])
    model_args = default_model_args(cfg.arch, cfg.task, cfg.img_size, **cfg.timm_kwargs)
    model_args = type(model_args)(**{**model_args.__dict__, "drop_rate": cfg.drop_rate})
    train_data = describe_data(cfg, report.format, int(ok.sum()))
    results = []
    for k in cfg.folds:
        fold_dir = out / f"fold{k}"
        done = load_result(fold_dir) if resume else None
        if done is not None:
            log.info("fold %d: finished earlier, kept", k)
            results.append(done)
        else:
            test_idx = np.flatnonzero((folds_of == k) & ok)
            rest = np.flatnonzero((folds_of != k) & ok)
            if len(test_idx) == 0:
                raise ValueError(f"fold {k} has no readable images (folds present: "
                                 f"{sorted(set(folds_of.tolist()))})")
            tr, va = split_train_val(records, rest, cfg.val_frac, cfg.seed + k)
            fd = FoldData(k, faces, age, gender, scored, tr, va, test_idx,
                          {"root": str(Path(cfg.data).resolve()), "format": report.format, "fold": k,
                           "nfolds": cfg.nfolds, "holdout": cfg.holdout}, train_data)
            results.append(train_fold(cfg, fd, model_args, fold_dir, di, resume=resume, progress=progress))
            if di.main:
                plot_fold_confusions(out, results[-1])
        if di.main:  # after every fold: an interrupted run keeps the summary of what it finished
            write_summary(out, summarize(results), results)
    summary = summarize(results)
    if di.main:
        plot_curves(out, list(cfg.folds))
    if di.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def summarize(results: list[dict]) -> dict[str, Any]:
    rows = [{"fold": r["fold"], **{k: r[k] for k in METRIC_KEYS if k in r}, "n_test": r["n_test"]} for r in results]
    df = pd.DataFrame(rows)
    keys = [k for k in METRIC_KEYS if k in df]
    mean = {k: float(df[k].mean()) for k in keys}
    std = {k: float(df[k].std(ddof=0)) for k in keys}
    return {"folds": rows, "mean": mean, "std": std}


def write_summary(out: Path, summary: dict, results: list[dict]) -> None:
    write_json(out / "summary.json", summary)
    write_text(out / "summary.csv", pd.DataFrame(summary["folds"]).to_csv(index=False))


def format_table(summary: dict) -> str:
    keys = list(summary["mean"])
    lines = ["fold  " + "  ".join(f"{k:>11}" for k in keys) + "  n_test"]
    for r in summary["folds"]:
        lines.append(f"{r['fold']:>4}  " + "  ".join(f"{r[k]:>11.4f}" for k in keys) + f"  {r['n_test']:>6}")
    lines.append("mean  " + "  ".join(f"{summary['mean'][k]:>6.4f}±{summary['std'][k]:.3f}" for k in keys))
    return "\n".join(lines)


def load_saved_config(out: Path) -> dict | None:
    p = out / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None
