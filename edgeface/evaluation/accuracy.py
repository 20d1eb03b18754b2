"""Runs a detector over WIDER FACE images and scores it with the official protocol."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import cache_dir
from edgeface.core.images import list_images, load_image
from edgeface.core.processing import Detections, ResizePolicy
from edgeface.evaluation.widerface import (
    GroundTruth,
    WiderResult,
    evaluate,
    image_key,
    write_predictions,
)
from edgeface.inference.detector import Detector

# The WIDER FACE protocol of the reference implementation, as Detector keyword arguments: everything down to score
# 0.02 is ranked, and a model that takes any size sees each image at its original scale (the photo default, max:640,
# would lose the small faces); a fixed-size model keeps its own size. An explicit ``resize=`` still wins.
WIDER_SETTINGS = {"score_threshold": 0.02, "nms_threshold": 0.4, "top_k": 5000, "keep_top_k": 750,
                  "default_resize": "original"}


def select_images(images_dir: str | os.PathLike, gt: GroundTruth, limit: int | None = None) -> list[Path]:
    """The ground-truth images found under ``images_dir`` (``<event>/<name>.jpg``); with ``limit``, that many
    spread evenly over the sorted list so that every event is represented."""
    paths = [p for p in list_images(images_dir) if image_key(p) in gt]
    if not paths:
        raise EdgefaceError(
            f"no WIDER FACE validation images under {images_dir} (expected <event>/<name>.jpg files named as in "
            "the ground truth, e.g. 0--Parade/0_Parade_marchingband_1_20.jpg)"
        )
    if limit is not None and limit < len(paths):
        if limit < 1:
            raise EdgefaceError(f"--limit must be at least 1, got {limit}")
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


def to_wider_rows(dets: Detections) -> np.ndarray:
    """Detections -> (N, 5) rows ``x y w h score`` of the WIDER prediction format.

    Corners are truncated to whole pixels, as the reference implementation writes them, so that AP is
    comparable with its published figures (float boxes move AP by about 0.1 point).
    """
    corners = np.trunc(dets.boxes.astype(np.float64))
    xywh = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    return np.concatenate([xywh, dets.scores[:, None].astype(np.float64)], axis=1)


def predict(
    detect: Callable[[Sequence[np.ndarray]], list[Detections]],
    paths: Sequence[Path],
    *,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[tuple[str, str], np.ndarray]:
    """Predictions for every image, one at a time (original-scale images differ in size)."""
    predictions = {}
    # a bar only on a terminal: logs and pipes get the result lines alone
    for path in tqdm(paths, desc="WIDER FACE", unit="img", disable=not progress or not sys.stderr.isatty()):
        rows = to_wider_rows(detect([load_image(path)])[0])
        key = image_key(path)
        predictions[key] = rows
        if save_dir is not None:
            write_predictions(save_dir, key[0], key[1], rows)
    return predictions


def evaluate_detector(
    detect: Callable[[Sequence[np.ndarray]], list[Detections]],
    images_dir: str | os.PathLike,
    gt: GroundTruth,
    *,
    limit: int | None = None,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> WiderResult:
    """AP of ``detect`` (e.g. ``Detector(**WIDER_SETTINGS).detect_arrays``, which sets the protocol's thresholds
    and original scale) on the ground-truth images under ``images_dir``, by the official protocol."""
    paths = select_images(images_dir, gt, limit)
    predictions = predict(detect, paths, save_dir=save_dir, progress=progress)
    return evaluate(predictions, gt, images=list(predictions))


def default_image_dir() -> Path | None:
    """The shared WIDER FACE images, when present: $EDGEFACE_SHARED or ../shared."""
    shared = Path(os.environ.get("EDGEFACE_SHARED", "../shared"))
    images = shared / "data" / "widerface" / "val" / "images"
    return images if images.is_dir() else None


def spread(paths: list[Path], n: int) -> list[Path]:
    """``n`` of ``paths`` spread evenly over the list (all of them when ``n`` is not smaller)."""
    if n >= len(paths):
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def fp32_baseline(model, policy: ResizePolicy, spec: dict[str, Any], gt, progress: bool, log) -> dict[str, float]:
    """AP of FP32 PyTorch on the same images and input policy: computed once per weights / policy / image set and
    kept in the cache directory (PyTorch FP32 is deterministic on a given machine), since every export of a model
    compares against the same figure."""
    paths = select_images(spec["images"], gt, spec.get("limit"))
    key = hashlib.sha256(json.dumps({
        "config": model.config.to_dict(), "weights": model.weights_info, "policy": str(policy),
        "gt": str(spec["gt"]), "images": [str(p.relative_to(spec["images"])) for p in paths],
        "settings": WIDER_SETTINGS,
    }, sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_dir() / "fp32-widerface" / f"{key}.json"
    if cached.is_file():
        log(f"FP32 PyTorch AP on these images from the cache ({cached})")
        return json.loads(cached.read_text())
    log("WIDER FACE evaluation of FP32 PyTorch, same input policy")
    reference = Detector.for_model(model, resize=policy, **WIDER_SETTINGS)
    ap = evaluate_detector(reference.detect_arrays, spec["images"], gt, limit=spec.get("limit"),
                           progress=progress).ap
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(ap))
    return ap
