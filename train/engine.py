"""One fold: fresh model, optimizer, scheduler and seed; best epoch on validation, then the test fold.

``train_fold`` reads as the steps of a fold, one function each: set up (device, model, FLOPs,
loader, DDP, optimizer), resume, train one epoch, save checkpoints, test. Evaluation is the export
gate's own: ``parity.predict_torch`` on the runtime's input and ``parity.metrics_of``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..export.net import (AgeGenderNet, ModelArgs, create_net, load_checkpoint, make_checkpoint,
                          net_from_checkpoint, save_checkpoint)
from ..runtime.datasets import Record, label_arrays
from ..runtime.fsutil import write_json, write_text
from ..runtime.labels import AGE_GROUPS, GENDERS
from ..runtime.metrics import confusion
from .config import TrainConfig
from .data import FaceDataset, train_transform
from .evaluate import evaluate, score_of

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class FoldData:
    """The cached faces, their records and one fold's index split (labels derived from the records)."""

    fold: int | None
    faces: np.ndarray
    records: list[Record]
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    data_info: dict[str, Any]
    train_data: str
    age: np.ndarray = field(init=False)
    gender: np.ndarray = field(init=False)
    scored: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.age, self.gender, self.scored = label_arrays(self.records)


@dataclass
class FoldRun:
    """What the steps of one fold share: the network (and its DDP wrapper), optimiser, data."""

    cfg: TrainConfig
    fd: FoldData
    di: DistInfo
    fold_dir: Path
    seed: int
    device: torch.device
    net: AgeGenderNet
    model: torch.nn.Module  # net, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: Any
    loader: DataLoader
    sampler: DistributedSampler | None
    teacher: AgeGenderNet | None
    params: int
    gflops: float

    @property
    def use_amp(self) -> bool:
        return self.device.type == "cuda"

    def checkpoint(self, epoch: int, val_m: dict) -> dict[str, Any]:
        return make_checkpoint(self.net, crop_margin=self.cfg.crop_margin, config=self.cfg.to_dict(),
                               data=self.fd.data_info, train_data=self.fd.train_data, fold=self.fd.fold,
                               epoch=epoch, metrics={"val": val_m})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def fold_device(cfg: TrainConfig, di: DistInfo) -> torch.device:
    """--device, or under torchrun with auto each rank's own GPU."""
    if di.world == 1 or cfg.device != "auto":
        return resolve_device(cfg.device)
    return torch.device(f"cuda:{di.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def count_flops(net: AgeGenderNet, size: int) -> tuple[int, float]:
    """(parameters, GFLOPs per image at the real input size; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in net.parameters())
    was_training = net.training
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, 3, size, size))
    net.train(was_training)
    return params, fc.get_total_flops() / 1e9


def _loss(out: dict[str, torch.Tensor], age: torch.Tensor, gender: torch.Tensor, smoothing: float) -> torch.Tensor:
    total = out[next(iter(out))].sum() * 0.0
    if "age" in out and (age >= 0).any():
        total = total + F.cross_entropy(out["age"], age, ignore_index=-1, label_smoothing=smoothing)
    if "gender" in out and (gender >= 0).any():
        total = total + F.cross_entropy(out["gender"], gender, ignore_index=-1, label_smoothing=smoothing)
    return total


def _distill_loss(out: dict[str, torch.Tensor], teacher_out: dict[str, torch.Tensor], temp: float) -> torch.Tensor:
    """KL divergence to the teacher's softened probabilities, per head (Hinton et al.)."""
    total = out[next(iter(out))].sum() * 0.0
    for name, logits in out.items():
        if name in teacher_out:
            total = total + F.kl_div(F.log_softmax(logits / temp, 1), F.softmax(teacher_out[name] / temp, 1),
                                     reduction="batchmean") * temp * temp
    return total


def load_teacher(path: str, device: torch.device) -> AgeGenderNet:
    teacher = net_from_checkpoint(load_checkpoint(path)).to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def _make_optim(cfg: TrainConfig, net: torch.nn.Module, steps: int):
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps = max(steps, 1)
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by (pct_start * total_steps - 1): a warm-up of exactly one step (4 steps
        # in all) divides by zero, so such a short run warms up over two
        pct = 0.25 if steps != 4 else 0.5
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=pct)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r} (onecycle, cosine)")
    return opt, sched


def _build_net(cfg: TrainConfig, model_args: ModelArgs, device: torch.device) -> tuple[AgeGenderNet, int, float]:
    """The fresh network on ``device`` with its size (parameters, GFLOPs counted on the CPU)."""
    net = create_net(model_args, pretrained=cfg.pretrained, init_weights=cfg.init_weights)
    if cfg.freeze_backbone:
        for p in net.backbone.parameters():
            p.requires_grad_(False)
    params, gflops = count_flops(net, model_args.img_size)
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net, params, gflops


