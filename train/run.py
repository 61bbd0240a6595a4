"""A cross-validation run: data once, then one fresh model per test fold, then the summary."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from sklearn.model_selection import GroupShuffleSplit

from ..export.net import default_model_args
from ..export.parity import METRIC_KEYS
from ..runtime.datasets import DataReport, Record, is_holdout, label_arrays, read_dataset
from ..runtime.fsutil import write_json, write_text
from ..runtime.labels import AGE_GROUPS, GENDERS
from .config import NFOLDS, TrainConfig
from .data import build_cache
from .engine import DistInfo, FoldData, load_result, train_fold
from .plots import plot_curves, plot_fold_confusions

log = logging.getLogger(__name__)


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


def fold_split(records: list[Record], ok: np.ndarray, k: int, val_frac: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) indices of fold ``k`` among the readable images, no subject in two.

    Test = fold k; a subject of the test fold found in another fold (a CSV whose fold column splits
    a subject) is left out of training, with a warning; validation is carved out by subject.
    """
    folds_of = np.array([-1 if r.fold is None else r.fold for r in records])
    test = np.flatnonzero((folds_of == k) & ok)
    if len(test) == 0:
        raise ValueError(f"fold {k} has no readable images (folds present: {sorted(set(folds_of.tolist()))})")
    test_subjects = {records[i].subject for i in test}
    rest = np.flatnonzero((folds_of != k) & ok)
    shared = np.array([records[i].subject in test_subjects for i in rest], bool)
    if shared.any():
        log.warning("fold %d: %d training images of subjects in the test fold left out (a subject's images "
                    "should share one fold)", k, int(shared.sum()))
    tr, va = split_train_val(records, rest[~shared], val_frac, seed + k)
    return tr, va, test


def final_split(records: list[Record], ok: np.ndarray, val_frac: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, no test) indices of a --final run: every fold trains, validation carved by subject."""
    return (*split_train_val(records, np.flatnonzero(ok), val_frac, seed), np.array([], dtype=np.int64))


def describe_data(cfg: TrainConfig, fmt: str, n: int) -> str:
    name = Path(cfg.data).name or cfg.data
    extra = f", holdout {cfg.holdout:.0%} by file-name hash excluded" if cfg.holdout else ""
    return f"{fmt}:{name} ({n} images{extra})"


def _classes(labels: np.ndarray) -> list[int]:
    return sorted(set(labels[labels >= 0].tolist()))


def check_labels(cfg: TrainConfig, records: list[Record]) -> None:
    """Each trained head needs labels of two classes at least: one class trains a constant answer
    that scores 1.000 on a test fold of that class."""
    age, gender, _ = label_arrays(records)
    for task, article, labels, names, other in (("age", "an", age, AGE_GROUPS, "gender"),
                                                ("gender", "a", gender, GENDERS, "age")):
        if cfg.task not in ("both", task):
            continue
        present = _classes(labels)
        if not present:
            raise ValueError(f"{cfg.data}: no image has {article} {task} label, cannot train task {cfg.task!r}")
        if len(present) == 1:
            hint = f"; add images of other classes or train --task {other} only" if cfg.task == "both" else \
                "; add images of other classes"
            raise ValueError(f"{cfg.data}: every {task}-labelled image is {names[present[0]]!r}: a classifier "
                             f"cannot learn {task} from one class{hint}")


def load_records(cfg: TrainConfig) -> tuple[list[Record], DataReport]:
    """The labelled records the run uses: without the holdout, subsampled by --max-images, checked."""
    records, report = read_dataset(cfg.data, cfg.format)
    log.info("data: %s", report.describe())
    if cfg.holdout:
        before = len(records)
        records = [r for r in records if not is_holdout(Path(r.path).name, cfg.holdout)]
        log.info("holdout: %d of %d images kept out of training and CV", before - len(records), before)
    if cfg.max_images and len(records) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        records = [records[i] for i in sorted(rng.choice(len(records), cfg.max_images, replace=False))]
    check_labels(cfg, records)
    return records, report


def load_faces(cfg: TrainConfig, records: list[Record], di: DistInfo, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decoded faces (rank 0 fills the cache, the other ranks read it) and which could be read."""
    if di.main:
        faces, ok = build_cache(records, cfg.img_size, cfg.cache_path, progress=progress)
    if di.world > 1:
        dist.barrier()
        if not di.main:
            faces, ok = build_cache(records, cfg.img_size, cfg.cache_path, progress=False)
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d of %d images missing or unreadable: skipped", n_bad, len(records))
    if not ok.any():
        raise ValueError(f"{cfg.data}: none of the {len(records)} images could be read")
    return faces, ok


