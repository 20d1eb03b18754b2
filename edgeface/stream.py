"""Frame sources for ``edgeface run``: an image, a folder of images, a video file or a camera, read one frame at a
time (nothing accumulates, so memory stays flat over long streams)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edgeface.errors import EdgefaceError
from edgeface.images import IMAGE_SUFFIXES, list_images, load_image


def frames(source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, BGR frame) pairs from ``source``: IMAGE, DIR, VIDEO or ``camera:N``."""
    if m := re.fullmatch(r"camera:(\d+)", source):
        yield from _capture(cv2.VideoCapture(int(m.group(1))), f"camera {m.group(1)}", "frame")
        return
    path = Path(source)
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise EdgefaceError(f"no images found under {path}")
        for p in paths:
            yield str(p.relative_to(path).with_suffix("")), load_image(p)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        yield path.stem, load_image(path)
    elif path.is_file():
        yield from _capture(cv2.VideoCapture(str(path)), str(path), path.stem)
    else:
        raise EdgefaceError(f"no such image, folder or video: {source} (cameras are camera:0, camera:1, ...)")


def _capture(capture: cv2.VideoCapture, what: str, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    if not capture.isOpened():
        raise EdgefaceError(f"could not open {what} (not a video OpenCV can read, or no such camera)")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return  # end of stream
            index += 1
            yield f"{prefix}_{index:06d}", frame
    finally:
        capture.release()
