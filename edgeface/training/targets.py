"""Training targets: priors matched to faces by IoU, and box / landmark offsets encoded with the variances.

The inverse of :func:`edgeface.core.processing.decode_boxes` / :func:`~edgeface.core.processing.decode_landmarks`,
following the RetinaFace paper (Deng et al., arXiv 1905.00641, section 4.1, which takes SSD's matching) and the
reference implementation (biubug6/Pytorch_Retinaface ``utils/box_utils.py``): a prior is a face (positive) when
its IoU with a face is at least 0.35, and every face whose best prior reaches IoU 0.2 claims that prior whatever its
IoU; a face whose best prior stays under 0.2 is not matched at all.

All coordinates are normalised to the network input (0..1), boxes are (x1, y1, x2, y2), priors (cx, cy, w, h).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The reference's matching thresholds (``MultiBoxLoss(overlap_thresh=0.35)`` and ``match``'s 0.2).
MATCH_IOU = 0.35
MIN_BEST_IOU = 0.2


def prior_corners(priors: Tensor) -> Tensor:
    """(A, 4) priors (cx, cy, w, h) -> (A, 4) corners (x1, y1, x2, y2)."""
    return torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], dim=1)


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """(F, 4) and (A, 4) corner boxes -> (F, A) intersection over union, continuous areas (no +1: these are
    normalised coordinates, as in the reference's ``jaccard``)."""
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area_a = (boxes_a[:, 2:] - boxes_a[:, :2]).prod(dim=1)
    area_b = (boxes_b[:, 2:] - boxes_b[:, :2]).prod(dim=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def encode_boxes(boxes: Tensor, priors: Tensor, variance: Sequence[float]) -> Tensor:
    """(K, 4) corner boxes matched to (K, 4) priors -> (K, 4) offsets (dcx, dcy, dw, dh): centre offset over
    ``variance[0]`` x prior size, log size ratio over ``variance[1]``. Boxes must have positive width and height."""
    centers = ((boxes[:, :2] + boxes[:, 2:]) / 2 - priors[:, :2]) / (variance[0] * priors[:, 2:])
    sizes = torch.log((boxes[:, 2:] - boxes[:, :2]) / priors[:, 2:]) / variance[1]
    return torch.cat([centers, sizes], dim=1)


def encode_landmarks(landmarks: Tensor, priors: Tensor, variance: Sequence[float]) -> Tensor:
    """(K, 5, 2) points matched to (K, 4) priors -> (K, 10) offsets (x0, y0, x1, ...) over ``variance[0]`` x
    prior size, the order the landmark head predicts."""
    offsets = (landmarks - priors[:, None, :2]) / (variance[0] * priors[:, None, 2:])
    return offsets.reshape(len(landmarks), -1)


@dataclass(frozen=True)
class PriorTargets:
    """What each of A priors should predict for one image."""

    labels: Tensor  # (A,) int64: 1 face, 0 background
    loc: Tensor  # (A, 4) float32 box offsets (meaningful where labels == 1)
    landmarks: Tensor  # (A, 10) float32 landmark offsets (meaningful where landmark_mask)
    landmark_mask: Tensor  # (A,) bool: a face prior whose face has landmark labels


def match_priors(
    boxes: Tensor,
    landmarks: Tensor,
    has_landmarks: Tensor,
    priors: Tensor,
    *,
    variance: Sequence[float],
    iou_threshold: float = MATCH_IOU,
) -> PriorTargets:
    """Targets of ``priors`` (A, 4) for the faces of one image: ``boxes`` (F, 4) corners, ``landmarks`` (F, 5, 2),
    ``has_landmarks`` (F,) bool (a face without landmark labels trains its box and score only). F may be 0
    (every prior is background)."""
    num_priors = len(priors)
    labels = torch.zeros(num_priors, dtype=torch.int64, device=priors.device)
    loc = torch.zeros(num_priors, 4, device=priors.device)
    landmark_targets = torch.zeros(num_priors, 10, device=priors.device)
    mask = torch.zeros(num_priors, dtype=torch.bool, device=priors.device)
    if len(boxes) == 0:
        return PriorTargets(labels, loc, landmark_targets, mask)
    overlaps = box_iou(boxes, prior_corners(priors))  # (F, A)
    best_prior_iou, best_prior = overlaps.max(dim=1)  # each face's best prior
    valid = best_prior_iou >= MIN_BEST_IOU
    if not valid.any():
        return PriorTargets(labels, loc, landmark_targets, mask)
    best_face_iou, best_face = overlaps.max(dim=0)  # each prior's best face
    # Every matchable face claims its best prior, even under the threshold.
    claimed = best_prior[valid]
    best_face_iou[claimed] = 2.0
    # a prior claimed by several faces goes to the last of them (the reference's loop), on any device
    best_face.scatter_reduce_(0, claimed, torch.nonzero(valid).flatten(), "amax", include_self=False)
    positive = best_face_iou >= iou_threshold
    labels[positive] = 1
    matched = best_face[positive]
    loc[positive] = encode_boxes(boxes[matched], priors[positive], variance)
    landmark_targets[positive] = encode_landmarks(landmarks[matched], priors[positive], variance)
    mask[positive] = has_landmarks[matched]
    return PriorTargets(labels, loc, landmark_targets, mask)
