"""Writing outputs: the one way every command writes a file.

- A regular file (or a new path) is written under a temporary name next to it and renamed onto
  it only when complete: a crash never leaves a half-written file under its final name.
- A symlink is resolved: its target is replaced, the link kept.
- A special file (``/dev/stdout``, ``/dev/full``, a FIFO, anything under /dev or /proc) is
  written through (/dev/stdout and /dev/fd/N share the open descriptor; others are appended
  to, never truncated), never renamed over, so its errors (``/dev/full``: disk full) are seen.
- The file gets the mode a plain ``open()`` gives (0666 less the umask), or the mode of the
  file it replaces, never mkstemp's 0600.
- Temporary files are named ``.NAME.PID-RANDOM.agegender-tmp[SUFFIX]``: SIGTERM/SIGHUP during a
  write remove them (exit 143/129); after a SIGKILL the next write to NAME sweeps them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_TAG = ".agegender-tmp"
LEGACY_TEMP_AGE_S = 3600  # mkstemp names of older versions have no pid: swept when this old
_SPECIAL_PREFIXES = ("/dev/", "/proc/")
_OWN_FD = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$|^/dev/(stdin|stdout|stderr)$")
_CAUGHT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def write_error_line(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a failed write; a full disk says so."""
    where = path or e.filename or "output"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{where}: disk full (no space left on device)"
    return f"{where}: {e.strerror or e}"


def resolve_output(final: str | os.PathLike) -> tuple[Path, bool]:
    """(the path to write, write-through?) for an output named ``final``.

    Symlinks are followed to their target; special files and /dev, /proc paths are written
    through (``/dev/stdout`` may resolve to the file the shell redirected to: never rename it).
    """
    given = os.path.abspath(final)
    if given.startswith(_SPECIAL_PREFIXES):
        return Path(given), True
    target = Path(os.path.realpath(given))
    try:
        mode = target.stat().st_mode
    except OSError:
        return target, False
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(final))
    return target, not stat.S_ISREG(mode)


def _open_through(target: Path, mode: str, **open_kw: Any) -> IO:
    """Open a special file for writing: our own descriptors (/dev/stdout, /dev/fd/N) are shared,
    not reopened, so the output lands where the process already writes; others are appended to."""
    m = _OWN_FD.match(str(target))
    if m:
        fd = int(m.group(1)) if m.group(1) else ("stdin", "stdout", "stderr").index(m.group(2))
        return os.fdopen(os.dup(fd), mode, **open_kw)
    return open(target, mode.replace("w", "a"), **open_kw)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True
    return True


def sweep_stale_temps(target: Path) -> int:
    """Remove temporary files of ours for ``target`` whose writer is dead; returns the count."""
    ours = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)-[0-9a-f]+{re.escape(TEMP_TAG)}")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}(\.[A-Za-z0-9]+)?$")
    removed = 0
    try:
        names = os.listdir(target.parent)
    except OSError:
        return 0
    for name in names:
        m = ours.match(name)
        path = target.parent / name
        try:
            stale = (m is not None and not _pid_alive(int(m.group(1)))) or (
                legacy.match(name) is not None and time.time() - path.lstat().st_mtime > LEGACY_TEMP_AGE_S)
            if stale and path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def _new_temp(folder: Path, target: Path, suffix: str) -> Path:
    """Create the temporary file: mode 0666 less the umask (like open()), or the replaced file's."""
    tmp = folder / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_TAG}{suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if target.is_file():
            os.fchmod(fd, stat.S_IMODE(target.stat().st_mode))
    finally:
        os.close(fd)
    return tmp


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the writers' cleanup


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP raise SystemExit while inside (main thread, default handlers only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in _CAUGHT_SIGNALS}
    mine = [s for s, h in saved.items() if h == signal.SIG_DFL]
    for s in mine:
        signal.signal(s, _exit_on_signal)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, saved[s])


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``final`` (see the module doc).

    ``suffix`` keeps an extension on the temporary name for writers that look at it
    (``cv2.imwrite``, ``np.savez``, ``matplotlib``).
    """
    target, through = resolve_output(final)
    if not through:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(target)
    tmp = _new_temp(Path(tempfile.gettempdir()) if through else target.parent, target, suffix)
    try:
        with cleanup_on_signals():
            yield tmp
            if through:
                with open(tmp, "rb") as src, _open_through(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "w", suffix: str = "", **open_kw: Any) -> Iterator[IO]:
    """``open(final, mode)`` that is atomic for regular files and writes through special ones."""
    target, through = resolve_output(final)
    try:
        if through:
            with cleanup_on_signals(), _open_through(target, mode, **open_kw) as fh:
                yield fh
            return
        with atomic_path(target, suffix) as tmp, open(tmp, mode, **open_kw) as fh:
            yield fh
    except OSError as e:  # a failed write or close names the output, not the temporary file
        e.filename = str(final)
        raise


def file_ids(paths: Iterable[str | os.PathLike]) -> set[tuple[int, int]]:
    """(device, inode) of each existing path: the same file under any name, link or hard link."""
    ids = set()
    for p in paths:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(p)
            ids.add((st.st_dev, st.st_ino))
    return ids


def file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    ids = file_ids([path])
    return next(iter(ids)) if ids else None


def write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_open(final, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(final: str | os.PathLike, obj: object) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")
