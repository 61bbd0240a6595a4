"""One fold: fresh model, optimizer, scheduler and seed; best epoch on validation, then the test fold."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass
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
from ..runtime.fsutil import write_json, write_text
from ..runtime.labels import AGE_GROUPS, GENDERS
from ..runtime.metrics import age_gender_metrics, confusion
from .config import TrainConfig
from .data import FaceDataset, train_transform

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
    fold: int | None
    faces: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    scored: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    data_info: dict[str, Any]
    train_data: str


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


@torch.no_grad()
def predict(net: torch.nn.Module, faces: np.ndarray, idx: np.ndarray, device: torch.device,
            batch_size: int = 256) -> dict[str, np.ndarray]:
    """Softmax probabilities of the eval faces (the runtime's own input, untouched)."""
    net.eval()
    outs: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(idx), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(faces[idx[s:s + batch_size]].transpose(0, 3, 1, 2))).float()
        for k, v in net(x.to(device)).items():
            outs.setdefault(k, []).append(torch.softmax(v.float(), 1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate(net: torch.nn.Module, fd: FoldData, idx: np.ndarray, device: torch.device) -> tuple[dict, dict]:
    probs = predict(net, fd.faces, idx, device)
    ap = probs["age"].argmax(1) if "age" in probs else None
    gp = probs["gender"].argmax(1) if "gender" in probs else None
    m = age_gender_metrics(fd.age[idx] if ap is not None else None, ap,
                           fd.gender[idx] if gp is not None else None, gp, fd.scored[idx])
    return m, {"age_pred": ap, "gender_pred": gp}


def _score(m: dict) -> float:
    vals = [m[k] for k in ("age_exact", "gender_acc") if k in m and not math.isnan(m[k])]
    return float(np.mean(vals)) if vals else 0.0


def _make_optim(cfg: TrainConfig, net: torch.nn.Module, steps: int):
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.25)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r} (onecycle, cosine)")
    return opt, sched


