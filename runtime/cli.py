"""``agegender-run``: faces, age group and gender for images, directories and videos.

Results go to stdout (a readable line per face, or JSON Lines with ``--json``); diagnostics go
to stderr through logging. A bad input gives one line for that input and the run goes on.
Exit status: 0 every input read, 1 any input failed, 2 usage or setup error (also an output that
would overwrite an input), 130 interrupted (SIGINT); SIGTERM/SIGHUP while a CSV is written remove
its temporary file (exit 143/129).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from .. import __version__
from .detect import DEFAULT_DET_THRESHOLD, DEFAULT_MIN_FACE_SIZE, DETECTORS
from .fetch import DetectorError, fetch_yunet
from .fsutil import atomic_open, write_error_line
from .imageio import IMAGE_EXTS
from .model import ModelError
from .outputs import CSV_COLUMNS, Annotator, OutputRefused, check_outputs, csv_rows, json_line
from .pipeline import BATCH_FACES, Result, results

if TYPE_CHECKING:
    from .predictor import Predictor

log = logging.getLogger("agegender.runtime.cli")

PROGRESS_MIN_INPUTS = 5
EXIT_INTERRUPTED = 130
__all__ = ["CSV_COLUMNS", "Result", "RunConfig", "cli", "main", "run"]


class SetupError(click.ClickException):
    """The run cannot start (model, detector): exit status 2 like a usage error."""

    exit_code = 2


@dataclass(frozen=True)
class RunConfig:
    """The resolved options of one ``agegender-run`` call."""

    inputs: tuple[str, ...]
    model: str | None = None
    detector: str = "auto"
    detector_model: str | None = None
    det_threshold: float = DEFAULT_DET_THRESHOLD
    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    threads: int | None = None
    json: bool = False
    csv: str | None = None
    save_annotated: str | None = None
    recursive: bool = False
    every: int = 1
    flip: bool = False
    max_faces: int | None = None
    batch_size: int = BATCH_FACES  # faces per onnxruntime call; 1 = one image at a time
    readers: int | None = None  # image-reading threads; None: 1, or 0 (read inline) at --threads 1


def reader_threads(cfg: RunConfig) -> int:
    """Threads that read images ahead of the model: none when the user asked for one thread."""
    if cfg.readers is not None:
        return cfg.readers
    return 0 if cfg.threads == 1 else 1


# --------------------------------------------------------------------------- inputs
def _media_files(folder: str, recursive: bool) -> list[str]:
    """Image and video files of a folder, sorted; other files are skipped with a note."""
    from .video import VIDEO_EXTS

    found, skipped, subdirs = [], 0, 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if not recursive:
            subdirs += len(dirs)
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(files):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTS | VIDEO_EXTS:
                found.append(os.path.join(root, name))
            else:
                skipped += 1
    if skipped:
        log.info("%s: skipped %d file(s) that are not images or videos", folder, skipped)
    if subdirs:
        log.info("%s: %d sub-folder(s) not searched (use --recursive)", folder, subdirs)
    return found


def expand_inputs(inputs: Sequence[str], recursive: bool, stdin: TextIO | None = None) -> list[str]:
    """Files in input order: directories expanded (sorted), ``-`` replaced by the paths on stdin."""
    out: list[str] = []
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            names = [line.rstrip("\r\n") for line in stream]
            out.extend(expand_inputs([n for n in names if n.strip() and n != "-"], recursive))
        elif os.path.isdir(item):
            out.extend(_media_files(item, recursive))
        else:
            out.append(item)  # a missing file becomes an error for that input, not a usage error
    return out


def run(cfg: RunConfig, predictor: Predictor, files: list[str], out: TextIO) -> int:
    """Process ``files`` in order, writing every output; returns the exit status (0 or 1)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    status = 0
    annotator = Annotator(cfg.save_annotated, files) if cfg.save_annotated else None
    with contextlib.ExitStack() as stack:
        writer = None
        if cfg.csv:  # a temporary file renamed onto cfg.csv when the run completes (see fsutil)
            fh = stack.enter_context(atomic_open(cfg.csv, "w", suffix=".csv", newline="", encoding="utf-8",
                                                 errors="backslashreplace"))  # undecodable names: \xNN
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
        stack.enter_context(logging_redirect_tqdm([logging.getLogger("agegender")]))
        bar = stack.enter_context(tqdm(total=len(files), unit="file", file=sys.stderr,
                                       disable=True if len(files) < PROGRESS_MIN_INPUTS else None))
        for r, last in results(predictor, files, cfg.every, annotator is not None, cfg.batch_size,
                               reader_threads(cfg)):
            if not _emit(r, cfg, out, bar, writer, annotator):
                status = 1
            if last:
                out.flush()
                bar.update(1)
    if cfg.csv:
        log.info("wrote %s", cfg.csv)
    return status


