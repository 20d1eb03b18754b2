"""Official WIDER FACE evaluation protocol (easy / medium / hard AP), written from scratch.

Reproduces ``widerface_evaluate/evaluation.py`` of biubug6/Pytorch_Retinaface, itself a port of the official
MATLAB code, with numpy and ``scipy.io.loadmat`` only:

* ground truth from ``wider_face_val.mat`` plus ``wider_{easy,medium,hard}_val.mat``; faces not listed for a
  difficulty are "ignored" (a detection on them is neither a true nor a false positive);
* scores min-max normalised over all predictions of the evaluated images;
* per image, greedy matching in descending score order with the pixel-inclusive IoU of the original Cython
  ``bbox_overlaps``, then precision/recall counts at 1000 score thresholds;
* VOC-style (all-point interpolated) AP of the summed curve.

Also reads and writes the standard WIDER prediction txt format (``DIR/<event>/<stem>.txt``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.files import atomic_write

__all__ = [
    "SUBSETS",
    "GroundTruth",
    "WiderFaceError",
    "WiderResult",
    "evaluate",
    "image_key",
    "load_ground_truth",
    "read_predictions",
    "write_predictions",
]

ImageKey = tuple[str, str]  # (event folder, image stem), e.g. ("0--Parade", "0_Parade_marchingband_1_20")

SUBSETS: tuple[str, ...] = ("easy", "medium", "hard")

_GT_FILES = {
    "all": "wider_face_val.mat",
    "easy": "wider_easy_val.mat",
    "medium": "wider_medium_val.mat",
    "hard": "wider_hard_val.mat",
}
_EVENT_RE = re.compile(r"^\d+--.+$")


class WiderFaceError(EdgefaceError):
    """Invalid WIDER FACE input: missing/corrupt ground truth, malformed prediction files, unknown images."""


# --------------------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------------------


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)  # eq=False: array fields make field-wise == ambiguous
class GroundTruth:
    """WIDER FACE ground truth.

    ``boxes[(event, stem)]`` is an ``(N, 4)`` float64 array of ``x, y, w, h``; ``kept[subset][(event, stem)]`` is
    the sorted 0-based int64 indices of the boxes that count for ``subset`` ('easy', 'medium', 'hard'); every other
    box of that image is ignored for that subset. Every image must appear in all three ``kept`` mappings.
    Construct it directly (tests) or with :func:`load_ground_truth`. Arrays are normalised and made read-only.
    """

    boxes: Mapping[ImageKey, np.ndarray]
    kept: Mapping[str, Mapping[ImageKey, np.ndarray]]

    def __post_init__(self) -> None:
        boxes: dict[ImageKey, np.ndarray] = {}
        for key, b in self.boxes.items():
            key = _check_key(key)
            arr = np.array(b, dtype=np.float64).reshape(-1, 4) if np.size(b) else np.zeros((0, 4))
            if not np.isfinite(arr).all():
                raise WiderFaceError(f"ground-truth boxes of {key} contain non-finite values")
            boxes[key] = _readonly(arr)
        if set(self.kept) != set(SUBSETS):
            raise WiderFaceError(f"GroundTruth.kept must have exactly the subsets {SUBSETS}, got {sorted(self.kept)}")
        kept: dict[str, Mapping[ImageKey, np.ndarray]] = {}
        for subset in SUBSETS:
            per_image: dict[ImageKey, np.ndarray] = {}
            src = {_check_key(k): v for k, v in self.kept[subset].items()}
            if set(src) != set(boxes):
                extra = sorted(set(src) - set(boxes))[:3]
                missing = sorted(set(boxes) - set(src))[:3]
                raise WiderFaceError(
                    f"GroundTruth.kept[{subset!r}] must list the same images as boxes "
                    f"(missing e.g. {missing}, unknown e.g. {extra})"
                )
            for key in boxes:
                idx = np.unique(np.asarray(src[key], dtype=np.int64).ravel())  # sorted, duplicates dropped
                if idx.size and (idx[0] < 0 or idx[-1] >= len(boxes[key])):
                    raise WiderFaceError(
                        f"GroundTruth.kept[{subset!r}][{key}] has index out of range for {len(boxes[key])} boxes"
                    )
                per_image[key] = _readonly(idx)
            kept[subset] = MappingProxyType(per_image)
        # Frozen dataclass: replace the inputs by validated, read-only copies.
        object.__setattr__(self, "boxes", MappingProxyType(boxes))
        object.__setattr__(self, "kept", MappingProxyType(kept))

    def __len__(self) -> int:
        return len(self.boxes)

    def __contains__(self, key: object) -> bool:
        return key in self.boxes

    def keys(self) -> list[ImageKey]:
        """Image keys in ground-truth order."""
        return list(self.boxes)

    def num_faces(self, subset: str, images: Iterable[ImageKey] | None = None) -> int:
        """Number of kept (non-ignored) faces of ``subset`` over ``images`` (default: all images)."""
        keys = self.boxes if images is None else images
        return int(sum(len(self.kept[subset][k]) for k in keys))


def _check_key(key: Any) -> ImageKey:
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(p, str) and p for p in key)):
        raise WiderFaceError(f"image keys must be (event, stem) tuples of non-empty strings, got {key!r}")
    return key


def load_ground_truth(gt_dir: str | os.PathLike[str]) -> GroundTruth:
    """Load WIDER FACE validation ground truth from ``gt_dir``.

    The folder must hold ``wider_face_val.mat`` (``face_bbx_list``, ``event_list``, ``file_list``) and
    ``wider_easy_val.mat``, ``wider_medium_val.mat``, ``wider_hard_val.mat`` (``gt_list``: 1-based kept indices).
    """
    # scipy is only needed here (the `eval` extra): a device install without it runs everything else
    loadmat = require("scipy.io", "eval", "Reading the WIDER FACE ground truth (.mat files)").loadmat

    gt_dir = Path(gt_dir)
    required = ", ".join(_GT_FILES.values())
    if not gt_dir.is_dir():
        raise WiderFaceError(f"WIDER FACE ground-truth folder {gt_dir} does not exist; it must contain {required}")
    # Check every file before loading any, so one error names all that are missing.
    missing = [f for f in _GT_FILES.values() if not (gt_dir / f).is_file()]
    if missing:
        raise WiderFaceError(
            f"missing {', '.join(missing)} in WIDER FACE ground-truth folder {gt_dir}; it must contain {required} "
            "(the ground_truth folder of the official WIDER FACE evaluation code)"
        )
    mats: dict[str, dict[str, Any]] = {}
    for name, fname in _GT_FILES.items():
        path = gt_dir / fname
        try:
            mats[name] = loadmat(str(path))
        except Exception as exc:  # scipy raises several types for corrupt files
            raise WiderFaceError(f"cannot read {path}: {exc}") from exc
        wanted = ("face_bbx_list", "event_list", "file_list") if name == "all" else ("gt_list",)
        for k in wanted:
            if k not in mats[name]:
                raise WiderFaceError(f"{path} has no variable {k!r}; is it a WIDER FACE ground-truth file?")

    # Same cell layout the original reads: event_list[i][0][0], file_list[i][0][j][0][0],
    # face_bbx_list[i][0][j][0] and gt_list[i][0][j][0] (1-based indices, stored as uint8/uint16).
    main = mats["all"]
    boxes: dict[ImageKey, np.ndarray] = {}
    kept: dict[str, dict[ImageKey, np.ndarray]] = {s: {} for s in SUBSETS}
    try:
        n_events = len(main["event_list"])
        for subset in SUBSETS:
            if len(mats[subset]["gt_list"]) != n_events:
                raise WiderFaceError(
                    f"{_GT_FILES[subset]} lists {len(mats[subset]['gt_list'])} events, "
                    f"{_GT_FILES['all']} lists {n_events}"
                )
        for i in range(n_events):
            event = str(main["event_list"][i][0][0])
            img_list = main["file_list"][i][0]
            box_list = main["face_bbx_list"][i][0]
            keys = [(event, str(img_list[j][0][0])) for j in range(len(img_list))]
            for j, key in enumerate(keys):
                boxes[key] = np.asarray(box_list[j][0], dtype=np.float64).reshape(-1, 4)
            for subset in SUBSETS:
                sub = mats[subset]["gt_list"][i][0]
                if len(sub) != len(keys):
                    raise WiderFaceError(
                        f"{_GT_FILES[subset]}: event {event} has {len(sub)} images, {_GT_FILES['all']} {len(keys)}"
                    )
                if "file_list" in mats[subset]:  # the subset files repeat the image list: must agree
                    sub_files = mats[subset]["file_list"][i][0]
                    if [str(sub_files[j][0][0]) for j in range(len(sub_files))] != [k[1] for k in keys]:
                        raise WiderFaceError(
                            f"{_GT_FILES[subset]} and {_GT_FILES['all']} list different images for event {event}"
                        )
                for j, key in enumerate(keys):
                    # Widen before subtracting: uint8 - 1 would wrap for a (bogus) index 0.
                    kept[subset][key] = np.asarray(sub[j][0]).astype(np.int64).reshape(-1) - 1
    except (IndexError, TypeError, ValueError) as exc:
        raise WiderFaceError(f"unexpected layout of the WIDER FACE .mat files in {gt_dir}: {exc}") from exc
    return GroundTruth(boxes=boxes, kept=kept)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: array fields make field-wise == ambiguous
class WiderResult:
    """Result of :func:`evaluate`: AP and (precision, recall) curve per subset, image and face counts."""

    ap: dict[str, float]
    pr_curves: dict[str, np.ndarray] = field(repr=False)  # per subset (num_thresholds, 2): precision, recall
    num_images: int
    num_faces: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (AP, image and face counts; not the curves)."""
        return {
            "ap": {k: float(v) for k, v in self.ap.items()},
            "num_images": int(self.num_images),
            "num_faces": {k: int(v) for k, v in self.num_faces.items()},
        }


