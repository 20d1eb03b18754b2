"""Writing files so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeface.core.errors import EdgefaceError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``: readers see the old
    file or the whole new one, and a failure leaves no file behind. The file gets the permissions of the one it
    replaces, or those of any new file (0666 less the umask) rather than mkstemp's private 0600, so that reports
    stay readable by whoever reads the folder (a CI artifact server)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it for a moment."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


CACHE_ENV = "EDGEFACE_CACHE"


def cache_dir() -> Path:
    """Where converted weights are kept: ``$EDGEFACE_CACHE``, else ``$XDG_CACHE_HOME/edgeface``, else
    ``~/.cache/edgeface``. Raises :class:`EdgefaceError` when that path exists and is not a folder."""
    if os.environ.get(CACHE_ENV):
        folder = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeface"
    if folder.exists() and not folder.is_dir():
        raise EdgefaceError(f"the edgeface cache {folder} is a file, not a folder; point {CACHE_ENV} to a folder "
                            "(or unset it)")
    return folder


@contextlib.contextmanager
def captured_output(log) -> Iterator[None]:
    """stdout / stderr, Python's objects and file descriptors 1 and 2, into the open file ``log`` (native
    libraries write to the descriptors directly). Per process: other threads' output is captured too."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    try:
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(log.fileno(), fd)
    except OSError:  # no such descriptor (a daemon): Python-level capture only
        pass
    text = open(os.dup(log.fileno()), "w", encoding="utf-8", errors="replace", buffering=1)  # noqa: SIM115
    try:
        with text, contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            yield
    finally:
        _flush_c_stdio()  # native output still in C's buffers belongs to the log, not to the terminal later
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _flush_c_stdio() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)