def train_fold(cfg: TrainConfig, fd: FoldData, model_args: ModelArgs, fold_dir: Path, di: DistInfo,
               resume: bool, progress: bool = True) -> dict[str, Any]:
    """Train one fold from scratch (or from its last.pt), return its test metrics."""
    device = resolve_device(cfg.device) if di.world == 1 or cfg.device != "auto" else (
        torch.device(f"cuda:{di.local_rank}") if torch.cuda.is_available() else torch.device("cpu"))
    fold_seed = cfg.seed + (fd.fold or 0) * 1000
    seed_everything(fold_seed)
    fold_dir.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train", fd.train_idx), ("validation", fd.val_idx), ("test", fd.test_idx)):
        if len(idx) == 0:
            raise ValueError(f"fold {fd.fold}: the {name} split is empty (too few images or subjects)")

    net = create_net(model_args, pretrained=cfg.pretrained, init_weights=cfg.init_weights)
    if cfg.freeze_backbone:
        for p in net.backbone.parameters():
            p.requires_grad_(False)
    net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    params, gflops = count_flops(net.cpu(), model_args.img_size)
    net.to(device)

    ds = FaceDataset(fd.faces, fd.train_idx, fd.age, fd.gender, train_transform(model_args.img_size, cfg.augment))
    sampler = DistributedSampler(ds, num_replicas=di.world, rank=di.rank, seed=fold_seed, drop_last=True) \
        if di.world > 1 else None
    g = torch.Generator().manual_seed(fold_seed)
    per_rank_batch = max(1, cfg.batch_size // di.world)
    loader = DataLoader(ds, batch_size=per_rank_batch, shuffle=sampler is None, sampler=sampler,
                        drop_last=len(ds) > per_rank_batch, num_workers=cfg.workers, generator=g,
                        persistent_workers=cfg.workers > 0)
    steps = cfg.epochs * max(1, len(loader))
    opt, sched = _make_optim(cfg, net, steps)
    model = net
    if di.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = device.type == "cuda"
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_score, history = 1, -1.0, []
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"
    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best_score, history = state["epoch"] + 1, state["best_score"], state["history"]
        torch.set_rng_state(state["rng"]["torch"])
        log.info("fold %s: resuming at epoch %d", fd.fold, start_epoch)

    ckpt_common = dict(config=cfg.to_dict(), data=fd.data_info, train_data=fd.train_data, fold=fd.fold)
    header = (f"fold {fd.fold}: {model_args.arch} {model_args.img_size}px task={model_args.task} "
              f"params={params / 1e6:.2f}M GFLOPs={gflops:.3f} train={len(fd.train_idx)} val={len(fd.val_idx)} "
              f"test={len(fd.test_idx)} seed={fold_seed}")
    if di.main:
        if start_epoch == 1:  # a resumed fold keeps its log
            write_text(fold_dir / "train_log.txt", header + "\n")
        log.info(header)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        t0, seen, loss_sum, data_time, tic = time.time(), 0, 0.0, 0.0, time.time()
        bar = tqdm(loader, desc=f"fold {fd.fold} epoch {epoch}/{cfg.epochs}", disable=not (progress and di.main),
                   leave=False, mininterval=2)
        for x, age, gender in bar:
            data_time += time.time() - tic
            x, age, gender = x.to(device, non_blocking=True), age.to(device), gender.to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=use_amp):
                out = model(x)
                loss = _loss(out, age, gender, cfg.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        ts = teacher.args.img_size
                        t_out = teacher(x if ts == x.shape[-1] else
                                        F.interpolate(x, size=(ts, ts), mode="bilinear", align_corners=False))
                    loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * _distill_loss(out, t_out, cfg.distill_temp)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(x)
            loss_sum += float(loss.detach()) * len(x)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
            tic = time.time()
        train_time = time.time() - t0
        val_m, _ = evaluate(net, fd, fd.val_idx, device)
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": sched.get_last_lr()[0],
               **{f"val_{k}": v for k, v in val_m.items()}, "img_per_s": seen * di.world / max(train_time, 1e-9),
               "data_time_s": data_time, "epoch_time_s": time.time() - t0}
        history.append(row)
        score = _score(val_m)
        improved = score > best_score
        if improved:
            best_score = score
        if di.main:
            line = (f"epoch {epoch:3d}/{cfg.epochs} loss {row['train_loss']:.4f} lr {row['lr']:.2e} "
                    + " ".join(f"val_{k} {v:.4f}" for k, v in val_m.items() if not k.startswith("n_"))
                    + f" | {row['img_per_s']:.0f} img/s, data {data_time:.1f}s, epoch {row['epoch_time_s']:.1f}s"
                    + (" *best*" if improved else ""))
            log.info(line)
            with open(fold_dir / "train_log.txt", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            _write_metrics_csv(fold_dir / "metrics.csv", history)
            if improved:
                save_checkpoint(best_path, make_checkpoint(net, crop_margin=cfg.crop_margin, epoch=epoch,
                                                           metrics={"val": val_m}, **ckpt_common))
            last = make_checkpoint(net, crop_margin=cfg.crop_margin, epoch=epoch, metrics={"val": val_m},
                                   **ckpt_common)
            last.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), best_score=best_score,
                        history=history, rng={"torch": torch.get_rng_state()})
            save_checkpoint(last_path, last)
        if di.world > 1:
            dist.barrier()

    best = load_checkpoint(best_path)
    net.load_state_dict(best["model"])
    test_m, preds = evaluate(net, fd, fd.test_idx, device)
    result = {"fold": fd.fold, **{k: v for k, v in test_m.items()}, "n_test": int(len(fd.test_idx)),
              "best_epoch": best["epoch"], "params": params, "gflops": gflops}
    if di.main:
        best["metrics"] = {"val": best["metrics"]["val"], "test": test_m}
        save_checkpoint(best_path, best)
        cms = {}
        if preds["age_pred"] is not None:
            cms["age"] = confusion(fd.age[fd.test_idx], preds["age_pred"], len(AGE_GROUPS), fd.scored[fd.test_idx]).tolist()
        if preds["gender_pred"] is not None:
            cms["gender"] = confusion(fd.gender[fd.test_idx], preds["gender_pred"], len(GENDERS)).tolist()
        result["confusion"] = cms
        with open(fold_dir / "train_log.txt", "a", encoding="utf-8") as fh:
            fh.write(f"test (best epoch {best['epoch']}): "
                     + " ".join(f"{k} {v:.4f}" for k, v in test_m.items() if not k.startswith("n_")) + "\n")
        write_json(fold_dir / "result.json", result)
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
    p = fold_dir / "result.json"
    return json.loads(p.read_text()) if p.is_file() else None
