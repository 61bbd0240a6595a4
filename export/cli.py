"""``export-onnx CKPT --out DIR``: fp32 (and with --quantize int8) ONNX behind parity gates.

Exit 0 when every requested model passed its gate and was written, 1 on any error or failed
gate (one line on stderr, no traceback), 2 for usage errors.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

from ..runtime.cliutil import FiniteFloat
from .onnx_export import ExportConfig
from .quantize import CALIB_METHODS

log = logging.getLogger("agegender.export")
HEADS = ("age", "gender")
# click parameters that steer the command rather than describe the export
NOT_CONFIG = ("quiet", "verbose")


def D(name: str) -> Any:  # noqa: N802 - reads like a constant at each option
    """ExportConfig's default of one field: the single source of each option's default."""
    return ExportConfig.__dataclass_fields__[name].default


def _agreement_text(pairs: tuple[tuple[str, float], ...]) -> str:
    return ",".join(f"{head}={need:g}" for head, need in pairs)


def _parse_agreement(ctx, param, value: str) -> tuple[tuple[str, float], ...]:
    """``0.98`` (both heads) or ``age=0.97,gender=0.99`` (fractions of images)."""
    out = dict(D("min_agreement"))
    text = value.strip()
    try:
        if re.fullmatch(r"[0-9.]+", text):
            out = {h: float(text) for h in HEADS}
        else:
            for part in text.split(","):
                head, _, num = part.partition("=")
                head = head.strip()
                if head not in HEADS:
                    raise ValueError(f"unknown head {head!r}")
                out[head] = float(num)
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: expected e.g. 0.98 or age=0.97,gender=0.99 ({e})") from None
    if any(not 0.0 <= v <= 1.0 for v in out.values()):  # nan fails this too
        raise click.BadParameter(f"{value!r}: agreements are fractions between 0 and 1")
    return tuple(out.items())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: NAME_fp32.onnx, NAME_int8.onnx, parity.json.")
@click.option("--name", default=D("name"), show_default=True, help="File stem of the models.")
@click.option("--quantize", is_flag=True, help="Also write an int8 model (static QDQ PTQ) behind the int8 gate.")
@click.option("--calib-data", type=click.Path(exists=True),
              help="Calibration images: Adience/UTKFace dir, CSV, or a folder of face images "
                   "[default: the checkpoint's training folds].")
@click.option("--data", "data_root", type=click.Path(exists=True),
              help="Where the checkpoint's own dataset is now, if it moved (its format, folds and holdout "
                   "still come from the checkpoint).")
@click.option("--calib-size", type=click.IntRange(8), default=D("calib_size"), show_default=True,
              help="Calibration images for int8.")
@click.option("--eval-size", type=click.IntRange(1), default=D("eval_size"), show_default=True,
              help="Held-out test-fold images the int8 gate is evaluated on (at most).")
@click.option("--parity-size", type=click.IntRange(64), default=D("parity_size"), show_default=True,
              help="Images for the fp32 parity gate.")
@click.option("--opset", type=click.IntRange(13, 21), default=D("opset"), show_default=True, help="ONNX opset.")
@click.option("--max-drop", type=FiniteFloat(0), default=D("max_drop"), show_default=True,
              help="int8 gate: largest accuracy drop, in percentage points, on every metric.")
@click.option("--min-agreement", default=_agreement_text(D("min_agreement")), show_default=True,
              callback=_parse_agreement, help="int8 gate: top-1 agreement with fp32, per head (or one number for both).")
@click.option("--agreement-margin", type=FiniteFloat(0, 1), default=D("agreement_margin"), show_default=True,
              help="int8 gate: count agreement only on faces whose fp32 top-1 probability leads the second "
                   "by at least this much (0 = every face). Near-ties flip under any quantization noise "
                   "without changing accuracy.")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default=D("calib_method"), show_default=True,
              help="Calibration; auto tries minmax, then percentile, and keeps the better.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights (x86 CPUs without VNNI).")
@click.option("--islands/--no-islands", default=D("islands"), show_default=True,
              help="When plain int8 fails the gate, retry with growing float islands.")
@click.option("--emulated-size", type=click.IntRange(1), default=D("emulated_size"), show_default=True,
              help="int8 gate: faces judged on the emulated AVX2-only CPU (emulation is ~60x slower).")
@click.option("--latency-runs", type=click.IntRange(1), default=D("latency_runs"), show_default=True,
              help="Runs for the 1-thread latency median.")
@click.option("--crop-margin", type=FiniteFloat(-0.3, 2.0), default=D("crop_margin"),
              help="Override the checkpoint's crop margin (the runtime's box expansion), e.g. one measured "
                   "with benchmarks/measure_crop_margin.py after training.")
@click.option("--force", is_flag=True,
              help="Overwrite existing models; write the int8 model even when its gate fails (recorded).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (and the traceback of unexpected errors).")
def main(**opts: Any) -> None:
    """Export an agegender CHECKPOINT to ONNX, checked against torch (and int8 against fp32)."""
    _setup_logging(opts["verbose"], opts["quiet"])
    if not re.fullmatch(r"[A-Za-z0-9._-]+", opts["name"]):
        raise click.BadParameter(f"{opts['name']!r}: use letters, digits, '.', '_' and '-'", param_hint="--name")
    cfg = ExportConfig(**{k: v for k, v in opts.items() if k not in NOT_CONFIG}, progress=not opts["quiet"])
    sys.exit(run(cfg))


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """Our diagnostics on stderr; other libraries' chatter (onnxruntime's root-logger warnings) only with -v."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(lambda r: r.name.startswith("agegender") or r.levelno >= logging.ERROR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def run(cfg: ExportConfig) -> int:
    """Run the export, print the results on stdout; errors are one line on stderr. Returns the exit code."""
    from ..runtime.datasets import DataFormatError
    from .net import CheckpointError
    from .onnx_export import ExportError, run_export
    from .quantize import QuantizeError

    try:
        rep = run_export(cfg)
    except (CheckpointError, ExportError, QuantizeError, DataFormatError, OSError) as e:
        log.debug("export failed", exc_info=True)
        click.echo(f"error: {_one_line(e)}", err=True)
        return 1
    except Exception as e:  # noqa: BLE001 - never a traceback for the user; -v shows it
        log.debug("unexpected error", exc_info=True)
        click.echo(f"error: unexpected {type(e).__name__}: {_one_line(e)} (run with -v for details)", err=True)
        return 1
    fp = rep["fp32"]
    click.echo(f"{cfg.fp32_path}  fp32  {fp['bytes'] / 1e6:.2f} MB  parity max|dp| {fp['parity']['max_abs_diff']:.1e} "
               f"on {fp['parity']['images']} images  {fp['latency_ms_1thread']:.2f} ms/face (1 thread)")
    if "int8" in rep:
        q = rep["int8"]
        agree = ", ".join(f"{k} {v:.3f}" for k, v in q["gate"]["agreement"].items())
        drops = ", ".join(f"{k} {v:+.2f}" for k, v in (q["gate"].get("drop_pt") or {}).items())
        click.echo(f"{cfg.int8_path}  int8  {q['bytes'] / 1e6:.2f} MB  strategy {q['strategy']}  agreement {agree}"
                   f"{'  drop pt ' + drops if drops else ''}  {q['latency_ms_1thread']:.2f} ms/face "
                   f"({rep['speedup_1thread']:.2f}x)")
    click.echo(f"{cfg.report_path}")
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
