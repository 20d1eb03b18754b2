"""Frame sources for ``edgeface run``: an image, a folder of images, a video file or a camera, read one frame at a
time (nothing accumulates, so memory stays flat over long streams).

No process-wide setting is changed here (OpenCV's log level, FFmpeg's, file descriptors): OpenCV and FFmpeg may
print their own warnings on a bad video or camera before edgeface's error; the ``edgeface`` command silences them
(see :func:`edgeface.cli.main`), a program using this module decides for itself."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.images import IMAGE_SUFFIXES, list_images, load_image, output_names

# Containers whose frame count is read from an index (exact); elsewhere OpenCV estimates it from duration x fps.
EXACT_COUNT_SUFFIXES = (".avi", ".mp4", ".mov", ".m4v", ".3gp")
ESTIMATE_TOLERANCE = 0.05
MAX_CAMERA_INDEX = 2**31 - 1  # OpenCV takes a C int
DEFAULT_FRAME_RATE = 30.0  # cameras, folders of images, and videos that announce no rate


class StreamEndedEarly(EdgefaceError):
    """A video delivered fewer frames than its container announces: damaged or truncated."""


def frames(source: str, *,
           skip: str | os.PathLike | None = None) -> Iterator[tuple[str, np.ndarray | EdgefaceError]]:
    """(name, BGR frame) pairs from ``source``: IMAGE, DIR, VIDEO or ``camera:N``.

    A folder's images are named by :func:`edgeface.core.images.output_names` (``sub/a`` for ``sub/a.jpg``); those under
    the folder ``skip`` (e.g. where annotated frames are saved, inside ``source``) are left out. A folder's
    unreadable image comes as (name, EdgefaceError) in place of its frame, so that the caller decides whether to
    go on; a video that ends before its announced frame count ends with (name, StreamEndedEarly).
    """
    if m := re.fullmatch(r"camera:(\d+)", source):
        index = int(m.group(1))
        if index > MAX_CAMERA_INDEX:
            raise EdgefaceError(f"no camera {index}: cameras are camera:0, camera:1, ...")
        yield from _capture(index, f"camera {index}", "frame")
        return
    path = Path(source)
    if path.is_dir():
        paths = list_images(path)
        if skip is not None:
            skipped = Path(skip).resolve()
            paths = [p for p in paths if not p.resolve().is_relative_to(skipped)]
        if not paths:
            raise EdgefaceError(f"no images found under {path}")
        for p, name in output_names(paths, path).items():
            yield name, _read(p)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        yield path.stem, load_image(path)
    elif path.is_file():
        yield from _capture(str(path), str(path), path.stem)
    else:
        raise EdgefaceError(f"no such image, folder or video: {source} (cameras are camera:0, camera:1, ...)")


def frame_rate(source: str) -> float | None:
    """Frames per second a video file announces; None for cameras (not opened twice), images, folders, and videos
    that announce no plausible rate."""
    path = Path(source)
    if not path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES:
        return None
    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
    finally:
        capture.release()
    return float(fps) if 0 < fps <= 1000 else None


def _read(path: Path) -> np.ndarray | EdgefaceError:
    """A folder's image, or the reason it cannot be read (load_image answers every failure, I/O errors included,
    with an EdgefaceError): that file fails, not the folder."""
    try:
        return load_image(path)
    except EdgefaceError as exc:
        return exc


def _capture(source: str | int, what: str, prefix: str) -> Iterator[tuple[str, np.ndarray | EdgefaceError]]:
    capture = cv2.VideoCapture(source)
    opened = capture.isOpened()
    expected = capture.get(cv2.CAP_PROP_FRAME_COUNT) if opened else 0
    if not opened:
        raise EdgefaceError(f"could not open {what} (not a video OpenCV can read, or no such camera)")
    exact = isinstance(source, str) and Path(source).suffix.lower() in EXACT_COUNT_SUFFIXES
    index = 0
    try:
        while True:
            try:
                ok, frame = capture.read()
            except cv2.error:
                ok = False
            if not ok:
                break
            index += 1
            yield f"{prefix}_{index:06d}", frame
    finally:
        capture.release()
    if _ended_early(index, expected, exact):
        yield prefix, StreamEndedEarly(
            f"{what} ended early: {index} of its {int(expected)} frames read (damaged or truncated file)")


def _ended_early(read: int, expected: float, exact: bool) -> bool:
    """Cameras and live streams announce no count (0 or -1)."""
    if not 0 < expected < 2**40:
        return False
    missing = expected - read
    return missing > (0.5 if exact else max(2.0, ESTIMATE_TOLERANCE * expected))