def _make_loader(cfg: TrainConfig, fd: FoldData, size: int, di: DistInfo, seed: int
                 ) -> tuple[DataLoader, DistributedSampler | None]:
    ds = FaceDataset(fd.faces, fd.train_idx, fd.age, fd.gender, train_transform(size, cfg.augment))
    sampler = DistributedSampler(ds, num_replicas=di.world, rank=di.rank, seed=seed, drop_last=True) \
        if di.world > 1 else None
    per_rank_batch = max(1, cfg.batch_size // di.world)
    if len(ds) <= per_rank_batch:
        log.warning("fold %s: --batch-size %d is not smaller than the %d training images: one batch per epoch",
                    fd.fold, cfg.batch_size, len(ds))
    loader = DataLoader(ds, batch_size=per_rank_batch, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(ds) > per_rank_batch, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=cfg.workers > 0)
    return loader, sampler


def setup_fold(cfg: TrainConfig, fd: FoldData, model_args: ModelArgs, fold_dir: Path, di: DistInfo) -> FoldRun:
    """Seed, device, fresh network, loader, optimiser and scheduler, DDP wrapper, teacher."""
    for name, idx in (("train", fd.train_idx), ("validation", fd.val_idx), ("test", fd.test_idx)):
        if len(idx) == 0 and not (name == "test" and fd.fold is None):  # fold None: --final, no test fold
            raise ValueError(f"fold {fd.fold}: the {name} split is empty (too few images or subjects)")
    seed = cfg.seed + (fd.fold or 0) * 1000
    seed_everything(seed)
    device = fold_device(cfg, di)
    net, params, gflops = _build_net(cfg, model_args, device)
    loader, sampler = _make_loader(cfg, fd, model_args.img_size, di, seed)
    opt, sched = _make_optim(cfg, net, cfg.epochs * max(1, len(loader)))
    model: torch.nn.Module = net
    if di.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    return FoldRun(cfg, fd, di, fold_dir, seed, device, net, model, opt, sched, loader, sampler, teacher,
                   params, gflops)


def restore(run: FoldRun, path: Path) -> tuple[int, float, list[dict]]:
    """Continue from ``last.pt``: weights, optimiser, scheduler, RNG; (next epoch, best score, history)."""
    state = load_checkpoint(path)
    run.net.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    log.info("fold %s: resuming at epoch %d", run.fd.fold, state["epoch"] + 1)
    return state["epoch"] + 1, state["best_score"], state["history"]


def _forward_loss(run: FoldRun, x: torch.Tensor, age: torch.Tensor, gender: torch.Tensor) -> torch.Tensor:
    cfg = run.cfg
    with torch.autocast(run.device.type, enabled=run.use_amp):
        out = run.model(x)
        loss = _loss(out, age, gender, cfg.label_smoothing)
        if run.teacher is not None:
            with torch.no_grad():
                ts = run.teacher.args.img_size
                t_out = run.teacher(x if ts == x.shape[-1] else
                                    F.interpolate(x, size=(ts, ts), mode="bilinear", align_corners=False))
            loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * _distill_loss(out, t_out, cfg.distill_temp)
    return loss


def train_epoch(run: FoldRun, epoch: int, scaler: torch.amp.GradScaler, progress: bool) -> dict[str, float]:
    """One pass over the training split: the epoch's loss, last learning rate, speed and data wait."""
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    run.model.train()
    t0, seen, loss_sum, data_time, tic = time.time(), 0, 0.0, 0.0, time.time()
    bar = tqdm(run.loader, desc=f"fold {run.fd.fold} epoch {epoch}/{run.cfg.epochs}",
               disable=not (progress and run.di.main), leave=False, mininterval=2)
    for x, age, gender in bar:
        data_time += time.time() - tic
        x, age, gender = x.to(run.device, non_blocking=True), age.to(run.device), gender.to(run.device)
        if run.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        loss = _forward_loss(run, x, age, gender)
        run.opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(run.opt)
        scaler.update()
        run.sched.step()
        seen += len(x)
        loss_sum += float(loss.detach()) * len(x)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        tic = time.time()
    train_time = time.time() - t0
    return {"train_loss": loss_sum / max(seen, 1), "lr": run.sched.get_last_lr()[0],
            "img_per_s": seen * run.di.world / max(train_time, 1e-9), "data_time_s": data_time}


def save_epoch(run: FoldRun, epoch: int, val_m: dict, best_score: float, history: list[dict], improved: bool) -> None:
    """metrics.csv, best.pt when the epoch improved, and last.pt with all a resume needs."""
    _write_metrics_csv(run.fold_dir / "metrics.csv", history)
    if improved:
        save_checkpoint(run.fold_dir / "best.pt", run.checkpoint(epoch, val_m))
    last = run.checkpoint(epoch, val_m)
    last.update(optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), best_score=best_score,
                history=history, rng={"torch": torch.get_rng_state()})
    save_checkpoint(run.fold_dir / "last.pt", last)


def _epoch_line(cfg: TrainConfig, row: dict, val_m: dict, improved: bool) -> str:
    return (f"epoch {row['epoch']:3d}/{cfg.epochs} loss {row['train_loss']:.4f} lr {row['lr']:.2e} "
            + " ".join(f"val_{k} {v:.4f}" for k, v in val_m.items() if not k.startswith("n_"))
            + f" | {row['img_per_s']:.0f} img/s, data {row['data_time_s']:.1f}s, epoch {row['epoch_time_s']:.1f}s"
            + (" *best*" if improved else ""))