def _emit(r: Result, cfg: RunConfig, out: TextIO, bar: Any, writer: Any, annotator: Annotator | None) -> bool:
    """Write one result to every output; False when it is an error (or its annotated copy failed)."""
    from tqdm import tqdm

    ok = True
    lines = _output_lines(r, cfg.json)
    if r.error:
        ok = False
        log.error("%s", r.error)
    for line in lines:
        if bar.disable:
            out.write(line + "\n")
        else:
            tqdm.write(line, file=out)
    if writer:
        writer.writerows(csv_rows(r))
    if annotator and r.image is not None:
        try:
            annotator.save(r)
        except OSError as e:
            ok = False
            log.error("%s", e)
    r.image = None
    return ok


def _output_lines(r: Result, as_json: bool) -> list[str]:
    """stdout lines of one result; a result JSON cannot hold (NaN) becomes an error for its input."""
    if not as_json:
        return [] if r.error else r.text_lines()
    try:
        return [json_line(r.to_dict())]
    except ValueError:
        r.faces, r.error = [], f"{r.path}: non-finite values in the results"
        return [json_line(r.to_dict())]


# --------------------------------------------------------------------------- command
class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"agegender-run: {record.levelname.lower()}: {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(verbose: int, quiet: bool) -> None:
    """One stderr handler on the ``agegender`` logger (replaced on each call)."""
    logger = logging.getLogger("agegender")
    for h in [h for h in logger.handlers if getattr(h, "_agegender_cli", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._agegender_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)


class FiniteFloatRange(click.FloatRange):
    """A float option in a range; NaN passes every comparison, so it is refused explicitly."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


def usable_threads(threads: int | None) -> int | None:
    """``threads`` capped at the cores this process may use (more only slows onnxruntime down)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads is not None and threads > cores:
        log.warning("--threads %d is more than the %d core(s) available: using %d", threads, cores, cores)
        return cores
    return threads


def make_predictor(cfg: RunConfig) -> Predictor:
    """The Predictor of ``cfg`` (its fields that Predictor takes), checked once on a blank image so an
    unusable model or detector (e.g. a classifier given as --detector-model) is one setup error."""
    import numpy as np

    from .predictor import Predictor

    wanted = inspect.signature(Predictor).parameters
    try:
        predictor = Predictor(**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name in wanted})
    except (ModelError, DetectorError) as e:
        raise SetupError(str(e)) from None
    try:
        predictor.detect(np.zeros((64, 64, 3), np.uint8))
    except Exception as e:  # noqa: BLE001 - e.g. cv2.error from a detector file that is not YuNet
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SetupError(f"the {predictor.detector.name} detector cannot run ({last[:200]})") from None
    return predictor


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("--model", type=click.Path(dir_okay=False), help="agegender ONNX model: a path, or default / fast "
              "for a shipped one [default: AGEGENDER_MODEL, else the shipped int8 model]")
@click.option("--detector", type=click.Choice(DETECTORS), default="auto", show_default=True,
              help="face detector; none = every image is one pre-cropped face")
@click.option("--detector-model", type=click.Path(dir_okay=False),
              help="local YuNet ONNX file [default: AGEGENDER_DETECTOR_MODEL, else the fetched copy]")
@click.option("--det-threshold", type=FiniteFloatRange(0, 1), default=DEFAULT_DET_THRESHOLD, show_default=True,
              help="minimum YuNet face score")
