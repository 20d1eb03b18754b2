"""Aligned face crops for the recogniser after the detector: the 5-point similarity alignment of insightface-style
(ArcFace) recognisers.

The template is the ArcFace 112 x 112 reference landmarks (insightface ``utils/face_align.py``, ``arcface_dst``; the
96 x 112 SphereFace template shifted right by 8 pixels), in :data:`~edgeface.core.face.LANDMARK_NAMES` order. A
crop of another size scales the template by height / 112 and centres it horizontally, so (96, 112) gives the
original 96 x 112 template exactly. (insightface's own 128 x 128 crop instead shifts the unscaled template by 8
pixels; pass ``template=`` for such a convention.)

The transform (rotation, uniform scale, translation: no shear) is OpenCV's ``estimateAffinePartial2D`` fitted to
the five point pairs in the least-squares sense (every point an inlier, Levenberg-Marquardt refinement); the crop
is ``warpAffine`` with bilinear interpolation and a black border.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edgeface.core.errors import EdgefaceError

# (x, y) in a 112 x 112 crop: left eye, right eye, nose tip, left and right mouth corners (as seen in the image).
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
ARCFACE_SIZE = 112


def crop_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (width, height) pixels: one number is a square crop. Raises EdgefaceError below 16 or above 4096."""
    pair = (size, size) if isinstance(size, (int, np.integer)) else (
        tuple(size) if isinstance(size, Sequence) and not isinstance(size, str) else ())
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 16 <= v <= 4096
                                 for v in pair):
        raise EdgefaceError(f"aligned crop size {size!r}: give whole pixels, 16-4096 (e.g. 112 or (96, 112))")
    return int(pair[0]), int(pair[1])


def template_for(size: int | Sequence[int]) -> np.ndarray:
    """The 5 x 2 float32 template landmarks of a (width, height) crop: ArcFace's, scaled by height / 112 and
    centred horizontally."""
    width, height = crop_size(size)
    scale = height / ARCFACE_SIZE
    template = ARCFACE_TEMPLATE * scale
    template[:, 0] += (width - ARCFACE_SIZE * scale) / 2
    return template


def similarity_to_template(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The 2 x 3 float64 similarity transform taking ``landmarks`` (5 x 2, image pixels) to ``template`` (5 x 2,
    crop pixels). Raises EdgefaceError for landmarks that do not determine one (all points together)."""
    source = np.asarray(landmarks, np.float32).reshape(-1, 2)
    target = np.asarray(template, np.float32).reshape(-1, 2)
    if source.shape != target.shape or len(source) < 2 or not np.isfinite(source).all():
        raise EdgefaceError(f"alignment needs {len(target)} finite (x, y) landmarks, got shape {source.shape}")
    # every point an inlier (a threshold far beyond any face): the refinement then minimises the squared error over
    # all five points, the least-squares similarity insightface fits (Umeyama), instead of dropping "outliers"
    matrix, _ = cv2.estimateAffinePartial2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=1e6,
                                            refineIters=20)
    if matrix is None or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:, :2])) < 1e-12:
        raise EdgefaceError("the landmarks do not determine an alignment (they coincide)")
    return matrix


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int | Sequence[int] = ARCFACE_SIZE, *,
               template: np.ndarray | None = None) -> np.ndarray:
    """The aligned crop of the face whose 5 landmarks (x, y pixels, LANDMARK_NAMES order) are ``landmarks`` in
    ``image`` (H x W x C uint8, any channel order, kept): an array of ``size`` (height, width, C), the same dtype.
    ``template`` (5 x 2, crop pixels) replaces the scaled ArcFace one. Raises EdgefaceError for an empty image or
    degenerate landmarks."""
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise EdgefaceError(f"alignment needs an H x W (x C) image, got shape {image.shape}")
    width, height = crop_size(size)
    matrix = similarity_to_template(landmarks, template_for((width, height)) if template is None else template)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)