def test_fold(run: FoldRun) -> dict[str, Any]:
    """The best epoch on the test fold: result.json, the test metrics in best.pt, confusion matrices."""
    fd = run.fd
    best = load_checkpoint(run.fold_dir / "best.pt")
    if len(fd.test_idx) == 0:  # --final: no test fold; the result is the chosen epoch's validation scores
        result = {"fold": "final", **best["metrics"]["val"], "n_test": 0, "scored_on": "validation",
                  "n_val": int(len(fd.val_idx)), "best_epoch": best["epoch"], "params": run.params,
                  "gflops": run.gflops}
        if run.di.main:
            write_json(run.fold_dir / "result.json", result)
        return result
    run.net.load_state_dict(best["model"])
    test_m, probs = evaluate(run.net, fd.faces, fd.records, fd.test_idx, run.device)
    result = {"fold": fd.fold, **test_m, "n_test": int(len(fd.test_idx)), "best_epoch": best["epoch"],
              "params": run.params, "gflops": run.gflops}
    if run.di.main:
        best["metrics"] = {"val": best["metrics"]["val"], "test": test_m}
        save_checkpoint(run.fold_dir / "best.pt", best)
        cms = {}
        if "age" in probs:
            cms["age"] = confusion(fd.age[fd.test_idx], probs["age"].argmax(1), len(AGE_GROUPS),
                                   fd.scored[fd.test_idx]).tolist()
        if "gender" in probs:
            cms["gender"] = confusion(fd.gender[fd.test_idx], probs["gender"].argmax(1), len(GENDERS)).tolist()
        result["confusion"] = cms
        log.info("test (best epoch %d): %s", best["epoch"],
                 " ".join(f"{k} {v:.4f}" for k, v in test_m.items() if not k.startswith("n_")))
        write_json(run.fold_dir / "result.json", result)
    return result


@contextlib.contextmanager
def fold_log(fold_dir: Path, append: bool, enabled: bool) -> Iterator[None]:
    """While a fold trains, the package's log lines also go to foldK/train_log.txt (rank 0 only);
    a resumed fold appends to its log."""
    if not enabled:
        yield
        return
    handler = logging.FileHandler(fold_dir / "train_log.txt", mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    pkg = logging.getLogger(__name__.rsplit(".", 2)[0])  # "agegender"
    level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:  # the file gets the INFO lines whatever the console shows
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)
        handler.close()


def train_fold(cfg: TrainConfig, fd: FoldData, model_args: ModelArgs, fold_dir: Path, di: DistInfo,
               resume: bool, progress: bool = True) -> dict[str, Any]:
    """Train one fold from scratch (or from its last.pt), return its test metrics."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    run = setup_fold(cfg, fd, model_args, fold_dir, di)
    last_path = fold_dir / "last.pt"
    resuming = resume and last_path.is_file()
    with fold_log(fold_dir, append=resuming, enabled=di.main):
        log.info("fold %s: %s %dpx task=%s params=%.2fM GFLOPs=%.3f train=%d val=%d test=%d seed=%d",
                 "final" if fd.fold is None else fd.fold,
                 model_args.arch, model_args.img_size, model_args.task, run.params / 1e6, run.gflops,
                 len(fd.train_idx), len(fd.val_idx), len(fd.test_idx), run.seed)
        start_epoch, best_score, history = restore(run, last_path) if resuming else (1, -1.0, [])
        scaler = torch.amp.GradScaler("cuda", enabled=run.use_amp)
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.time()
            stats = train_epoch(run, epoch, scaler, progress)
            val_m, _ = evaluate(run.net, fd.faces, fd.records, fd.val_idx, run.device)
            row = {"epoch": epoch, "train_loss": stats["train_loss"], "lr": stats["lr"],
                   **{f"val_{k}": v for k, v in val_m.items()}, "img_per_s": stats["img_per_s"],
                   "data_time_s": stats["data_time_s"], "epoch_time_s": time.time() - t0}
            history.append(row)
            score = score_of(val_m)
            improved = score > best_score
            best_score = max(best_score, score)
            if di.main:
                log.info(_epoch_line(cfg, row, val_m, improved))
                save_epoch(run, epoch, val_m, best_score, history, improved)
            if di.world > 1:
                dist.barrier()
        result = test_fold(run)
    if di.world > 1:
        dist.barrier()
    return result


def _write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    write_text(path, buf.getvalue())


def load_result(fold_dir: Path) -> dict | None:
    """A finished fold's result.json, or None; an unusable one names itself (one line, no traceback)."""
    p = fold_dir / "result.json"
    if not p.is_file():
        return None
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{p}: unreadable fold result ({e}); delete it to train the fold again") from None
    if not isinstance(result, dict) or not {"fold", "n_test"} <= set(result):
        raise ValueError(f"{p}: not a fold result (a JSON object with fold and n_test); delete it to train "
                         f"the fold again")
    return result
