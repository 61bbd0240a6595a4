"""``agegender-run``'s outputs: the JSON line, the CSV rows, annotated images, and the checks
that refuse, before anything is written, an output that would destroy an input."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .labels import AGE_GROUPS

if TYPE_CHECKING:
    from .cli import Result

WRITABLE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CSV_COLUMNS = ["path", "frame", "width", "height", "face", "x1", "y1", "x2", "y2", "det_score", "age", "gender",
               "gender_score", "error"] + [f"age_prob_{g}" for g in AGE_GROUPS]
CSV_HEAD = ",".join(CSV_COLUMNS[:5])  # how a CSV of ours starts: the only non-empty file --csv replaces
_SURROGATE = re.compile("[\ud800-\udfff]")


class OutputRefused(ValueError):
    """An output that would overwrite an input or a file that is not ours; one line."""


def json_line(obj: dict[str, Any]) -> str:
    """One JSON Lines record: never NaN/Infinity (ValueError), and the undecodable bytes of a file
    name (surrogate escapes) written as ``\\udcXX`` escapes, so the line is valid UTF-8 JSON."""
    line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def readable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogate escapes) as ``\\xNN``: valid UTF-8."""
    if not _SURROGATE.search(text):
        return text
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def csv_rows(r: Result) -> Iterator[list[Any]]:
    """CSV rows of one result: one per face, or one with empty face columns."""
    head = [readable(r.path), "" if r.frame is None else r.frame, r.width or "", r.height or ""]
    if not r.faces:
        yield head + [""] * 9 + [readable(r.error or "")] + [""] * len(AGE_GROUPS)
    for i, f in enumerate(r.faces):
        d = f.to_dict()
        probs = [d["age_probs"][g] if d["age_probs"] else "" for g in AGE_GROUPS]
        yield head + [i, *d["box"], d["det_score"], d["age"] or "", d["gender"] or "",
                      "" if d["gender_score"] is None else d["gender_score"], ""] + probs


def _is_our_csv(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(CSV_HEAD)).decode("utf-8", "replace") == CSV_HEAD


def check_outputs(csv_path: str | None, annotated: str | None, files: Sequence[str]) -> None:
    """Refuse (OutputRefused) a ``--csv`` that is one of the inputs or an existing non-empty file
    that is not an agegender-run CSV, and a ``--save-annotated`` folder that holds an input."""
    inputs = fsutil.file_ids(files)
    if csv_path:
        target, through = fsutil.resolve_output(csv_path)
        if fsutil.file_id(target) in inputs:
            raise OutputRefused(f"--csv {csv_path}: is one of the inputs; refusing to overwrite it")
        if not through and target.is_file() and target.stat().st_size > 0 and not _is_our_csv(target):
            raise OutputRefused(f"--csv {csv_path}: exists and is not a CSV written by agegender-run; refusing to "
                                f"overwrite it (remove it or choose another name)")
    if annotated and os.path.isdir(annotated):
        folders = fsutil.file_ids({os.path.dirname(os.path.abspath(f)) for f in files})
        if fsutil.file_id(annotated) in folders:
            raise OutputRefused(f"--save-annotated {annotated}: holds input images, which annotated copies would "
                                f"overwrite; choose another folder")


class Annotator:
    """Writes each image with its boxes, gender and age drawn into one folder (names kept unique);
    never over one of the inputs."""

    def __init__(self, folder: str, inputs: Sequence[str] = ()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()
        self.inputs = fsutil.file_ids(inputs)

    def _name(self, r: Result) -> str:
        p = Path(r.path)
        suffix = p.suffix.lower() if p.suffix.lower() in WRITABLE_EXTS else ".jpg"
        stem = p.stem if r.frame is None else f"{p.stem}_f{r.frame:06d}"
        name, k = f"{stem}{suffix}", 1
        while name in self.used:
            name, k = f"{stem}_{k}{suffix}", k + 1
        self.used.add(name)
        return name

    def save(self, r: Result) -> None:
        import cv2

        img = cv2.cvtColor(r.image, cv2.COLOR_RGB2BGR)
        scale = max(0.4, min(img.shape[:2]) / 700)
        thick = max(2, round(scale * 2))
        for f in r.faces:
            x1, y1, x2, y2 = f.box
            color = (230, 120, 30) if f.gender == "male" else (160, 40, 220) if f.gender == "female" else (40, 200, 40)
            cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
            label = " ".join(v for v in (f.gender, f.age) if v)
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
            ty = y1 - 4 if y1 - th - base - 4 >= 0 else y2 + th + 4
            cv2.rectangle(img, (x1, ty - th - 2), (x1 + tw + 2, ty + base), color, -1)
            cv2.putText(img, label, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
        final = self.folder / self._name(r)
        if fsutil.file_id(final) in self.inputs:
            raise OSError(f"{final}: is one of the inputs; not overwritten")
        with fsutil.atomic_path(final, suffix=final.suffix) as tmp:
            if not cv2.imwrite(str(tmp), img):
                raise OSError(f"{final}: cannot write the annotated image")
