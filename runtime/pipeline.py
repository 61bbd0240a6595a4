"""From input files to results, in input order: ``agegender-run``'s processing.

Images are read (``imageio.read_image``, the one guarded way an input is opened) by a small thread
pool while the main thread detects and classifies, and the faces of several images go to the model
in one onnxruntime call (fewer, larger calls cost less per face). Both are bounded: at most
``window`` inputs are read ahead and a batch holds at most ``batch_size`` faces, so memory does not
grow with the folder (a 512 MB Raspberry Pi). Videos are processed frame by frame, in order.
A detector that fails while the run goes on raises ``DetectorError``: a setup problem, not the
image's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .detect import DetectorError
from .imageio import ImageError, read_image
from .model import ModelError

if TYPE_CHECKING:
    import numpy as np

    from .detect import Detection
    from .predictor import Face, Predictor

log = logging.getLogger("agegender.runtime.cli")

BATCH_FACES = 16  # faces per onnxruntime call: 8-32 all pay about the same (benchmarks/README.md)
BATCH_WAIT_S = 0.1  # a slow detector (YuNet) flushes sooner, so the first results are not held back
KEEP_IMAGE_BATCH = 1  # images kept for --save-annotated are full size: never more than one in a batch


@dataclass
class Result:
    """What one image (or one video frame) gave: one ``--json`` line (README, "JSON output")."""

    path: str
    width: int | None = None
    height: int | None = None
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    frame: int | None = None
    image: Any = None  # the RGB image, kept only until it is annotated

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path}
        if self.frame is not None:
            d["frame"] = self.frame
        d.update(width=self.width, height=self.height, faces=[f.to_dict() for f in self.faces], error=self.error)
        return d

    def text_lines(self) -> list[str]:
        where = self.path if self.frame is None else f"{self.path} [frame {self.frame}]"
        if not self.faces:
            return [f"{where}: no face found"]
        lines = []
        for i, f in enumerate(self.faces, 1):
            parts = []
            if f.gender is not None:
                parts.append(f"{f.gender} ({f.gender_score:.2f})")
            if f.age is not None:
                parts.append(f"age {f.age} ({f.age_probs[f.age]:.2f})")
            lines.append(f"{where}: face {i}/{len(self.faces)} at {list(f.box)}: {', '.join(parts)}")
        return lines


def failed(path: str, exc: BaseException, frame: int | None = None) -> Result:
    """The result of an input that could not be processed: one line for the user."""
    if isinstance(exc, (ImageError, ModelError, OSError)):
        msg = str(exc)
    else:  # an unexpected library error on this input: one line for the user, details with -v
        log.debug("while processing %s", path, exc_info=exc)
        msg = f"{path}: cannot process ({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''})"
    return Result(path, error=" ".join(msg.split()), frame=frame)


def process(predictor: Predictor, path: str, every: int = 1, keep_image: bool = False) -> Iterator[Result]:
    """Results for one input, one at a time: one for an image, one per processed frame for a video."""
    from .video import is_video, iter_frames

    if is_video(path):
        frame = None
        try:
            for frame, image in iter_frames(path, every):
                faces = predictor.predict(image)
                yield Result(path, image.shape[1], image.shape[0], faces, frame=frame,
                             image=image if keep_image else None)
        except DetectorError:
            raise
        except Exception as e:  # noqa: BLE001 - reported for this input, the run goes on
            yield failed(path, e, frame)
        return
    try:
        image = read_image(path)
        faces = predictor.predict(image)
    except DetectorError:
        raise
    except Exception as e:  # noqa: BLE001 - reported for this input, the run goes on
        yield failed(path, e)
        return
    yield Result(path, image.shape[1], image.shape[0], faces, image=image if keep_image else None)


# --------------------------------------------------------------------------- the streamed, batched path
@dataclass
class _Item:
    """One image between reading and classification."""

    path: str
    image: np.ndarray | None = None  # dropped once cropped, unless kept for annotation
    shape: tuple[int, ...] | None = None
    dets: list[Detection] | None = None
    crops: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None


def _prepare(predictor: Predictor, item: _Item, keep_image: bool) -> _Item:
    """Detect and crop ``item`` (any thread for the stateless ``none`` detector, else the main one)."""
    try:
        if item.image is None:
            item.image = read_image(item.path)
            item.shape = item.image.shape
        item.dets = predictor.detect(item.image)
        item.crops = predictor.crops(item.image, item.dets)
    except DetectorError:
        raise
    except Exception as e:  # noqa: BLE001 - reported for this input, the run goes on
        item.error = e
    if not keep_image:
        item.image = None
    return item


def _read(predictor: Predictor, path: str, keep_image: bool) -> _Item:
    """The reader threads' work: the decoded image, cropped too when that needs no detector state."""
    item = _Item(path)
    if predictor.detector.name == "none":
        return _prepare(predictor, item, keep_image)
    try:
        item.image = read_image(path)
        item.shape = item.image.shape
    except Exception as e:  # noqa: BLE001 - reported for this input, the run goes on
        item.error = e
    return item