def _as_dets(key: ImageKey, dets: Any) -> np.ndarray:
    arr = np.asarray(dets, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 5))
    if arr.ndim != 2 or arr.shape[1] != 5:
        raise WiderFaceError(f"predictions for {key} must be an (N, 5) array of x, y, w, h, score; got {arr.shape}")
    if not np.isfinite(arr).all():
        raise WiderFaceError(f"predictions for {key} contain non-finite values")
    return arr


def _iou_matrix(pred_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> np.ndarray:
    """Pixel-inclusive IoU (P, G), same arithmetic as the original Cython ``bbox_overlaps``."""
    area_p = (pred_xyxy[:, 2] - pred_xyxy[:, 0] + 1) * (pred_xyxy[:, 3] - pred_xyxy[:, 1] + 1)
    area_g = (gt_xyxy[:, 2] - gt_xyxy[:, 0] + 1) * (gt_xyxy[:, 3] - gt_xyxy[:, 1] + 1)
    p, g = pred_xyxy[:, None, :], gt_xyxy[None, :, :]
    iw = np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]) + 1
    ih = np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]) + 1
    valid = (iw > 0) & (ih > 0)  # the original leaves 0 unless both overlaps are positive
    inter = iw * ih
    union = (area_p[:, None] + area_g[None, :]) - inter
    out = np.zeros(inter.shape)
    np.divide(inter, union, out=out, where=valid)
    return out