@click.option("--min-face-size", type=click.IntRange(min=0), default=DEFAULT_MIN_FACE_SIZE, show_default=True,
              help="ignore detected faces smaller than this (pixels)")
@click.option("--max-faces", type=click.IntRange(min=1), help="keep only the N largest faces of each image "
              "[default: all]")
@click.option("--flip", is_flag=True, help="average each face with its mirror image: a little more accurate, "
              "about 1.8x the classification time (see the model card)")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all cores; more are capped]")
@click.option("--json", "json", is_flag=True, help="JSON Lines on stdout, one object per image or frame")
@click.option("--csv", "csv", type=click.Path(dir_okay=False), help="also write one CSV row per face (replaces "
              "only an empty file or an earlier agegender-run CSV)")
@click.option("--save-annotated", type=click.Path(file_okay=False), help="write images with boxes drawn here "
              "(not a folder that holds an input)")
@click.option("-r", "--recursive", is_flag=True, help="search directories recursively")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="for videos: process every N-th frame")
@click.option("--fetch-detector", is_flag=True, help="download and verify the YuNet detector into the cache "
              "(for offline use later), then process INPUTs if any")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_FACES, hidden=True,
              help="faces per onnxruntime call (1: one image at a time)")
@click.option("--readers", type=click.IntRange(min=0, max=8), hidden=True,
              help="image-reading threads [default: 1; 0 at --threads 1]")
@click.option("-v", "--verbose", count=True, help="more diagnostics on stderr (-vv: debug)")
@click.option("-q", "--quiet", is_flag=True, help="only errors on stderr")
@click.version_option(__version__, prog_name="agegender-run")
def cli(inputs: tuple[str, ...], fetch_detector: bool, verbose: int, quiet: bool, **options: Any) -> None:
    """Find faces in images, directories (sorted), videos or `-` (paths on stdin) and print each
    face's age group and gender. Exit status: 0 every input read, 1 any input failed, 2 usage error,
    130 interrupted."""
    setup_logging(verbose, quiet)
    try:
        _main(inputs, fetch_detector, options)
    except KeyboardInterrupt:  # click would say "Aborted!" and exit 1, the status of a bad input
        log.error("interrupted")
        sys.exit(EXIT_INTERRUPTED)


def _main(inputs: tuple[str, ...], fetch_detector: bool, options: dict[str, Any]) -> None:
    """The command once its options are parsed: setup (exit 2 on failure), then the run."""
    if fetch_detector:
        try:
            path = fetch_yunet(upgrade=True)
        except DetectorError as e:
            raise SetupError(str(e)) from None
        click.echo(f"YuNet face detector ready (sha256 verified): {path}")
        if not inputs:
            return
    if not inputs:
        raise click.UsageError("no INPUT given (image files, directories, videos, or - for paths on stdin)")
    options["threads"] = usable_threads(options["threads"])
    cfg = RunConfig(inputs=tuple(inputs), **options)
    if cfg.threads:
        import cv2

        cv2.setNumThreads(cfg.threads)
    predictor = make_predictor(cfg)
    log.info("model %s (%s, %s px); detector %s", predictor.model_path, predictor.meta.arch, predictor.meta.input_size,
             predictor.detector.name)
    if cfg.detector_model and predictor.detector.name != "yunet":
        log.warning("--detector-model is used only by the yunet detector, not %s", predictor.detector.name)
    files = expand_inputs(cfg.inputs, cfg.recursive, sys.stdin)
    if not files:
        log.warning("no image or video files found in %s", ", ".join(cfg.inputs))
    try:
        check_outputs(cfg.csv, cfg.save_annotated, files)
        status = run(cfg, predictor, files, sys.stdout)
    except BrokenPipeError:
        raise
    except (OutputRefused, DetectorError) as e:  # a detector failing mid-run is broken for every input
        raise SetupError(str(e)) from None
    except OSError as e:  # input errors are handled per input: this is an output (--csv, --save-annotated)
        raise SetupError(f"cannot write output: {write_error_line(e)}") from None
    sys.exit(status)


def main() -> None:
    """Console entry point."""
    try:
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        pass
    try:
        cli(prog_name="agegender-run")
    except BrokenPipeError:  # e.g. `agegender-run ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
