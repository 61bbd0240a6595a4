"""`train-adience`: subject-exclusive k-fold training of an age/gender classifier."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import click

from ..runtime.datasets import DataFormatError, read_dataset
from ..runtime.fsutil import write_json

log = logging.getLogger("agegender.train")


def _parse_folds(value: str, nfolds: int) -> tuple[int, ...]:
    if value == "all":
        return tuple(range(nfolds))
    try:
        folds = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected 'all' or comma-separated fold numbers, got {value!r}") from None
    if not folds or any(f < 0 or f >= nfolds for f in folds):
        raise click.BadParameter(f"folds must be in 0..{nfolds - 1}, got {value!r}")
    return folds


def _check_pretrained(arch: str) -> None:
    import timm

    try:
        timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise click.ClickException(
            f"could not get ImageNet weights for {arch} from the hub ({first}); use --no-pretrained to train "
            f"from scratch or --init-weights PATH for a local ImageNet checkpoint") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--data", "data", required=True, type=click.Path(exists=True),
              help="Adience dir (fold_*_data.txt + aligned/ or faces/), UTKFace dir, or a CSV "
                   "(path,age,gender[,fold][,subject]).")
@click.option("--format", "fmt", type=click.Choice(["auto", "adience", "utkface", "csv"]), default="auto",
              show_default=True, help="Data format; auto detects it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (created).")
@click.option("--eda-only", is_flag=True, help="Only write OUT/eda (label counts, plots); needs no images.")
@click.option("--arch", default="mobilenetv3_large_100", show_default=True,
              help="Any timm model name (resnet50 is the baseline).")
@click.option("--task", type=click.Choice(["both", "age", "gender"]), default="both", show_default=True)
@click.option("--img-size", type=click.IntRange(16, 1024), default=224, show_default=True,
              help="Input side in pixels (112-128 trains much faster on a CPU).")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Start from timm's ImageNet weights (downloaded from the hub; needs internet).")
@click.option("--init-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local ImageNet checkpoint for the backbone (timm or torchvision layout); implies --no-pretrained.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the heads.")
@click.option("--folds", "folds_opt", default=None,
              help="'all' or e.g. 0,2  [default: all; with --resume: the saved run's folds].")
@click.option("--holdout", type=click.FloatRange(0, 0.5), default=0.0, show_default=True,
              help="Fraction of images (stable file-name hash) kept out of training and CV entirely.")
@click.option("--val-frac", type=click.FloatRange(0.01, 0.5), default=0.1, show_default=True,
              help="Validation share of the training folds, split by subject.")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5), default=0.1, show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default="onecycle", show_default=True)
@click.option("--drop-rate", type=click.FloatRange(0, 0.9), default=0.2, show_default=True)
@click.option("--augment", type=click.Choice(["default", "none"]), default="default", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--crop-margin", type=click.FloatRange(-0.3, 2), default=0.0, show_default=True,
              help="Stored in checkpoints: how far the runtime widens a detector box to frame faces like these.")
@click.option("--max-images", type=click.IntRange(1), default=None, help="Use a random subset (quick trials).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where decoded faces are cached (default OUT/cache).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A trained agegender checkpoint to distil from (any arch; same input size).")
@click.option("--distill-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Weight of the distillation loss against the label loss.")
@click.option("--distill-temp", type=click.FloatRange(0.1, 20), default=2.0, show_default=True,
              help="Softmax temperature of distillation.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in OUT (its saved folds); with --folds, also add folds to it "
                   "(finished folds are kept, the summary covers them all).")
@click.option("--force", is_flag=True, help="Start over in an existing OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def main(data, fmt, out, eda_only, arch, task, img_size, pretrained, init_weights, freeze_backbone, folds_opt,
         holdout, val_frac, epochs, batch_size, lr, weight_decay, label_smoothing, schedule, drop_rate, augment,
         workers, device, seed, crop_margin, max_images, cache_dir, teacher, distill_alpha, distill_temp, resume, force,
         quiet):
    """Train an age-group/gender classifier with subject-exclusive k-fold cross-validation.

    Each test fold gets a fresh model, optimizer, scheduler and seed; the validation split
    for choosing the best epoch is carved out of the training folds by subject. Writes
    OUT/config.json, OUT/foldK/{train_log.txt,metrics.csv,best.pt,last.pt}, OUT/summary.json,
    OUT/summary.csv and plots. Runs under `torchrun --nproc-per-node N` too.

    \b
    Example:
      train-adience --data adience/ --arch mobilenetv3_large_100 --img-size 224 --out runs/mnv3
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from .config import TrainConfig
    from .run import format_table, load_saved_config, run

    out_path = Path(out)
    try:
        if eda_only:
            from .eda import run_eda

            records, report = read_dataset(data, fmt, check_images=True)
            summary = run_eda(records, report, out_path)
            click.echo(f"EDA: {summary['rows']} rows, {summary['users']} subjects, "
                       f"{summary['missing_images']} images missing -> {out_path / 'eda'}")
            return
        cfg = TrainConfig(data=str(data), out=str(out), format=fmt, arch=arch, task=task, img_size=img_size,
                          pretrained=pretrained and not init_weights,
                          init_weights=str(Path(init_weights).resolve()) if init_weights else None,
                          freeze_backbone=freeze_backbone, folds=_parse_folds(folds_opt or "all", 5), holdout=holdout,
                          val_frac=val_frac, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                          label_smoothing=label_smoothing, schedule=schedule, drop_rate=drop_rate, augment=augment,
                          workers=workers, device=device, seed=seed, crop_margin=crop_margin, max_images=max_images,
                          cache_dir=cache_dir, teacher=str(Path(teacher).resolve()) if teacher else None,
                          distill_alpha=distill_alpha, distill_temp=distill_temp)
        rank = int(os.environ.get("RANK", "0"))
        saved = load_saved_config(out_path)
        # under torchrun only rank 0 judges OUT: the others would see the config.json it just wrote
        if rank == 0 and saved is not None and not (resume or force):
            raise click.ClickException(f"{out_path} already holds a run; use --resume to continue it or --force "
                                       f"to start over")
        if resume and saved is None:
            raise click.ClickException(f"--resume: {out_path} holds no run (no config.json)")
        if resume:
            diff = cfg.differs_from(saved)
            if diff:
                raise click.ClickException(f"--resume: options differ from the saved run: {', '.join(diff)}")
            cfg = cfg.with_saved_folds(saved, add=folds_opt is not None)
        if rank == 0 and force and saved is not None:
            for d in out_path.glob("fold*"):
                shutil.rmtree(d, ignore_errors=True)
        if cfg.pretrained:
            _check_pretrained(cfg.arch)
        if rank == 0:
            write_json(out_path / "config.json", cfg.to_dict())
        summary = run(cfg, resume=resume, progress=not quiet)
    except DataFormatError as e:
        raise click.ClickException(str(e)) from None
    except (ValueError, RuntimeError, OSError) as e:
        if isinstance(e, click.ClickException):
            raise
        raise click.ClickException(str(e).splitlines()[0]) from None
    if rank == 0:
        click.echo(format_table(summary))