def _xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    out = b[:, :4].copy()
    out[:, 2] += out[:, 0]  # WIDER convention: x2 = x + w (then +1 in the IoU, as the original does)
    out[:, 3] += out[:, 1]
    return out


def _image_pr(
    best_gt: np.ndarray,
    matched: np.ndarray,
    kept_mask: np.ndarray,
    sorted_scores_neg: np.ndarray,
    thresholds_neg: np.ndarray,
) -> np.ndarray:
    """Per-threshold (num proposals, num true positives) of one image, shape (T, 2).

    Equivalent to the original's sequential loop: each prediction's best gt does not depend on earlier matches, so
    a match on an ignored gt removes that prediction from the proposals, and the recall count after prediction h is
    the number of distinct kept gts that were the (>= threshold) best match of predictions 0..h.
    """
    n = len(best_gt)
    hit_kept = matched & kept_mask[best_gt]
    proposal = ~(matched & ~kept_mask[best_gt])
    new_hit = np.zeros(n, dtype=np.int64)
    pos = np.flatnonzero(hit_kept)
    if pos.size:
        _, first = np.unique(best_gt[pos], return_index=True)  # first prediction to hit each kept gt
        new_hit[pos[first]] = 1
    pred_recall = np.cumsum(new_hit)
    cum_props = np.cumsum(proposal, dtype=np.int64)
    # Scores are sorted descending, so "last index with score >= thresh" is (count of such scores) - 1.
    count = np.searchsorted(sorted_scores_neg, thresholds_neg, side="right")
    r = count - 1
    has = count > 0
    info = np.zeros((len(thresholds_neg), 2), dtype=np.int64)
    info[has, 0] = cum_props[r[has]]
    info[has, 1] = pred_recall[r[has]]
    return info


