"""The checksummed, cached YuNet fetch (the detector itself: detect.py).

YuNet is not bundled: it is fetched once into a user cache dir and verified by sha256. The fetch
is bounded in total time and in size (a server that trickles or never ends its body is cut off),
http(s) only, and leaves no temporary file behind (see fsutil).
Every setting the fetch uses can be overridden by an environment variable, so offline devices
and tests never need the internet:

- ``AGEGENDER_DETECTOR_MODEL``: a local YuNet file (no download, no checksum; read by detect.py);
- ``AGEGENDER_CACHE_DIR``: where the fetched file is kept (default: platformdirs' user cache);
- ``AGEGENDER_DETECTOR_URL`` / ``AGEGENDER_DETECTOR_SHA256``: where to fetch it from and the
  sha256 it must have (e.g. a mirror on the local network).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

YUNET_URL = ("https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/"
             "face_detection_yunet_2026may.onnx")  # opencv_zoo: the 2023mar network re-exported with free height/width
YUNET_SHA256 = "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
# The file fetched before (a fixed 640x640 input, so OpenCV's slower backend): still used when it is
# what a device has in its cache, and still fetched from a mirror URL that names it.
LEGACY_YUNET = ("face_detection_yunet_2023mar.onnx", "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4")
KNOWN_SIZES = {YUNET_SHA256: 229_738, LEGACY_YUNET[1]: 232_589}  # bytes: a download of one may not be longer
FETCH_TIMEOUT_S = 60.0


class DetectorError(RuntimeError):
    """A detector that cannot be set up; the message is one line for the user."""


def cache_dir() -> Path:
    """The folder that holds the fetched detector (``AGEGENDER_CACHE_DIR`` overrides)."""
    env = os.environ.get("AGEGENDER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("agegender", appauthor=False))


def detector_url() -> str:
    return os.environ.get("AGEGENDER_DETECTOR_URL") or YUNET_URL


def detector_sha256() -> str:
    """``AGEGENDER_DETECTOR_SHA256``, else the sha256 of the known YuNet file the URL names."""
    given = os.environ.get("AGEGENDER_DETECTOR_SHA256")
    if given:
        return given.lower()
    return LEGACY_YUNET[1] if cached_path().name == LEGACY_YUNET[0] else YUNET_SHA256


def cached_path(url: str | None = None) -> Path:
    """Where the file from ``url`` is (or would be) cached."""
    name = (url or detector_url()).rstrip("/").rsplit("/", 1)[-1] or "face_detection_yunet.onnx"
    return cache_dir() / name


MAX_DETECTOR_BYTES = 32 * 2**20  # bound for another file (AGEGENDER_DETECTOR_SHA256 set)
URL_SCHEMES = ("http", "https")


class _FetchRefused(Exception):
    """A download cut off or rejected; the message completes "YuNet download from URL ..."."""


def _verified(path: Path, sha: str) -> Path | None:
    import pooch

    return path if path.is_file() and pooch.file_hash(str(path)) == sha else None


def _verified_legacy() -> Path | None:
    """The previously fetched 2023mar file in the cache, when no other file is asked for by sha256."""
    if os.environ.get("AGEGENDER_DETECTOR_SHA256"):
        return None
    return _verified(cache_dir() / LEGACY_YUNET[0], LEGACY_YUNET[1])


def verified_cached_yunet() -> Path | None:
    """The cached YuNet file when it is a regular file with the expected sha256 (else the previously
    fetched 2023mar file, unless another file is asked for by sha256), or None."""
    return _verified(cached_path(), detector_sha256()) or _verified_legacy()


def _get(url: str, timeout: float, limit: int, cancel: threading.Event) -> bytes:
    """The body of ``url``, refused past ``limit`` bytes (the Content-Length is checked first)."""
    import requests

    per_read = min(timeout, 10.0)
    with requests.get(url, stream=True, timeout=(per_read, per_read)) as r:
        r.raise_for_status()
        length = r.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise _FetchRefused(f"rejected: {int(length):,} bytes announced, more than the expected {limit:,}")
        data = bytearray()
        for chunk in r.iter_content(1 << 14):
            if cancel.is_set():
                break
            data += chunk
            if len(data) > limit:
                raise _FetchRefused(f"rejected: more than the expected {limit:,} bytes")
        return bytes(data)


def _download(url: str, timeout: float, limit: int) -> bytes:
    """``_get`` in a worker thread, so the whole fetch takes at most ``timeout`` seconds: the
    socket timeout bounds each read only, and a server sending a byte a second never trips it.
    The body is kept in memory: a killed fetch leaves no file."""
    box: dict[str, object] = {}
    cancel = threading.Event()

    def work() -> None:
        try:
            box["data"] = _get(url, timeout, limit, cancel)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=work, name="agegender-fetch", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        cancel.set()
        raise _FetchRefused(f"cut off: not complete within {timeout:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["data"]  # type: ignore[return-value]


def fetch_yunet(timeout: float = FETCH_TIMEOUT_S, upgrade: bool = False) -> Path:
    """Download YuNet into the cache (once), verify its sha256 and return its path.

    A cached verified file is used without any network access; with ``upgrade`` (``--fetch-detector``)
    a cached 2023mar file does not stop the download of the current one, and is used only if that
    download fails. A download whose checksum differs is deleted, never cached. Raises DetectorError.
    """
    url, path = detector_url(), cached_path()
    current = _verified(path, detector_sha256())
    if current is not None:
        return current
    legacy = _verified_legacy()
    if legacy is not None and not upgrade:
        return legacy
    try:
        return _fetch(url, path, detector_sha256(), timeout)
    except DetectorError as e:
        if legacy is None:
            raise
        log.warning("%s; using the cached %s", e, legacy.name)
        return legacy


def _fetch(url: str, path: Path, expected: str, timeout: float) -> Path:
    import requests

    scheme = urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise DetectorError(f"cannot download YuNet from {url}: unsupported URL scheme {scheme or 'none'!r} (http or "
                            f"https only; for a local file use --detector-model or AGEGENDER_DETECTOR_MODEL)")
    log.info("fetching the YuNet face detector from %s into %s", url, path.parent)
    try:
        data = _download(url, timeout, KNOWN_SIZES.get(expected, MAX_DETECTOR_BYTES))
        _store_verified(data, path, expected)
    except _FetchRefused as e:
        raise DetectorError(f"YuNet download from {url} {e}; nothing was cached") from None
    except requests.exceptions.RequestException as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = f"HTTP {status}" if status else type(e).__name__
        raise DetectorError(f"cannot download YuNet from {url}: {why}") from None
    except OSError as e:
        raise DetectorError(f"cannot write the YuNet cache in {path.parent}: {e.strerror or e}") from None
    log.info("YuNet cached at %s (sha256 verified)", path)
    return path


def _store_verified(data: bytes, path: Path, expected: str) -> None:
    """Write ``data`` to ``path`` only if its sha256 is ``expected`` (checked on the written file)."""
    import pooch

    from .fsutil import atomic_path

    with atomic_path(path, suffix=".onnx") as tmp:
        tmp.write_bytes(data)
        if pooch.file_hash(str(tmp)) != expected:
            raise _FetchRefused(f"rejected: its sha256 differs from the expected {expected}")
