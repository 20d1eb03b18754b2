"""The reference implementation's training augmentation (biubug6/Pytorch_Retinaface ``data/data_augment.py``):
a random square crop keeping the faces whose centres fall inside it, photometric distortion, a horizontal flip that
swaps left and right landmarks, and a resize to the training size with a random interpolation.

Choosing the crop is RetinaFace's own rule and is written here; cropping, padding, colour, flipping and resizing,
with the boxes and landmarks carried along, are done by albumentations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgeface.core.errors import require

# Side of the square crop as a fraction of the image's short side, and the tries before giving up (reference).
CROP_SCALES = (0.3, 0.45, 0.6, 0.8, 1.0)
CROP_TRIES = 250
# Landmark order after a horizontal flip: the eyes swap, the nose stays, the mouth corners swap.
FLIP_ORDER = (1, 0, 2, 4, 3)
INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)


@dataclass(frozen=True)
class Augmented:
    """One training sample: the image at the training size and its faces, normalised to it (0..1)."""

    image: np.ndarray  # (S, S, 3) uint8 BGR
    boxes: np.ndarray  # (F, 4) float32 x1, y1, x2, y2
    landmarks: np.ndarray  # (F, 5, 2) float32
    has_landmarks: np.ndarray  # (F,) bool


def choose_square_crop(image_hw: tuple[int, int], boxes: np.ndarray, rng: np.random.Generator,
                       ) -> tuple[int, int, int] | None:
    """(x, y, side) of a random square crop of side ``scale`` x short side (scale from :data:`CROP_SCALES`) that
    holds at least one face (``boxes`` (F, 4) pixels) entirely; None after :data:`CROP_TRIES` failures."""
    height, width = image_hw
    for _ in range(CROP_TRIES):
        side = int(rng.choice(CROP_SCALES) * min(height, width))
        if side < 1:
            continue
        x = int(rng.integers(width - side)) if width > side else 0
        y = int(rng.integers(height - side)) if height > side else 0
        inside = ((boxes[:, 0] >= x) & (boxes[:, 1] >= y) & (boxes[:, 2] <= x + side) & (boxes[:, 3] <= y + side))
        if inside.any():
            return x, y, side
    return None


def centres_inside(boxes: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    """(F,) bool: faces whose box centre lies strictly inside the square (x, y, side)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx > x) & (cx < x + side) & (cy > y) & (cy < y + side)


class TrainAugmentation:
    """Callable: (BGR image, boxes (F, 4) pixels, landmarks (F, 5, 2) pixels, has_landmarks (F,), rng) ->
    :class:`Augmented` at ``size`` x ``size``. ``fill_bgr``, the padding colour of an image whose crop fails (it is
    padded to a square instead), is the model's mean, i.e. zero after mean subtraction.

    Boxes are first clipped to the image (annotations may overrun it) and those left without area dropped. Raises
    :class:`~edgeface.core.errors.EdgefaceError` when albumentations is not installed."""

    def __init__(self, size: int, fill_bgr: Sequence[float]) -> None:
        require("albumentations", "train", "training augmentation")  # checked here, imported where used (pickling)
        self.size = size
        self.fill = tuple(float(v) for v in fill_bgr)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, has_landmarks: np.ndarray,
                 rng: np.random.Generator) -> Augmented:
        import albumentations as A

        height, width = image.shape[:2]
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, landmarks, has_landmarks = boxes[inside], landmarks[inside], has_landmarks[inside]
        crop = choose_square_crop((height, width), boxes, rng) if len(boxes) else None
        if crop is None:  # the reference pads the whole image to a square (top-left aligned) instead
            side = max(height, width)
            geometry = A.PadIfNeeded(min_height=side, min_width=side, position="top_left",
                                     border_mode=cv2.BORDER_CONSTANT, fill=self.fill[::-1], p=1.0)  # RGB here
            keep = np.ones(len(boxes), bool)
        else:
            x, y, side = crop
            geometry = A.Crop(x_min=x, y_min=y, x_max=x + side, y_max=y + side, p=1.0)
            keep = centres_inside(boxes, x, y, side)
        flip = bool(rng.random() < 0.5)
        transforms = [
            # the reference's _distort, before the padding: brightness +-32 levels, contrast x0.5-1.5, saturation
            # x0.5-1.5, hue +-18 (of 180), each independently half the time
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.5, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.1, p=0.5),
            geometry,
            *([A.HorizontalFlip(p=1.0)] if flip else []),
            A.Resize(self.size, self.size, interpolation=int(rng.choice(INTERPOLATIONS)), p=1.0),
        ]
        kept = np.flatnonzero(keep)
        pipeline = A.Compose(
            transforms,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["face"], clip=True),
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
            seed=int(rng.integers(2**31)),
        )
        # albumentations wants RGB for its colour transforms
        out = pipeline(image=image[:, :, ::-1], bboxes=boxes[kept].reshape(-1, 4), face=kept.tolist(),
                       keypoints=landmarks[kept].reshape(-1, 2))
        faces = np.asarray(out["face"], np.int64)
        position = {int(f): i for i, f in enumerate(kept)}
        points = np.asarray(out["keypoints"], np.float32).reshape(-1, 5, 2)
        if flip:
            # albumentations mirrors points to (width - 1) - x but boxes to width - x; the reference mirrors both to
            # width - x: one source pixel, size / side pixels here
            points[:, :, 0] += self.size / side
            points = points[:, FLIP_ORDER]
        points = points[[position[int(f)] for f in faces]] if len(faces) else points[:0]
        scale = np.float32(self.size)
        return Augmented(
            image=np.ascontiguousarray(out["image"][:, :, ::-1]),
            boxes=np.asarray(out["bboxes"], np.float32).reshape(-1, 4) / scale,
            landmarks=points / scale,
            has_landmarks=has_landmarks[faces] if len(faces) else np.zeros(0, bool),
        )