def _voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, monotone from the right
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate(
    predictions: Mapping[ImageKey, np.ndarray],
    gt: GroundTruth,
    *,
    images: Iterable[ImageKey] | None = None,
    iou_threshold: float = 0.5,
    num_thresholds: int = 1000,
) -> WiderResult:
    """Score ``predictions`` (``(event, stem) -> (N, 5) x, y, w, h, score``) with the official WIDER protocol.

    ``images=None`` evaluates exactly the images that have an entry in ``predictions``; otherwise the given images,
    where a missing entry counts as no detections. Only the evaluated images' faces are counted and only their
    predictions take part in score normalisation. Unknown images raise :class:`WiderFaceError`.
    """
    if num_thresholds < 1:
        raise WiderFaceError(f"num_thresholds must be >= 1, got {num_thresholds}")
    keys = list(dict.fromkeys(predictions if images is None else images))  # dedupe, keep order
    if not keys:
        raise WiderFaceError("no images to evaluate (empty predictions and no images given)")
    unknown = [k for k in keys if k not in gt]
    if unknown:
        raise WiderFaceError(
            f"{len(unknown)} evaluated image(s) are not in the ground truth, e.g. {unknown[:3]}; "
            "keys must be (event folder, image stem) such as ('0--Parade', '0_Parade_marchingband_1_20')"
        )
    dets = {k: _as_dets(k, predictions.get(k, ())) for k in keys}

    # Min-max score normalisation over this run's predictions (the original's norm_score).
    all_scores = [d[:, 4] for d in dets.values() if len(d)]
    if all_scores:
        lo = min(float(s.min()) for s in all_scores)
        hi = max(float(s.max()) for s in all_scores)
    else:
        lo = hi = 0.0
    diff = hi - lo

    thresholds = 1 - (np.arange(num_thresholds) + 1) / num_thresholds
    thresholds_neg = -thresholds
    pr_sum = {s: np.zeros((num_thresholds, 2), dtype=np.int64) for s in SUBSETS}
    num_faces = {s: gt.num_faces(s, keys) for s in SUBSETS}

    for key in keys:
        d, gt_boxes = dets[key], gt.boxes[key]
        if len(d) == 0 or len(gt_boxes) == 0:
            continue  # the original skips these images for the curve; their faces are still counted above
        order = np.argsort(-d[:, 4], kind="stable")
        d = d[order]
        # diff == 0 (one distinct score): the original divides by zero; treat every detection as top-scored.
        norm = (d[:, 4] - lo) / diff if diff > 0 else np.ones(len(d))
        overlaps = _iou_matrix(_xywh_to_xyxy(d), _xywh_to_xyxy(gt_boxes))
        best_gt = overlaps.argmax(axis=1)  # first max on ties, as the original
        matched = overlaps[np.arange(len(d)), best_gt] >= iou_threshold
        for subset in SUBSETS:
            kept_mask = np.zeros(len(gt_boxes), dtype=bool)
            kept_mask[gt.kept[subset][key]] = True
            pr_sum[subset] += _image_pr(best_gt, matched, kept_mask, -norm, thresholds_neg)

    ap: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    for subset in SUBSETS:
        props, tp = pr_sum[subset][:, 0].astype(np.float64), pr_sum[subset][:, 1].astype(np.float64)
        precision = np.divide(tp, props, out=np.zeros_like(tp), where=props > 0)
        faces = num_faces[subset]
        recall = tp / faces if faces > 0 else np.zeros_like(tp)
        curve = np.stack([precision, recall], axis=1)
        curve.setflags(write=False)
        curves[subset] = curve
        ap[subset] = _voc_ap(recall, precision)
    return WiderResult(ap=ap, pr_curves=curves, num_images=len(keys), num_faces=num_faces)


