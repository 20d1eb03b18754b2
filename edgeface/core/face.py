"""The one result type of every detector and runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeface.core.align import ARCFACE_SIZE, align_face

# Order of the 5 landmarks in every output of edgeface (the order RetinaFace was trained with). "left" and
# "right" are as seen in the image: on an upright frontal face ``left_eye`` has the smaller x (it is the
# subject's right eye).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class Face:
    """A detected face in original-image pixel coordinates.

    ``box`` is (x1, y1, x2, y2); it is not clipped to the image, like the reference implementation, so a face cut
    by the border keeps its full extent. ``landmarks`` holds five (x, y) points in :data:`LANDMARK_NAMES` order.
    ``track_id`` is the face's identity across video frames (:class:`edgeface.inference.tracking.FaceTracker`):
    1, 2, ... in the order tracks were confirmed; ``None`` from a detector alone, or for a face the tracker has not
    confirmed yet.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    track_id: int | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def align(self, image: np.ndarray, size: int | Sequence[int] = ARCFACE_SIZE) -> np.ndarray:
        """The face's aligned crop from ``image`` (the H x W x 3 array it was detected in): ``size`` (112, or
        (width, height) such as (96, 112)) pixels, eyes, nose and mouth corners moved onto the ArcFace template
        by a similarity transform (:func:`edgeface.core.align.align_face`), what insightface-style recognisers
        take. Returns (height, width, 3), ``image``'s dtype and channel order. Raises EdgefaceError for a bad
        size."""
        return align_face(image, np.asarray(self.landmarks, np.float32), size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: box, score, landmarks by name, and ``track_id`` when it has one."""
        record = {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 5),
            "landmarks": {name: [round(x, 2), round(y, 2)] for name, (x, y) in zip(LANDMARK_NAMES, self.landmarks)},
        }
        if self.track_id is not None:
            record["track_id"] = self.track_id
        return record
