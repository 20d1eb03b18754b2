"""Pre- and post-processing shared by every backend: the only such code in edgeface.

image (BGR uint8) -> resize policy -> minus mean -> zero-pad (batch / fixed size) -> network
-> priors for the input size -> score threshold -> top-k -> decode -> NMS -> keep -> original-image pixels.

Conventions follow the reference implementation (biubug6/Pytorch_Retinaface), whose WIDER FACE results edgeface
reproduces: mean (104, 117, 123) subtracted from BGR, priors ordered row, column, anchor size; NMS with
pixel-inclusive areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.face import Face
from edgeface.core.images import env_limit

INPUT_MULTIPLE = 32
# Largest network input edgeface builds, in pixels (width x height of one image): 4096 x 4096. At that size the
# default PyTorch model peaks at about 1.3 GB of memory on CPU (18 s a frame on one core); an 8000 x 6000 photo
# at original scale would need about 3.5 GB. $EDGEFACE_MAX_INPUT_PIXELS overrides it.
MAX_INPUT_PIXELS = 4096 * 4096
# Runtime threads: far beyond any board; onnxruntime asked for 100000 threads crashes instead of refusing.
MAX_THREADS = 256


@dataclass(frozen=True)
class AnchorSpec:
    """The prior (anchor) layout and box coding of a model: all a runtime needs to decode its outputs."""

    min_sizes: tuple[tuple[int, ...], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)
    variance: tuple[float, float] = (0.1, 0.2)

    def num_priors(self, input_hw: tuple[int, int]) -> int:
        h, w = input_hw
        return sum(math.ceil(h / s) * math.ceil(w / s) * len(m) for s, m in zip(self.steps, self.min_sizes))


@dataclass(frozen=True)
class ResizePolicy:
    """How an image is scaled before the network.

    - ``max:N``: scale down so the longest side is at most N pixels; smaller images keep their size. ``max:640``
      is :data:`DEFAULT_RESIZE`, what :class:`~edgeface.inference.detector.Detector` uses for photographs with a
      model that takes any size: the anchors cover faces of 16 to about 600 pixels at the network input, so a face
      filling a selfie or close-up stays within them (at original scale it comes out as several confident
      fragments).
    - ``longest:N``: scale so the longest side is N pixels (up or down).
    - ``original``: no scaling: the WIDER FACE protocol (small faces in large images), the input grows with the
      image.
    - ``fixed:HxW``: scale to fit inside HxW keeping the aspect ratio, pad the rest (static-shape models).

    Whatever the policy, a side that would round to 0 pixels becomes 1, and a network input over
    :func:`max_input_pixels` pixels (width x height) is refused with an :class:`~edgeface.core.errors.EdgefaceError`
    (see :func:`preprocess`). Padding, where there is any, goes bottom/right, so results map back by a single
    division.
    """

    mode: str = "original"
    size: tuple[int, int] | None = None

    @classmethod
    def parse(cls, spec: "str | ResizePolicy") -> "ResizePolicy":
        if isinstance(spec, ResizePolicy):
            return spec
        text = str(spec).strip().lower()
        if text == "original":
            return cls("original")
        if m := re.fullmatch(r"(longest|max):(\d+)", text):
            n = int(m.group(2))
            if n < INPUT_MULTIPLE:
                raise EdgefaceError(f"resize {spec!r}: the longest side must be at least {INPUT_MULTIPLE} pixels")
            return cls(m.group(1), (n, n))
        if m := re.fullmatch(r"(?:fixed:)?(\d+)x(\d+)", text):
            h, w = int(m.group(1)), int(m.group(2))
            if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE or not h or not w:
                raise EdgefaceError(
                    f"resize {spec!r}: a fixed input size must be a positive multiple of {INPUT_MULTIPLE} "
                    f"on both sides (e.g. 640x640)"
                )
            return cls("fixed", (h, w))
        raise EdgefaceError(f"unknown resize policy {spec!r}; use 'max:N', 'longest:N', 'original' or 'fixed:HxW' "
                            "(e.g. max:640, 640x640)")

    def scale_for(self, image_hw: tuple[int, int]) -> float:
        """Factor from image pixels to network-input pixels for an image of ``image_hw`` = (height, width)."""
        h, w = image_hw
        if self.mode == "longest":
            return self.size[0] / max(h, w)
        if self.mode == "max":
            return min(1.0, self.size[0] / max(h, w))
        if self.mode == "fixed":
            return min(self.size[0] / h, self.size[1] / w)
        return 1.0

    def resized_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of an image of ``image_hw`` after scaling: each side rounded, at least 1 pixel."""
        scale = self.scale_for(image_hw)
        return tuple(max(1, round(side * scale)) for side in image_hw)

    def __str__(self) -> str:
        if self.mode in ("longest", "max"):
            return f"{self.mode}:{self.size[0]}"
        if self.mode == "fixed":
            return f"fixed:{self.size[0]}x{self.size[1]}"
        return "original"


