"""Reading images into the one form the pipeline takes (H x W x 3 BGR uint8), and drawing results."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from edgeface.errors import EdgefaceError
from edgeface.face import Face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """A path or an array -> H x W x 3 BGR uint8.

    Arrays are taken as OpenCV gives them (BGR); grayscale (H x W or H x W x 1) is expanded to three channels and
    BGRA drops its alpha. Anything else is refused with the reason.
    """
    if isinstance(image, np.ndarray):
        return _as_bgr(image, "image array")
    path = Path(image)
    if not path.is_file():
        raise EdgefaceError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if decoded is None:
        raise EdgefaceError(
            f"{path} could not be decoded as an image (empty or not an image file); "
            f"supported formats include {', '.join(IMAGE_SUFFIXES)}"
        )
    return decoded


def _as_bgr(array: np.ndarray, what: str) -> np.ndarray:
    if array.size == 0:
        raise EdgefaceError(f"{what} is empty (shape {array.shape})")
    if array.dtype != np.uint8:
        raise EdgefaceError(
            f"{what} has dtype {array.dtype}; edgeface takes uint8 pixels 0-255 "
            "(for float images in 0-1 use (image * 255).round().astype(np.uint8))"
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        return cv2.cvtColor(array.reshape(array.shape[:2]), cv2.COLOR_GRAY2BGR)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    raise EdgefaceError(
        f"{what} has shape {array.shape}; expected H x W x 3 (BGR), H x W x 4 (BGRA) or H x W (grayscale)"
    )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# BGR colours per landmark, in LANDMARK_NAMES order.
_LANDMARK_COLORS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw_faces(image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of ``image`` with boxes, scores and landmarks drawn."""
    canvas = image.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
        cv2.putText(canvas, f"{face.score:.2f}", (x1, max(0, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thickness, (255, 255, 255), thickness)
        for (x, y), color in zip(face.landmarks, _LANDMARK_COLORS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), thickness + 1, color, -1)
    return canvas
