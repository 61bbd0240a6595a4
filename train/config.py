"""The training configuration: one frozen dataclass, the single source of the CLI's defaults.

The model's own defaults (arch, input size, dropout) come from ``ModelArgs``, which every
checkpoint stores; ``train-adience``'s options read their defaults from here.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..export.net import ModelArgs
from ..runtime.datasets import ADIENCE_FOLDS

_MODEL = ModelArgs()
# Every format has Adience's five folds: the export gate re-derives the test fold from the data
# with the readers' fold count, so a run may not choose another one.
NFOLDS = ADIENCE_FOLDS


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    format: str = "auto"
    arch: str = _MODEL.arch
    task: str = _MODEL.task
    img_size: int = _MODEL.img_size
    pretrained: bool = True
    init_weights: str | None = None
    freeze_backbone: bool = False
    folds: tuple[int, ...] = tuple(range(NFOLDS))
    final: bool = False  # one model on every fold (no test fold): the model to ship once CV chose the recipe
    holdout: float = 0.0
    val_frac: float = 0.1
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    drop_rate: float = _MODEL.drop_rate
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

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of one field (what the CLI option shows and uses)."""
        f = cls.__dataclass_fields__[name]
        if f.default is MISSING:
            raise KeyError(f"TrainConfig.{name} has no plain default")
        return f.default

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def cache_path(self) -> Path:
        """Where decoded faces are cached: --cache-dir, else OUT/cache."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folds"] = list(self.folds)
        return d

    # options that may differ between the original run and a --resume without changing results;
    # `folds` may differ too: a resume adds the requested folds to the saved ones (see with_saved_folds)
    RESUME_FREE = ("out", "workers", "device", "cache_dir", "folds")

    def differs_from(self, saved: dict[str, Any]) -> list[str]:
        mine = self.to_dict()
        saved = {"final": False, **saved}  # runs saved before --final existed were cross-validations
        return [k for k in mine if k not in self.RESUME_FREE and k in saved and saved[k] != mine[k]]

    def with_saved_folds(self, saved: dict[str, Any], add: bool = True) -> "TrainConfig":
        """The folds of a resumed run: the saved run's folds, plus this config's when ``add`` (folds
        named on the command line), so a resume never drops a finished fold nor adds one unasked."""
        mine = set(self.folds) if add else set()
        return replace(self, folds=tuple(sorted(mine | set(saved.get("folds", self.folds)))))