DEFAULT_RESIZE = ResizePolicy("max", (640, 640))


def max_input_pixels() -> int:
    """The network-input limit in force: $EDGEFACE_MAX_INPUT_PIXELS if set, else :data:`MAX_INPUT_PIXELS`."""
    return env_limit("EDGEFACE_MAX_INPUT_PIXELS", MAX_INPUT_PIXELS)


@dataclass(frozen=True)
class Letterbox:
    """Where one image sits in the network input: original pixel = input pixel / ``scale``."""

    scale: float
    image_hw: tuple[int, int]
    input_hw: tuple[int, int]


def preprocess(
    images: Sequence[np.ndarray],
    *,
    policy: ResizePolicy,
    mean_bgr: Sequence[float],
    layout: str = "NCHW",
    pad_bgr: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[Letterbox]]:
    """BGR uint8 images (H x W x 3 each) -> one float32 batch (N x 3 x H' x W' for ``layout`` "NCHW", N x H' x W'
    x 3 for "NHWC") with ``mean_bgr`` subtracted, padded to a common size, and where each image sits in it.

    Padding is the model's mean colour ``pad_bgr`` (default ``mean_bgr``), i.e. zero once the mean is subtracted,
    as the convolutions' own padding is; a model that subtracts the mean itself passes ``mean_bgr`` zeros and
    ``pad_bgr`` its mean.

    Raises :class:`~edgeface.core.errors.EdgefaceError`, before resizing or allocating anything, when H' x W' would
    exceed :func:`max_input_pixels` pixels (4096 x 4096 by default): e.g. a photo of over 16.8 megapixels or a
    1000000 x 64 panorama under ``original``, or a batch whose images, padded to a common size, reach that.
    """
    sizes = [policy.resized_hw(image.shape[:2]) for image in images]
    if policy.mode == "fixed":
        input_hw = policy.size
    else:  # images of a batch share the largest size; a single image is not padded at all
        input_hw = (max(h for h, _ in sizes), max(w for _, w in sizes))
    limit = max_input_pixels()
    if input_hw[0] * input_hw[1] > limit:  # checked before any resize or allocation
        h, w = images[0].shape[:2]
        what = f"a {w}x{h} image" if len(images) == 1 else f"a batch of {len(images)} images"
        raise EdgefaceError(
            f"resize {policy} would give {what} a {input_hw[1]}x{input_hw[0]} network input "
            f"({input_hw[0] * input_hw[1] / 1e6:.1f} megapixels), over edgeface's limit of {limit / 1e6:.1f} "
            "megapixels: use a resize that scales down (--resize max:1920, or resize='max:1920' in Python) or set "
            "EDGEFACE_MAX_INPUT_PIXELS to raise the limit")
    resized, boxes = [], []
    for image, (h, w) in zip(images, sizes):
        scale = policy.scale_for(image.shape[:2])
        boxes.append((scale, image.shape[:2]))
        resized.append(image if scale == 1.0 else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR))
    mean = np.asarray(mean_bgr, np.float32)
    pad = np.asarray(mean_bgr if pad_bgr is None else pad_bgr, np.float32) - mean
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    height, width = input_hw
    nchw = layout == "NCHW"
    batch = np.empty((len(resized), 3, height, width) if nchw else (len(resized), height, width, 3), np.float32)
    for slot, image in zip(batch, resized):
        h, w = image.shape[:2]
        if nchw:  # plane by plane: contiguous writes, ~7x faster than subtracting in HWC and transposing
            for channel, plane in enumerate(cv2.split(image)):
                np.subtract(plane, mean[channel], out=slot[channel, :h, :w], dtype=np.float32)
            slot[:, h:, :] = pad[:, None, None]
            slot[:, :h, w:] = pad[:, None, None]
        else:
            np.subtract(image, mean, out=slot[:h, :w], dtype=np.float32)
            slot[h:, :] = pad
            slot[:h, w:] = pad
    return batch, [Letterbox(scale, hw, input_hw) for scale, hw in boxes]


def level_slices(input_hw: tuple[int, int], anchors: AnchorSpec) -> list[tuple[int, slice]]:
    """(stride, range of prior indices) of each anchor level at ``input_hw``, in the order the heads emit them
    (:func:`prior_boxes`' order: levels by stride ascending, each a ceil(H / stride) x ceil(W / stride) grid
    times its anchor sizes)."""
    h, w = input_hw
    out, start = [], 0
    for step, sizes in zip(anchors.steps, anchors.min_sizes):
        n = math.ceil(h / step) * math.ceil(w / step) * len(sizes)
        out.append((step, slice(start, start + n)))
        start += n
    return out