def read_ahead(predictor: Predictor, paths: Iterable[str], readers: int, window: int,
               keep_image: bool) -> Iterator[_Item | str]:
    """Items in input order, read by ``readers`` threads at most ``window`` inputs ahead (videos are
    yielded as their path, unread). ``readers`` 0 reads in the calling thread."""
    from .video import is_video

    if readers <= 0:
        yield from (p if is_video(p) else _read(predictor, p, keep_image) for p in paths)
        return
    pool = ThreadPoolExecutor(readers, thread_name_prefix="agegender-read")
    ahead: deque[str | Future[_Item]] = deque()
    try:
        for path in paths:
            ahead.append(path if is_video(path) else pool.submit(_read, predictor, path, keep_image))
            if len(ahead) >= window:
                head = ahead.popleft()
                yield head if isinstance(head, str) else head.result()
        while ahead:
            head = ahead.popleft()
            yield head if isinstance(head, str) else head.result()
    finally:  # interrupted or closed early: drop what was not started, wait for the few in flight
        pool.shutdown(wait=True, cancel_futures=True)


def _flush(predictor: Predictor, batch: list[_Item]) -> Iterator[Result]:
    """Classify the faces of ``batch`` in one call and yield each item's result, in order."""
    crops = [c for it in batch if it.error is None for c in it.crops]
    out: dict[str, np.ndarray] | None = None
    error: BaseException | None = None
    if crops:
        try:
            out = predictor.run_faces(crops)
        except Exception as e:  # noqa: BLE001 - e.g. non-finite outputs: an error for these inputs
            error = e
    start = 0
    for it in batch:
        if it.error is not None or (error is not None and it.crops):
            yield failed(it.path, it.error or error)  # type: ignore[arg-type]
            continue
        faces = predictor.faces(it.dets or [], out, start) if it.crops and out is not None else []
        start += len(it.crops)
        h, w = it.shape[:2]  # type: ignore[index]
        yield Result(it.path, w, h, faces, image=it.image)
    batch.clear()


def results(predictor: Predictor, paths: Iterable[str], every: int = 1, keep_image: bool = False,
            batch_size: int = BATCH_FACES, readers: int = 1) -> Iterator[tuple[Result, bool]]:
    """(result, last result of its input) for every input in order: images read ahead and classified
    in batches of up to ``batch_size`` faces; ``batch_size`` 1 and ``readers`` 0 give the one-at-a-time
    path. A batch is classified when it is full or has waited ``BATCH_WAIT_S`` (a slow detector)."""
    image_cap = KEEP_IMAGE_BATCH if keep_image else batch_size
    ahead = batch_size + readers if predictor.detector.name == "none" and not keep_image else readers + 1
    batch: list[_Item] = []
    n_faces, since = 0, 0.0
    for item in read_ahead(predictor, paths, readers, max(1, ahead), keep_image):
        if isinstance(item, str):  # a video: what is waiting goes first, then its frames one by one
            yield from ((r, True) for r in _flush(predictor, batch))
            yield from _video(predictor, item, every, keep_image)
            n_faces = 0
            continue
        if item.dets is None and item.error is None:
            _prepare(predictor, item, keep_image)
        if not batch:
            since = time.monotonic()
        batch.append(item)
        n_faces += len(item.crops)
        if n_faces >= batch_size or len(batch) >= image_cap or time.monotonic() - since >= BATCH_WAIT_S:
            yield from ((r, True) for r in _flush(predictor, batch))
            n_faces = 0
    yield from ((r, True) for r in _flush(predictor, batch))


def _video(predictor: Predictor, path: str, every: int, keep_image: bool) -> Iterator[tuple[Result, bool]]:
    """A video's results, the last one flagged (the progress bar counts inputs)."""
    prev = None
    for r in process(predictor, path, every, keep_image):
        if prev is not None:
            yield prev, False
        prev = r
    if prev is not None:
        yield prev, True
