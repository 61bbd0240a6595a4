"""The training configuration: one frozen dataclass mirroring the CLI options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    format: str = "auto"
    arch: str = "mobilenetv3_large_100"
    task: str = "both"
    img_size: int = 224
    pretrained: bool = True
    init_weights: str | None = None
    freeze_backbone: bool = False
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    nfolds: int = 5
    holdout: float = 0.0
    val_frac: float = 0.1
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    drop_rate: float = 0.2
    augment: str = "default"
    workers: int = 0
    device: str = "auto"
    seed: int = 42
    crop_margin: float = 0.0
    max_images: int | None = None
    cache_dir: str | None = None
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_temp: float = 2.0
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folds"] = list(self.folds)
        return d

    # options that may differ between the original run and a --resume without changing results;
    # `folds` may differ too: a resume adds the requested folds to the saved ones (see with_saved_folds)
    RESUME_FREE = ("out", "workers", "device", "cache_dir", "folds")

    def differs_from(self, saved: dict[str, Any]) -> list[str]:
        mine = self.to_dict()
        return [k for k in mine if k not in self.RESUME_FREE and k in saved and saved[k] != mine[k]]

    def with_saved_folds(self, saved: dict[str, Any], add: bool = True) -> "TrainConfig":
        """The folds of a resumed run: the saved run's folds, plus this config's when ``add`` (folds
        named on the command line), so a resume never drops a finished fold nor adds one unasked."""
        mine = set(self.folds) if add else set()
        return replace(self, folds=tuple(sorted(mine | set(saved.get("folds", self.folds)))))
