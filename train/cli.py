"""`train-adience`: subject-exclusive k-fold training of an age/gender classifier."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from ..runtime.cliutil import FiniteFloat
from ..runtime.datasets import read_dataset
from ..runtime.fsutil import write_error_line, write_json
from .config import NFOLDS, TrainConfig

log = logging.getLogger("agegender.train")
D = TrainConfig.default
# click parameters that steer the command rather than describe the run (not in config.json)
NOT_CONFIG = ("eda_only", "resume", "force", "quiet", "qat_from")
# what --qat-from may be given with (the checkpoint fixes the model, its data and folds), and its own defaults
QAT_OPTIONS = ("qat_from", "data", "out", "epochs", "batch_size", "lr", "seed", "cache_dir", "quiet", "force")
QAT_DEFAULTS = {"epochs": 1, "lr": 1e-4}


def _parse_folds(value: str, nfolds: int = NFOLDS) -> tuple[int, ...]:
    if value == "all":
        return tuple(range(nfolds))
    try:
        folds = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected 'all' or comma-separated fold numbers, got {value!r}",
                                 param_hint="--folds") from None
    if not folds or any(f < 0 or f >= nfolds for f in folds):
        raise click.BadParameter(f"folds must be in 0..{nfolds - 1}, got {value!r}", param_hint="--folds")
    return folds


def config_from_options(opts: dict[str, Any]) -> TrainConfig:
    """The run's config from click's parameters: the few that need converting, the rest by name."""
    opts = {k: v for k, v in opts.items() if k not in NOT_CONFIG}
    opts["folds"] = () if opts["final"] else _parse_folds(opts["folds"] or "all")
    opts["pretrained"] = opts["pretrained"] and not opts["init_weights"]
    for k in ("init_weights", "teacher"):
        opts[k] = str(Path(opts[k]).resolve()) if opts[k] else None
    return TrainConfig(**opts)


def _check_pretrained(arch: str) -> None:
    import timm

    try:
        timm.create_model(arch, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise click.ClickException(
            f"could not get ImageNet weights for {arch} from the hub ({first}); use --no-pretrained to train "
            f"from scratch or --init-weights PATH for a local ImageNet checkpoint") from None


def load_saved_config(out: Path) -> dict[str, Any] | None:
    """OUT/config.json of an earlier run, or None; a file that is not one names itself."""
    p = out / "config.json"
    if not p.is_file():
        return None
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.ClickException(f"{p}: unreadable run config ({e}); use --force to start over") from None
    folds = saved.get("folds") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not (isinstance(folds, list) and all(
            isinstance(f, int) and 0 <= f < NFOLDS for f in folds)):
        raise click.ClickException(f"{p}: not a train-adience run config (a JSON object with the run's folds); "
                                   f"use --force to start over")
    return saved


def clean_for_force(cfg: TrainConfig) -> None:
    """--force: remove what an earlier run left in OUT (folds, summary, curves, and the face cache
    when it lies inside OUT; a --cache-dir elsewhere may serve other runs and is keyed by content)."""
    out = Path(cfg.out)
    doomed = [*out.glob("fold*"), out / "summary.json", out / "summary.csv", out / "curves.png"]
    if cfg.cache_path.resolve().is_relative_to(out.resolve()):
        doomed.append(cfg.cache_path)
    for p in doomed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


def prepare_out(cfg: TrainConfig, resume: bool, force: bool, add_folds: bool, rank: int) -> TrainConfig:
    """Judge OUT (a run there needs --resume or --force), clean it for --force, write config.json.

    Under torchrun only rank 0 judges and writes: the others would see the config.json it just wrote.
    """
    out = Path(cfg.out)
    saved = None if force else load_saved_config(out)
    if rank == 0 and saved is not None and not resume:
        raise click.ClickException(f"{out} already holds a run; use --resume to continue it or --force "
                                   f"to start over")
    if resume:
        if saved is None:
            raise click.ClickException(f"--resume: {out} holds no run (no config.json)")
        diff = cfg.differs_from(saved)
        if diff:
            raise click.ClickException(f"--resume: options differ from the saved run: {', '.join(diff)}")
        cfg = cfg.with_saved_folds(saved, add=add_folds)
    if rank == 0:
        if force:
            clean_for_force(cfg)
        write_json(out / "config.json", cfg.to_dict())
    return cfg


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--data", type=click.Path(exists=True),
              help="Adience dir (fold_*_data.txt + aligned/ or faces/), UTKFace dir, or a CSV "
                   "(path,age,gender[,fold][,subject]).")
@click.option("--format", type=click.Choice(["auto", "adience", "utkface", "csv"]), default=D("format"),
              show_default=True, help="Data format; auto detects it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (created).")
@click.option("--eda-only", is_flag=True, help="Only write OUT/eda (label counts, plots); needs no images.")
@click.option("--arch", default=D("arch"), show_default=True, help="Any timm model name (resnet50 is the baseline).")
@click.option("--task", type=click.Choice(["both", "age", "gender"]), default=D("task"), show_default=True)
@click.option("--img-size", type=click.IntRange(16, 1024), default=D("img_size"), show_default=True,
              help="Input side in pixels (112-128 trains much faster on a CPU).")
@click.option("--pretrained/--no-pretrained", default=D("pretrained"), show_default=True,
              help="Start from timm's ImageNet weights (downloaded from the hub; needs internet).")
@click.option("--init-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local ImageNet checkpoint for the backbone (timm or torchvision layout); implies --no-pretrained.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the heads.")
@click.option("--folds", default=None,
              help=f"'all' or e.g. 0,2 (of 0..{NFOLDS - 1})  [default: all; with --resume: the saved run's folds].")
@click.option("--final", is_flag=True,
              help="Train one model on all the folds, to ship once cross-validation has chosen the recipe: the "
                   "validation split (carved by subject) picks the epoch, there is no test fold; writes OUT/final/. "
                   "Score it on the --holdout images.")
@click.option("--holdout", type=FiniteFloat(0, 0.5), default=D("holdout"), show_default=True,
              help="Fraction of images (stable file-name hash) kept out of training and CV entirely.")
@click.option("--val-frac", type=FiniteFloat(0.01, 0.5), default=D("val_frac"), show_default=True,
              help="Validation share of the training folds, split by subject.")
@click.option("--epochs", type=click.IntRange(1), default=D("epochs"), show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=D("batch_size"), show_default=True)
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=D("lr"), show_default=True)
@click.option("--weight-decay", type=FiniteFloat(0), default=D("weight_decay"), show_default=True)
@click.option("--label-smoothing", type=FiniteFloat(0, 0.5), default=D("label_smoothing"), show_default=True)
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default=D("schedule"), show_default=True)
@click.option("--drop-rate", type=FiniteFloat(0, 0.9), default=D("drop_rate"), show_default=True)
@click.option("--augment", type=click.Choice(["default", "none"]), default=D("augment"), show_default=True)
@click.option("--workers", type=click.IntRange(0), default=D("workers"), show_default=True,
              help="DataLoader worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=D("device"), show_default=True)
@click.option("--seed", type=int, default=D("seed"), show_default=True)
@click.option("--crop-margin", type=FiniteFloat(-0.3, 2), default=D("crop_margin"), show_default=True,
              help="Stored in checkpoints: how far the runtime widens a detector box to frame faces like these.")
@click.option("--max-images", type=click.IntRange(1), default=D("max_images"), help="Use a random subset (quick trials).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=D("cache_dir"),
              help="Where decoded faces are cached (default OUT/cache; keyed by each image's size and mtime).")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=D("teacher"),
              help="A trained agegender checkpoint to distil from (any arch; same input size).")
@click.option("--distill-alpha", type=FiniteFloat(0, 1), default=D("distill_alpha"), show_default=True,
              help="Weight of the distillation loss against the label loss.")
@click.option("--distill-temp", type=FiniteFloat(0.1, 20), default=D("distill_temp"), show_default=True,
              help="Softmax temperature of distillation.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in OUT (its saved folds); with --folds, also add folds to it "
                   "(finished folds are kept, the summary covers them all).")
@click.option("--force", is_flag=True,
              help="Start over in an existing OUT (its folds, summary and face cache are deleted first).")
@click.option("--qat-from", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Quantization-aware fine-tuning of this checkpoint instead of training: --epochs (default 1) "
                   "with the int8 scheme simulated, on the checkpoint's own training folds (--data if they moved), "
                   "--lr default 1e-4; writes OUT/qat.pt for export-onnx --quantize. Other model and data "
                   "options come from the checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx: click.Context, **opts: Any) -> None:
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
    if opts["qat_from"]:
        _qat(ctx, opts)
        return
    if not opts["data"]:
        raise click.UsageError("Missing option '--data' (the training data).")
    if opts["resume"] and opts["force"]:
        raise click.UsageError("--resume continues the run in OUT, --force deletes it: give one of them")
    if opts["final"] and opts["folds"] is not None:
        raise click.UsageError("--final trains on every fold (no test fold): give --folds or --final, not both")
    rank = int(os.environ.get("RANK", "0"))
    try:
        if opts["eda_only"]:
            _eda(opts["data"], opts["format"], Path(opts["out"]))
            return
        from .run import format_table, run

        cfg = prepare_out(config_from_options(opts), opts["resume"], opts["force"], opts["folds"] is not None, rank)
        if cfg.pretrained:
            _check_pretrained(cfg.arch)
        summary = run(cfg, resume=opts["resume"], progress=not opts["quiet"])
    except click.ClickException:
        raise
    except (ValueError, RuntimeError, OSError) as e:  # DataFormatError and CheckpointError are ValueErrors
        raise click.ClickException(_one_line(e)) from None
    if rank == 0:
        click.echo(format_table(summary))


def _qat(ctx: click.Context, opts: dict[str, Any]) -> None:
    """--qat-from: fine-tune a checkpoint with the int8 scheme; OUT/qat.pt and OUT/qat.json."""
    given = [k for k in opts if k not in QAT_OPTIONS
             and ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT]
    if given:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"{names}: not used by --qat-from (the checkpoint fixes its model, data and folds)")
    for k, v in QAT_DEFAULTS.items():
        if ctx.get_parameter_source(k) is click.core.ParameterSource.DEFAULT:
            opts[k] = v
    out = Path(opts["out"])
    if (out / "qat.pt").exists() and not opts["force"]:
        raise click.ClickException(f"{out / 'qat.pt'} already exists; use --force to overwrite it")
    from .qat import QatConfig, run_qat

    cfg = QatConfig(checkpoint=opts["qat_from"], out=str(out / "qat.pt"), epochs=opts["epochs"], lr=opts["lr"],
                    batch_size=opts["batch_size"], seed=opts["seed"], data=opts["data"],
                    cache_dir=opts["cache_dir"] or str(out / "cache"), progress=not opts["quiet"])
    try:
        summary = run_qat(cfg)
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(_one_line(e)) from None
    write_json(out / "qat.json", {"config": {k: v for k, v in cfg.__dict__.items()}, **summary})
    click.echo(f"{out / 'qat.pt'}: export it with export-onnx {out / 'qat.pt'} --out DIR --quantize")


def _one_line(e: Exception) -> str:
    """An error as one line; an OS error with its file (a full disk said as such)."""
    if isinstance(e, OSError) and e.errno is not None:
        return write_error_line(e)
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _eda(data: str, fmt: str, out: Path) -> None:
    from .eda import run_eda

    records, report = read_dataset(data, fmt, check_images=True)
    summary = run_eda(records, report, out)
    click.echo(f"EDA: {summary['rows']} rows, {summary['users']} subjects, "
               f"{summary['missing_images']} images missing -> {out / 'eda'}")