@functools.lru_cache(maxsize=32)
def prior_boxes(input_hw: tuple[int, int], anchors: AnchorSpec) -> np.ndarray:
    """(A, 4) priors (cx, cy, w, h), normalised to the input size, in the order the heads emit them."""
    h, w = input_hw
    levels = []
    for step, sizes in zip(anchors.steps, anchors.min_sizes):
        rows, cols = math.ceil(h / step), math.ceil(w / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / h, (np.arange(cols) + 0.5) * step / w, indexing="ij")
        centers = np.broadcast_to(np.stack([cx, cy], -1).reshape(-1, 1, 2), (rows * cols, len(sizes), 2))
        wh = np.broadcast_to(np.array([[s / w, s / h] for s in sizes]), (rows * cols, len(sizes), 2))
        levels.append(np.concatenate([centers, wh], -1).reshape(-1, 4))
    priors = np.concatenate(levels).astype(np.float32)
    priors.setflags(write=False)  # cached and shared: nobody may modify it
    return priors


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variance: Sequence[float]) -> np.ndarray:
    """(K, 4) offsets -> (K, 4) boxes (x1, y1, x2, y2), normalised to the input size."""
    centers = priors[:, :2] + loc[:, :2] * variance[0] * priors[:, 2:]
    half = priors[:, 2:] * np.exp(loc[:, 2:] * variance[1]) / 2
    return np.concatenate([centers - half, centers + half], axis=1)


def decode_landmarks(landmarks: np.ndarray, priors: np.ndarray, variance: Sequence[float]) -> np.ndarray:
    """(K, 10) offsets -> (K, 5, 2) points (x, y), normalised to the input size."""
    offsets = landmarks.reshape(-1, 5, 2)
    return priors[:, None, :2] + offsets * variance[0] * priors[:, None, 2:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Areas are pixel-inclusive (+1), as in the reference implementation, so that results match it exactly.
    """
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter <= iou_threshold * (areas[i] + areas[rest] - inter)]
    return np.asarray(keep, dtype=np.intp)


@dataclass(frozen=True)
class Detections:
    """Detections of one image as arrays (original-image pixels), highest score first."""

    boxes: np.ndarray  # (K, 4) x1, y1, x2, y2
    scores: np.ndarray  # (K,)
    landmarks: np.ndarray  # (K, 5, 2)

    def __len__(self) -> int:
        return len(self.scores)

    def to_faces(self) -> list[Face]:
        return [
            Face(tuple(map(float, b)), float(s), tuple((float(x), float(y)) for x, y in p))
            for b, s, p in zip(self.boxes, self.scores, self.landmarks)
        ]


def postprocess(
    loc: np.ndarray,
    conf: np.ndarray,
    landmarks: np.ndarray,
    letterbox: Letterbox,
    *,
    anchors: AnchorSpec,
    score_threshold: float = 0.5,
    nms_threshold: float = 0.4,
    top_k: int = 5000,
    keep_top_k: int = 750,
) -> Detections:
    """Raw outputs of one image ((A, 4), (A, 2) softmax, (A, 10)) -> detections in original-image pixels."""
    priors = prior_boxes(tuple(letterbox.input_hw), anchors)
    if len(priors) != len(loc) or len(conf) != len(loc) or len(landmarks) != len(loc):
        raise EdgefaceError(
            f"the model returned {len(loc)}/{len(conf)}/{len(landmarks)} loc/conf/landmark rows, but an input of "
            f"{letterbox.input_hw[0]}x{letterbox.input_hw[1]} with the declared anchors has {len(priors)} priors: "
            "the model and its anchor configuration do not belong together"
        )
    scores = conf[:, 1]
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")][:top_k]
    # Decode only the survivors of the threshold: a few hundred rows instead of every prior.
    h, w = letterbox.input_hw
    to_pixels = np.array([w, h], np.float32) / letterbox.scale
    boxes = decode_boxes(loc[order], priors[order], anchors.variance) * np.tile(to_pixels, 2)
    keep = nms(boxes, scores[order], nms_threshold)[:keep_top_k]
    points = decode_landmarks(landmarks[order[keep]], priors[order[keep]], anchors.variance) * to_pixels
    return Detections(boxes[keep].astype(np.float32), scores[order[keep]].astype(np.float32), points.astype(np.float32))


def quantize(batch: np.ndarray, quantization: dict[str, float], dtype: str) -> np.ndarray:
    """float -> integer tensor of a fully quantised model (real = scale * (q - zero_point))."""
    info = np.iinfo(np.dtype(dtype))
    q = np.round(batch / quantization["scale"] + quantization["zero_point"])
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(tensor: np.ndarray, quantization: dict[str, float] | None) -> np.ndarray:
    if quantization is None:
        return tensor.astype(np.float32, copy=False)
    return ((tensor.astype(np.float32) - quantization["zero_point"]) * quantization["scale"]).astype(np.float32)
