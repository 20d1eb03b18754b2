"""Agreement of two runtimes on real images: raw-output difference, detection agreement and landmark error.
Used by every export (fidelity is part of export) and by ``edgeface compare``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgeface.processing import Detections, postprocess, preprocess

# Share of reference faces a candidate must find at IoU >= 0.9, and the largest mean landmark error (pixels /
# sqrt(reference box area)) it may have, by precision. Set from measurements of every target (README).
TOLERANCES = {
    "fp32": {"agreement": 0.99, "landmark_error": 0.005},
    "fp16": {"agreement": 0.97, "landmark_error": 0.01},
    "int8": {"agreement": 0.75, "landmark_error": 0.04},
}
MATCH_IOU = 0.9
SCORE_THRESHOLD = 0.5
LOOSE_THRESHOLD = 0.3


@dataclass
class ParityReport:
    images: int
    reference_faces: int
    matched_faces: int
    detection_agreement: float  # matched / reference faces (1.0 when neither finds a face)
    extra_faces: int  # candidate faces (score >= 0.5) matching no reference face (score >= 0.3)
    landmark_error: float  # mean over matched faces of mean point distance / sqrt(reference box w * h)
    max_abs_diff: dict[str, float]  # per raw output, on the same input
    tolerance: dict[str, float] | None = None
    passed: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, precision: str) -> "ParityReport":
        self.tolerance = TOLERANCES[precision]
        self.passed = (self.detection_agreement >= self.tolerance["agreement"]
                       and self.landmark_error <= self.tolerance["landmark_error"])
        return self

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        return (f"{self.matched_faces}/{self.reference_faces} faces matched at IoU>={MATCH_IOU} "
                f"({self.detection_agreement:.1%}), landmark error {self.landmark_error:.4f}, "
                f"{self.extra_faces} extra; max |diff| {diffs}; {self.images} images")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_faces(reference: Detections, candidate: Detections, iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, best IoU first; pairs (reference index, candidate index)."""
    if not len(reference) or not len(candidate):
        return []
    overlaps = _iou(reference.boxes, candidate.boxes)
    pairs, used_r, used_c = [], set(), set()
    for flat in np.argsort(-overlaps, axis=None):
        r, c = divmod(int(flat), overlaps.shape[1])
        if overlaps[r, c] < iou:
            break
        if r not in used_r and c not in used_c:
            pairs.append((r, c))
            used_r.add(r)
            used_c.add(c)
    return pairs


class _Tally:
    """Accumulates matches and landmark errors over images."""

    def __init__(self) -> None:
        self.images = self.total = self.matched = self.extra = 0
        self.errors: list[float] = []

    def add(self, ref_all: Detections, cand_all: Detections) -> None:
        """Both at the loose threshold: a reference face (>= 0.5) is found by any candidate face >= 0.3, so a
        score moving across 0.5 by a hair is not a disagreement; extra faces are counted the other way."""
        ref, cand = _above(ref_all, SCORE_THRESHOLD), _above(cand_all, SCORE_THRESHOLD)
        pairs = match_faces(ref, cand_all)
        self.images += 1
        self.total += len(ref)
        self.matched += len(pairs)
        self.extra += len(cand) - len(match_faces(cand, ref_all))
        for r, c in pairs:
            size = np.sqrt(np.prod(ref.boxes[r, 2:] - ref.boxes[r, :2]))
            self.errors.append(float(np.linalg.norm(ref.landmarks[r] - cand_all.landmarks[c], axis=1).mean() / size))

    def report(self, diffs: dict[str, float]) -> ParityReport:
        agreement = self.matched / self.total if self.total else float(self.extra == 0)
        error = float(np.mean(self.errors)) if self.errors else 0.0
        return ParityReport(self.images, self.total, self.matched, agreement, self.extra, error, diffs)


def compare(reference, candidate, images: Sequence[np.ndarray]) -> ParityReport:
    """Compare two :class:`~edgeface.detector.Detector` s image by image, on the candidate's input policy, from
    their raw outputs on the same input."""
    tally, diffs = _Tally(), {}
    for image in images:
        raw, dets = [], []
        for det in (reference, candidate):
            batch, (letterbox,) = preprocess([image], policy=candidate.resize, mean_bgr=det.runtime.mean_bgr,
                                             pad_bgr=det.runtime.pad_bgr, layout=det.runtime.layout)
            out = det.runtime.infer(batch)
            raw.append(out)
            dets.append(postprocess(out["loc"][0], out["conf"][0], out["landmarks"][0], letterbox,
                                    anchors=det.anchors, score_threshold=LOOSE_THRESHOLD))
        for name in raw[0]:
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(raw[0][name] - raw[1][name]).max()))
        tally.add(*dets)
    return tally.report(diffs)


def compare_to_reference(candidate, bundle_dir) -> ParityReport:
    """Compare a detector with the FP32 PyTorch detections stored in a bundle's ``parity/reference.json`` (for
    devices without PyTorch: the check ``edgeface build-engine`` runs after building an engine)."""
    import json
    from pathlib import Path

    from edgeface.face import LANDMARK_NAMES
    from edgeface.images import load_image

    from edgeface.errors import EdgefaceError
    from edgeface.processing import ResizePolicy

    folder = Path(bundle_dir) / "parity"
    tally = _Tally()
    try:
        reference = json.loads((folder / "reference.json").read_text())
        policy = ResizePolicy.parse(reference["resize"])  # the size the reference was computed at
        records = list(reference["images"])
    except (ValueError, KeyError, TypeError, EdgefaceError) as exc:
        raise EdgefaceError(f"{folder / 'reference.json'} is damaged ({exc}); re-export the bundle") from None
    for record in records:
        faces = record["faces"]
        ref = Detections(
            np.array([f["box"] for f in faces], np.float32).reshape(-1, 4),
            np.array([f["score"] for f in faces], np.float32),
            np.array([[f["landmarks"][n] for n in LANDMARK_NAMES] for f in faces], np.float32).reshape(-1, 5, 2))
        image = load_image(folder / record["image"])
        batch, (letterbox,) = preprocess([image], policy=policy, mean_bgr=candidate.runtime.mean_bgr,
                                         pad_bgr=candidate.runtime.pad_bgr, layout=candidate.runtime.layout)
        out = candidate.runtime.infer(batch)
        tally.add(ref, postprocess(out["loc"][0], out["conf"][0], out["landmarks"][0], letterbox,
                                   anchors=candidate.anchors, score_threshold=LOOSE_THRESHOLD))
    return tally.report({})


def _above(dets: Detections, threshold: float) -> Detections:
    keep = dets.scores >= threshold
    return Detections(dets.boxes[keep], dets.scores[keep], dets.landmarks[keep])