def _warn_single_class(fd: FoldData, trained: str) -> None:
    """The whole data set has two classes per head (check_labels); one fold's training split may not."""
    for task, labels in (("age", fd.age), ("gender", fd.gender)):
        if trained not in ("both", task):
            continue
        present = _classes(labels[fd.train_idx])
        if len(present) == 1:
            log.warning("fold %s: the training split holds one %s class only: its %s results mean little",
                        fd.fold, task, task)


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train every requested fold (skipping finished ones on resume) and write the summary."""
    di = init_distributed(cfg)
    out = Path(cfg.out)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // di.world))
    records, report = load_records(cfg)
    faces, ok = load_faces(cfg, records, di, progress)
    model_args = replace(default_model_args(cfg.arch, cfg.task, cfg.img_size, **cfg.timm_kwargs),
                         drop_rate=cfg.drop_rate)
    data_info = {"root": str(Path(cfg.data).resolve()), "format": report.format, "nfolds": NFOLDS,
                 "holdout": cfg.holdout}
    train_data = describe_data(cfg, report.format, int(ok.sum()))
    if cfg.final:
        return run_final(cfg, records, faces, ok, model_args, data_info, train_data, di, resume, progress)
    results = []
    for k in cfg.folds:
        fold_dir = out / f"fold{k}"
        done = load_result(fold_dir) if resume else None
        if done is not None:
            log.info("fold %d: finished earlier, kept", k)
            results.append(done)
        else:
            tr, va, te = fold_split(records, ok, k, cfg.val_frac, cfg.seed)
            fd = FoldData(k, faces, records, tr, va, te, {**data_info, "fold": k}, train_data)
            _warn_single_class(fd, cfg.task)
            results.append(train_fold(cfg, fd, model_args, fold_dir, di, resume=resume, progress=progress))
            if di.main:
                plot_fold_confusions(out, results[-1])
        if di.main:  # after every fold: an interrupted run keeps the summary of what it finished
            write_summary(out, summarize(results))
    if di.main:
        plot_curves(out, list(cfg.folds))
    if di.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summarize(results)


def run_final(cfg: TrainConfig, records: list[Record], faces: np.ndarray, ok: np.ndarray, model_args,
              data_info: dict, train_data: str, di: DistInfo, resume: bool, progress: bool) -> dict[str, Any]:
    """--final: one model on every fold, its epoch chosen on the validation split; OUT/final/."""
    out = Path(cfg.out)
    done = load_result(out / "final") if resume else None
    if done is not None:
        log.info("final model: finished earlier, kept")
        return summarize([done])
    tr, va, te = final_split(records, ok, cfg.val_frac, cfg.seed)
    # the validation faces by name: export-onnx's gate scores int8 on them (faces the model never trained on)
    info = {**data_info, "fold": None, "final": True, "val_frac": cfg.val_frac, "seed": cfg.seed,
            "val_files": sorted(Path(records[i].path).name for i in va)}
    fd = FoldData(None, faces, records, tr, va, te, info, train_data)
    _warn_single_class(fd, cfg.task)
    result = train_fold(cfg, fd, model_args, out / "final", di, resume=resume, progress=progress)
    summary = summarize([result])
    if di.main:
        write_summary(out, summary)
        plot_curves(out, ["final"])
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


def write_summary(out: Path, summary: dict) -> None:
    write_json(out / "summary.json", summary)
    write_text(out / "summary.csv", pd.DataFrame(summary["folds"]).to_csv(index=False))


def format_table(summary: dict) -> str:
    keys = list(summary["mean"])
    lines = ["fold  " + "  ".join(f"{k:>11}" for k in keys) + "  n_test"]
    for r in summary["folds"]:
        lines.append(f"{r['fold']:>4}  " + "  ".join(f"{r[k]:>11.4f}" for k in keys) + f"  {r['n_test']:>6}")
    if [r["fold"] for r in summary["folds"]] == ["final"]:
        lines.append("(final model: validation-split scores of its chosen epoch; it has no test fold)")
        return "\n".join(lines)
    lines.append("mean  " + "  ".join(f"{summary['mean'][k]:>6.4f}±{summary['std'][k]:.3f}" for k in keys))
    return "\n".join(lines)