# --------------------------------------------------------------------------------------------------------------
# WIDER prediction txt format
# --------------------------------------------------------------------------------------------------------------


def image_key(path: str | os.PathLike[str]) -> ImageKey:
    """``(event, stem)`` of an image path like ``.../images/0--Parade/0_Parade_marchingband_1_20.jpg``."""
    p = Path(path)
    event, stem = p.parent.name, p.stem
    if not _EVENT_RE.match(event) or not stem:
        raise WiderFaceError(
            f"cannot derive (event, stem) from {str(path)!r}: expected .../<N--Event>/<stem>.jpg, e.g. "
            ".../images/0--Parade/0_Parade_marchingband_1_20.jpg"
        )
    return event, stem


def _stem_from_header(line: str) -> str:
    name = line.strip().replace("\\", "/").rsplit("/", 1)[-1]  # tolerate a path in the first line
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        if name.endswith(ext):
            return name[: -len(ext)]  # suffix removal, not the original's rstrip('.jpg') character stripping
    return name


def _read_pred_file(path: Path) -> tuple[str, np.ndarray]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # blank trailing lines
    if not lines:
        return path.stem, np.zeros((0, 5))  # a zero-byte file: no detections, name from the file name
    stem = _stem_from_header(lines[0]) or path.stem
    if len(lines) < 2:
        raise WiderFaceError(f"{path}: missing the box-count line after the image name")
    try:
        count = int(float(lines[1].strip()))
    except ValueError:
        raise WiderFaceError(f"{path}: line 2 must be the number of boxes, got {lines[1]!r}") from None
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(rows) != count:
        # Catches truncated/partially written files instead of silently scoring them.
        raise WiderFaceError(f"{path}: header says {count} boxes but {len(rows)} box lines follow")
    if not rows:
        return stem, np.zeros((0, 5))
    bad = [i for i, r in enumerate(rows) if len(r) != 5]
    if bad:
        raise WiderFaceError(f"{path}: box line {bad[0] + 3} must have 5 values 'x y w h score'")
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise WiderFaceError(f"{path}: non-numeric box value ({exc})") from None
    return stem, arr


def read_predictions(pred_dir: str | os.PathLike[str]) -> dict[ImageKey, np.ndarray]:
    """Read a WIDER prediction folder ``pred_dir/<event>/<stem>.txt`` into ``{(event, stem): (N, 5) float64}``.

    The key's stem is the image name on line 1 of each file (as the original evaluator does).
    """
    root = Path(pred_dir)
    if not root.is_dir():
        raise WiderFaceError(f"prediction folder {root} does not exist")
    out: dict[ImageKey, np.ndarray] = {}
    for event_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(event_dir.glob("*.txt")):
            stem, arr = _read_pred_file(f)
            key = (event_dir.name, stem)
            if key in out:
                raise WiderFaceError(f"{f}: image {stem} of {event_dir.name} appears in more than one file")
            out[key] = arr
    return out


def _fmt(v: float) -> str:
    # repr gives the shortest string that parses back to the same float: exact round trip.
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


def write_predictions(
    pred_dir: str | os.PathLike[str], event: str, stem: str, dets: np.ndarray
) -> Path:
    """Write one image's detections (``(N, 5)`` x, y, w, h, score) to ``pred_dir/<event>/<stem>.txt`` atomically.

    Returns the written path. Values are written at full float precision.
    """
    for what, name in (("event", event), ("stem", stem)):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise WiderFaceError(f"invalid {what} name {name!r} for a WIDER prediction file")
    key = (event, stem)
    arr = _as_dets(key, dets)
    lines = [stem, str(len(arr))]
    lines += [" ".join(_fmt(v) for v in row) for row in arr.tolist()]
    text = "\n".join(lines) + "\n"
    return atomic_write(Path(pred_dir) / event / f"{stem}.txt",
                        lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))
