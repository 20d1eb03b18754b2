"""RetinaFace's multi-task loss: softmax classification with online hard-negative mining, smooth-L1 box and landmark
regression (paper, arXiv 1905.00641, eq. 1; the weights and the 7:1 negative ratio of the reference
implementation, biubug6/Pytorch_Retinaface ``layers/modules/multibox_loss.py`` and ``data/config.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeface.training.targets import PriorTargets


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms: total = box x ``box`` + classification + landmarks x ``landmarks``."""

    box: float = 2.0  # the reference's loc_weight
    landmarks: float = 1.0
    negatives_per_positive: int = 7  # hard negatives kept per face prior (SSD's 3:1 would be 3)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def hard_negatives(logits: Tensor, labels: Tensor, ratio: int) -> Tensor:
    """(N, A) bool: per image, the ``ratio`` x (number of face priors) background priors with the highest
    classification loss (at most A - 1); an image with no face prior keeps none. ``logits`` (N, A, 2), ``labels``
    (N, A) in {0, 1}."""
    with torch.no_grad():
        loss = torch.logsumexp(logits, dim=-1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        positive = labels > 0
        loss = loss.masked_fill(positive, 0.0)
        rank = loss.argsort(dim=1, descending=True).argsort(dim=1)
        count = (ratio * positive.sum(dim=1, keepdim=True)).clamp(max=labels.shape[1] - 1)
        return (rank < count) & ~positive


def multibox_loss(
    loc: Tensor,
    logits: Tensor,
    landmarks: Tensor,
    targets: list[PriorTargets],
    weights: LossWeights = LossWeights(),
) -> dict[str, Tensor]:
    """The loss of a batch: ``loc`` (N, A, 4), ``logits`` (N, A, 2) before the softmax, ``landmarks`` (N, A, 10)
    (what :meth:`~edgeface.models.retinaface.RetinaFace.forward_logits` returns) against one
    :class:`~edgeface.training.targets.PriorTargets` per image.

    Returns the scalar terms ``box``, ``classification``, ``landmarks`` and their weighted sum ``total``. Box and
    classification sums are divided by the number of face priors in the batch, landmarks by the number of face
    priors that have landmark labels (each at least 1), as in the reference.
    """
    labels = torch.stack([t.labels for t in targets])
    loc_targets = torch.stack([t.loc for t in targets])
    landmark_targets = torch.stack([t.landmarks for t in targets])
    landmark_mask = torch.stack([t.landmark_mask for t in targets])
    positive = labels > 0
    num_positive = positive.sum().clamp(min=1)
    box = F.smooth_l1_loss(loc[positive], loc_targets[positive], reduction="sum") / num_positive
    points = F.smooth_l1_loss(landmarks[landmark_mask], landmark_targets[landmark_mask], reduction="sum")
    points = points / landmark_mask.sum().clamp(min=1)
    chosen = positive | hard_negatives(logits, labels, weights.negatives_per_positive)
    classification = F.cross_entropy(logits[chosen], labels[chosen], reduction="sum") / num_positive
    total = weights.box * box + classification + weights.landmarks * points
    return {"total": total, "box": box, "classification": classification, "landmarks": points}


def distillation_loss(loc: Tensor, logits: Tensor, landmarks: Tensor,
                      teacher: tuple[Tensor, Tensor, Tensor], *, beta: float = 0.1) -> Tensor:
    """Knowledge distillation from a teacher's outputs (loc (N, A, 4), conf (N, A, 2) softmax, landmarks
    (N, A, 10)) as soft targets, for quantisation-aware training (Hinton et al. 2015): KL divergence of the class
    scores, plus smooth-L1 (``beta``, in offset units) of the box and half the landmark offsets, each prior weighted
    by the teacher's face probability, all divided by the sum of those weights (+1)."""
    teacher_loc, teacher_conf, teacher_landmarks = teacher
    weight = teacher_conf[..., 1]
    norm = weight.sum() + 1.0
    kl = (teacher_conf * (teacher_conf.clamp(min=1e-8).log() - F.log_softmax(logits, dim=-1))).sum(-1).sum()
    box = (weight * F.smooth_l1_loss(loc, teacher_loc, reduction="none", beta=beta).sum(-1)).sum()
    points = (weight * F.smooth_l1_loss(landmarks, teacher_landmarks, reduction="none", beta=beta).sum(-1)).sum()
    return (kl + box + 0.5 * points) / norm
