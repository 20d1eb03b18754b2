"""``Detector``: image(s) in, :class:`~edgeface.face.Face` lists out."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from edgeface.face import Face
from edgeface.images import load_image
from edgeface.models import get_model
from edgeface.processing import Detections, Letterbox, ResizePolicy, postprocess, preprocess

ImageLike = str | os.PathLike | np.ndarray


class Detector:
    """RetinaFace face detector.

    >>> faces = Detector().detect("photo.jpg")          # list[Face]
    >>> batches = Detector().detect([img_a, img_b])     # list[list[Face]]

    Arrays are BGR uint8 (OpenCV's order). Defaults suit photographs; the WIDER FACE protocol uses
    ``score_threshold=0.02`` (see :mod:`edgeface.benchmarks.widerface`).
    """

    def __init__(
        self,
        *,
        model: str = "retinaface_mnet025",
        weights: str | os.PathLike | None = "default",
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
        resize: str | ResizePolicy = "original",
        device: str = "cpu",
        negative_slope: float | None = None,
    ) -> None:
        self.network = get_model(model, weights=weights, negative_slope=negative_slope).to(device)
        self.config = self.network.config
        self.device = torch.device(device)
        self.resize = ResizePolicy.parse(resize)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw network outputs (loc, conf, landmarks) for a preprocessed NCHW batch."""
        with torch.inference_mode():
            outputs = self.network(torch.from_numpy(batch).to(self.device))
        return tuple(t.float().cpu().numpy() for t in outputs)

    def detect_arrays(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """BGR uint8 images -> detections as arrays (one network call for the whole batch)."""
        batch, letterboxes = preprocess(images, policy=self.resize, mean_bgr=self.config.mean_bgr)
        loc, conf, landmarks = self.infer(batch)
        return [self._post(loc[i], conf[i], landmarks[i], lb) for i, lb in enumerate(letterboxes)]

    def _post(self, loc, conf, landmarks, letterbox: Letterbox) -> Detections:
        return postprocess(
            loc, conf, landmarks, letterbox,
            anchors=self.config.anchors,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            top_k=self.top_k,
            keep_top_k=self.keep_top_k,
        )

    def detect(self, image: ImageLike | Sequence[ImageLike]) -> list[Face] | list[list[Face]]:
        """Faces of one image (path or array), or one list per image for a list of images."""
        if isinstance(image, (list, tuple)):
            return [d.to_faces() for d in self.detect_arrays([load_image(i) for i in image])]
        return self.detect_arrays([load_image(image)])[0].to_faces()
