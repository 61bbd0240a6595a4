"""The network: a timm backbone with one small head per task, normalisation inside.

The model takes what the runtime feeds the ONNX graph — float RGB 0..255, NCHW — and
normalises with its own buffers, so training, export and runtime share one input format.
Checkpoints describe themselves (``model_args``), so a model can be rebuilt from the file alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..runtime.labels import AGE_GROUPS, GENDERS

log = logging.getLogger(__name__)

CKPT_FORMAT = "agegender-checkpoint"
CKPT_VERSION = 1
TASKS = ("both", "age", "gender")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not one of ours."""


@dataclass(frozen=True)
class ModelArgs:
    """Everything needed to rebuild the network (stored in every checkpoint)."""

    arch: str = "mobilenetv3_large_100"
    task: str = "both"
    img_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    drop_rate: float = 0.2
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(v) for v in known[k])
        return cls(**known)


def heads_for(task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return {"both": ("age", "gender"), "age": ("age",), "gender": ("gender",)}[task]


class AgeGenderNet(nn.Module):
    """timm backbone (no classifier) + linear heads; input float RGB 0..255."""

    def __init__(self, args: ModelArgs, backbone: nn.Module | None = None):
        super().__init__()
        self.args = args
        self.backbone = backbone if backbone is not None else timm.create_model(
            args.arch, pretrained=False, num_classes=0, **args.timm_kwargs)
        # MobileNetV3 keeps a conv head after pooling: its width is head_hidden_size, not num_features
        nf = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.drop = nn.Dropout(args.drop_rate)
        self.heads = nn.ModuleDict()
        if "age" in heads_for(args.task):
            self.heads["age"] = nn.Linear(nf, len(AGE_GROUPS))
        if "gender" in heads_for(args.task):
            self.heads["gender"] = nn.Linear(nf, len(GENDERS))
        self.register_buffer("mean", torch.tensor(args.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(args.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        feats = self.drop(self.backbone(x))
        return {name: head(feats) for name, head in self.heads.items()}


class ProbsModel(nn.Module):
    """What is exported: softmax probabilities as a tuple in the ONNX output order."""

    def __init__(self, net: AgeGenderNet):
        super().__init__()
        self.net = net
        self.output_names = tuple(f"{h}_probs" for h in heads_for(net.args.task))

    def forward(self, image: torch.Tensor):
        logits = self.net(image)
        return tuple(torch.softmax(logits[name.removesuffix("_probs")], dim=1) for name in self.output_names)


def _strip(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def load_init_weights(backbone: nn.Module, path: str | os.PathLike) -> tuple[int, int]:
    """Load a local ImageNet checkpoint into ``backbone``; returns (tensors loaded, tensors in backbone).

    Keys are matched by name first (a timm-format file). When most names differ (e.g.
    torchvision's ``mobilenet_v2-b0353104.pth`` into timm's ``mobilenetv2_100``) tensors are
    paired in order while their shapes agree; the ImageNet classifier, absent from the
    headless backbone, is left out. Fewer than half the tensors loaded is an error.
    """
    path = Path(path)
    try:
        src = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        raise CheckpointError(f"{path}: cannot read init weights: {e}") from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(src, dict) and isinstance(src.get(key), dict):
            src = src[key]
    if not isinstance(src, dict) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    dst = backbone.state_dict()
    by_name = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    dst_items = _strip(dst)
    if len(by_name) >= 0.9 * len(dst_items):
        mapped = by_name
    else:
        mapped = {}
        for (dk, dv), (_, sv) in zip(dst_items, _strip(src)):
            if dv.shape != sv.shape:
                break
            mapped[dk] = sv
    if len(mapped) < 0.5 * len(dst_items):
        raise CheckpointError(f"{path}: only {len(mapped)} of {len(dst_items)} tensors fit "
                              f"{type(backbone).__name__}; is it the right architecture?")
    backbone.load_state_dict(mapped, strict=False)
    log.info("init weights %s: %d of %d backbone tensors loaded", path, len(mapped), len(dst_items))
    return len(mapped), len(dst_items)


def create_net(args: ModelArgs, pretrained: bool = False, init_weights: str | None = None) -> AgeGenderNet:
    """Build the network; ``pretrained`` uses timm's hub weights, ``init_weights`` a local file."""
    backbone = timm.create_model(args.arch, pretrained=pretrained, num_classes=0, **args.timm_kwargs)
    if init_weights:
        load_init_weights(backbone, init_weights)
    return AgeGenderNet(args, backbone)


def default_model_args(arch: str, task: str, img_size: int, **timm_kwargs: Any) -> ModelArgs:
    """ModelArgs with the arch's own normalisation (timm's pretrained config)."""
    probe = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
    cfg = timm.data.resolve_data_config({}, model=probe)
    return ModelArgs(arch=arch, task=task, img_size=img_size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                     timm_kwargs=dict(timm_kwargs))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one of our checkpoints safely (``weights_only=True``) and check it is ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable agegender checkpoint ({first})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not an agegender checkpoint (no format={CKPT_FORMAT!r} entry)")
    if int(ckpt.get("format_version", 0)) > CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format_version')} is newer than this "
                              f"agegender understands ({CKPT_VERSION}); upgrade agegender")
    for key in ("model", "model_args"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return ckpt


def net_from_checkpoint(ckpt: dict[str, Any]) -> AgeGenderNet:
    """Rebuild the network described by a checkpoint and load its weights (eval mode)."""
    net = AgeGenderNet(ModelArgs.from_dict(ckpt["model_args"]))
    try:
        net.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit {ckpt['model_args'].get('arch')}: "
                              f"{str(e).splitlines()[0]}") from e
    return net.eval()


def library_versions() -> dict[str, str]:
    import platform

    import numpy

    from .. import __version__

    return {"agegender": __version__, "torch": str(torch.__version__), "timm": str(timm.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


def make_checkpoint(net: AgeGenderNet, *, crop_margin: float, config: dict[str, Any], data: dict[str, Any],
                    train_data: str, fold: int | None, epoch: int, metrics: dict[str, Any],
                    **extra: Any) -> dict[str, Any]:
    """A self-describing checkpoint: weights plus all that is needed to rebuild and export them.

    ``data`` = {"root", "format", "fold", "nfolds", "holdout"} names the labelled data and the test
    fold, so export can calibrate and gate without more flags. Only plain types and tensors, so
    ``torch.load(weights_only=True)`` reads it.
    """
    return {
        "format": CKPT_FORMAT,
        "format_version": CKPT_VERSION,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "model_args": net.args.to_dict(),
        "labels": {"age_groups": list(AGE_GROUPS), "genders": list(GENDERS)},
        "crop_margin": float(crop_margin),
        "config": config,
        "data": data,
        "train_data": train_data,
        "fold": fold,
        "epoch": int(epoch),
        "metrics": metrics,
        "versions": library_versions(),
        **extra,
    }


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the previous file of that name is kept)."""


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write a checkpoint atomically (temp file + rename): a failed write keeps the previous file and
    says why in one line naming ``path`` (a full disk as such)."""
    import shutil

    from ..runtime.fsutil import atomic_path, write_error_line

    try:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(ckpt, tmp)
    except OSError as e:
        raise CheckpointWriteError(write_error_line(e, path)) from e
    except RuntimeError as e:  # torch's zip writer drops errno: "[enforce fail ...] unexpected pos"
        need = _tensor_bytes(ckpt)
        try:
            free = shutil.disk_usage(Path(path).resolve().parent).free
        except OSError:
            free = None
        if free is not None and free < need:
            raise CheckpointWriteError(f"{path}: disk full (no space left on device: the checkpoint needs "
                                       f"about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)") from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointWriteError(f"{path}: cannot write the checkpoint ({first})") from e
