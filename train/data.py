"""Training data: faces decoded once into a uint8 cache, albumentations for augmentation.

The evaluation input of every face is exactly what the runtime feeds the model for a
pre-cropped face (``preprocess.prepare_face`` of the whole image), computed once and cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from ..runtime.datasets import Record
from ..runtime.fsutil import atomic_path
from ..export.parity import face_of
from ..runtime.imageio import ImageError

log = logging.getLogger(__name__)


CACHE_VERSION = 2  # part of every key: a change of what is cached never reads an old file


def cache_key(records: list[Record], size: int) -> str:
    """A key of the decoded faces' content: each file's path, size and mtime (a missing file counts
    too, so adding it later or changing an image is a new key), the face size and the cache version."""
    h = hashlib.sha1(f"{CACHE_VERSION}\n{size}\n".encode())
    for r in records:
        try:
            st = os.stat(r.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "absent"
        h.update(f"{r.path}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _read_cache(path: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (faces, ok), or None when the file is unreadable or not what was asked for."""
    try:
        with np.load(path, allow_pickle=False) as z:
            faces, ok = z["faces"], z["ok"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        log.warning("face cache %s is unreadable (%s): decoding the images again", path, str(e).splitlines()[0])
        return None
    if faces.shape != (n, size, size, 3) or faces.dtype != np.uint8 or ok.shape != (n,) or ok.dtype != bool:
        log.warning("face cache %s does not hold %d faces of %d px: decoding the images again", path, n, size)
        return None
    log.info("face cache %s: %d faces", path, n)
    return faces, ok


def build_cache(records: list[Record], size: int, cache_dir: str | Path | None = None,
                threads: int = 2, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(faces uint8 [N, S, S, 3], ok bool [N]); unreadable images are marked not ok and counted.

    With ``cache_dir`` the array is kept on disk, keyed by the files' content (``cache_key``), and
    reused; an unreadable cache file is decoded again and replaced.
    """
    cache_file = Path(cache_dir) / f"faces_{size}_{cache_key(records, size)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        cached = _read_cache(cache_file, len(records), size)
        if cached is not None:
            return cached
    faces = np.zeros((len(records), size, size, 3), np.uint8)
    ok = np.zeros(len(records), bool)
    errors: dict[str, int] = {}

    def load(i: int) -> None:
        try:
            faces[i] = face_of(records[i].path, size)
            ok[i] = True
        except ImageError as e:
            reason = "missing" if "no such file" in str(e) else "unreadable"
            errors[reason] = errors.get(reason, 0) + 1
            log.debug("%s", e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(tqdm(pool.map(load, range(len(records))), total=len(records), desc=f"decode faces @{size}px",
                  disable=not progress, leave=False, mininterval=2))
    if errors:
        log.warning("skipped images: %s", ", ".join(f"{n} {k}" for k, n in sorted(errors.items())))
    if cache_file is not None:
        try:
            with atomic_path(cache_file, suffix=".npz") as tmp:
                np.savez(tmp, faces=faces, ok=ok)
        except OSError as e:  # a cache is an optimisation: training goes on without it
            log.warning("could not write the face cache %s (%s): continuing without it", cache_file,
                        e.strerror or e)
    return faces, ok


def train_transform(size: int, kind: str = "default") -> A.Compose | None:
    """Augmentation of the cached face: framing jitter around the box, flip, photometric, blur/JPEG."""
    if kind == "none":
        return None
    return A.Compose([
        A.Affine(scale=(0.88, 1.12), translate_percent=(-0.06, 0.06), rotate=(-12, 12),
                 border_mode=cv2.BORDER_REPLICATE, p=0.8),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.7),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=0, p=0.3),
        A.ToGray(p=0.1),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.ImageCompression(quality_range=(35, 90)),
                 A.Downscale(scale_range=(0.5, 0.8))], p=0.3),
        A.CLAHE(p=0.05),
    ])


class FaceDataset(Dataset):
    """Cached faces -> (float tensor [3, S, S] 0..255, age, gender)."""

    def __init__(self, faces: np.ndarray, index: np.ndarray, age: np.ndarray, gender: np.ndarray,
                 transform: A.Compose | None = None):
        self.faces, self.index, self.age, self.gender, self.transform = faces, index, age, gender, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = self.index[i]
        img = self.faces[j]
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
        return x, int(self.age[j]), int(self.gender[j])
