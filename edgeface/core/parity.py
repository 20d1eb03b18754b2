"""Agreement of two runtimes on real images: raw-output difference, detection agreement and landmark error.
Used by every export (fidelity is part of export) and by ``edgeface compare``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeface.core.bundle import _inside
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.face import LANDMARK_NAMES
from edgeface.core.images import load_image
from edgeface.core.processing import Detections, ResizePolicy

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
        """Judge the figures against the tolerances of ``precision`` (sets ``tolerance`` and ``passed``)."""
        self._precision = precision  # for failure(); not a field: the manifest record stays as it was
        self.tolerance = TOLERANCES[precision]
        self.passed = (self.detection_agreement >= self.tolerance["agreement"]
                       and self.landmark_error <= self.tolerance["landmark_error"])
        return self

    def failure(self, what: str, reference: str, then: str) -> EdgefaceError:
        """The one-line error of a failed :meth:`check`: ``what`` does not reproduce ``reference``, with the figures
        and the tolerance, then ``then`` (what was or was not written, what to do)."""
        return EdgefaceError(f"{what} does not reproduce {reference} within the {self._precision} tolerance "
                             f"({self.summary()}; tolerance {self.tolerance}); {then}")

    def record(self, **facts: Any) -> dict[str, Any]:
        """The manifest record of a passed check: status, ``facts`` (which runtime, against what), the figures."""
        return {"status": "passed", **facts, **self.to_dict()}

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        return (f"{self.matched_faces}/{self.reference_faces} faces matched at IoU>={MATCH_IOU} "
                f"({self.detection_agreement:.1%}), landmark error {self.landmark_error:.4f}, "
                f"{self.extra_faces} extra; max |diff| {diffs}; {self.images} images")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes x1, y1, x2, y2 -> (N, M) intersection over union (areas without the +1 of the WIDER
    protocol's pixel-inclusive IoU)."""
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
    overlaps = iou_matrix(reference.boxes, candidate.boxes)
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
    """Compare two :class:`~edgeface.inference.detector.Detector` s image by image, both on the candidate's input
    policy (through :meth:`~edgeface.inference.detector.Detector.infer_arrays`, the one inference path), from
    their raw outputs (max abs difference per output) and their faces at :data:`LOOSE_THRESHOLD`."""
    tally, diffs = _Tally(), {}
    for image in images:
        (ref_raw, ref), (cand_raw, cand) = (
            det.infer_arrays([image], resize=candidate.resize, score_threshold=LOOSE_THRESHOLD)[0]
            for det in (reference, candidate))
        for name in ref_raw.keys() & cand_raw.keys():  # an end-to-end model returns final faces only
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(ref_raw[name] - cand_raw[name]).max()))
        tally.add(ref, cand)
    return tally.report(diffs)


def compare_detections(pairs: Iterable[tuple[Detections, Detections]]) -> ParityReport:
    """The agreement of detections made elsewhere (another machine, another process), image by image: each pair
    is (reference, candidate), both kept down to :data:`LOOSE_THRESHOLD` at least (as :func:`compare` counts them,
    without raw outputs to difference)."""
    tally = _Tally()
    for reference, candidate in pairs:
        tally.add(reference, candidate)
    return tally.report({})


def read_detections(path: str | Path) -> dict[str, Detections]:
    """The JSON lines ``edgeface detect DIR --json`` printed (one ``{image, faces}`` record per image), as detections
    by image file name. Records of failed images (``error``) are left out. Raises EdgefaceError naming the file,
    the line and the field."""
    import json

    found = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        def bad(field: str, problem: str) -> EdgefaceError:
            return EdgefaceError(f"{path}:{number}: field {field} {problem}")

        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EdgefaceError(f"{path}:{number}: not a JSON record ({first_line(exc)})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise bad("image", "is missing: expected the records `edgeface detect DIR --json` prints")
        if "error" not in record:
            found[Path(record["image"]).name] = _reference_faces(record.get("faces"), "faces", bad)
    return found


def compare_to_reference(candidate, bundle_dir) -> ParityReport:
    """Compare a detector with the FP32 PyTorch detections stored in a bundle's ``parity/reference.json`` (for
    devices without PyTorch: the check ``edgeface build-engine`` runs after building an engine).

    The file is checked whole before anything runs: every record's fields and types, and each image path strictly
    inside the bundle. Raises :class:`~edgeface.core.errors.EdgefaceError` in one line naming the file and the
    field."""
    policy, records = read_reference(bundle_dir)
    tally = _Tally()
    for image_path, ref in records:
        _, found = candidate.infer_arrays([load_image(image_path)], resize=policy,
                                          score_threshold=LOOSE_THRESHOLD)[0]
        tally.add(ref, found)
    return tally.report({})


REFERENCE_FILE = "parity/reference.json"
# The reference holds the faces of one photograph (a few KB); anything far larger is not one.
MAX_REFERENCE_BYTES = 16 << 20


def read_reference(bundle_dir) -> tuple[Any, list[tuple[Path, Detections]]]:
    """``parity/reference.json`` of a bundle, validated: (the resize policy it was computed at, [(image file,
    reference detections)]). Each image resolves strictly inside the bundle (no absolute path, ``..`` or symbolic
    link out of it)."""
    import json

    root = Path(bundle_dir)
    where = root / REFERENCE_FILE

    def bad(field: str, problem: str) -> EdgefaceError:
        return EdgefaceError(f"{where}: field {field} {problem}; re-export the bundle")

    try:
        size = where.stat().st_size
        if size > MAX_REFERENCE_BYTES:
            raise EdgefaceError(f"{where} is {size} bytes, not an edgeface parity reference (at most "
                                f"{MAX_REFERENCE_BYTES}); re-export the bundle")
        reference = json.loads(where.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, nested too deeply
        reason = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise EdgefaceError(f"{where} cannot be read as JSON ({reason}); re-export the bundle") from None
    if not isinstance(reference, dict):
        raise bad("(top level)", f"is {_kind(reference)}, expected an object with resize and images")
    if not isinstance(reference.get("resize"), str):
        raise bad("resize", f"is {_kind(reference.get('resize'))}, expected a resize policy such as 'fixed:640x640'")
    try:
        policy = ResizePolicy.parse(reference["resize"])  # the size the reference was computed at
    except EdgefaceError as exc:
        raise bad("resize", f"is not a resize policy ({first_line(exc)})") from None
    images = reference.get("images")
    if not isinstance(images, list) or not images:
        raise bad("images", f"is {_kind(images)}, expected a non-empty list of {{image, faces}} records")
    records = []
    for i, record in enumerate(images):
        field = f"images[{i}]"
        if not isinstance(record, dict):
            raise bad(field, f"is {_kind(record)}, expected an object with image and faces")
        name = record.get("image")
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise bad(f"{field}.image", f"is {_kind(name)}, expected a file name inside parity/")
        # Joined with pathlib: an absolute name replaces parity/ and is refused as outside the bundle, like ../
        image_path = _inside(root, (Path("parity") / name).as_posix(), f"{REFERENCE_FILE} {field}.image")
        records.append((image_path, _reference_faces(record.get("faces"), f"{field}.faces", bad)))
    return policy, records


def _reference_faces(faces: Any, field: str, bad) -> Detections:
    """One record's faces (as :meth:`edgeface.core.face.Face.to_dict` writes them) as Detections."""

    if not isinstance(faces, list):
        raise bad(field, f"is {_kind(faces)}, expected a list of faces")
    boxes, scores, landmarks = [], [], []
    for j, face in enumerate(faces):
        where = f"{field}[{j}]"
        if not isinstance(face, dict):
            raise bad(where, f"is {_kind(face)}, expected an object with box, score and landmarks")
        box = face.get("box")
        if not _numbers(box, 4) or not (box[0] < box[2] and box[1] < box[3]):
            raise bad(f"{where}.box", f"is {_kind(box)}, expected [x1, y1, x2, y2]: 4 numbers within "
                      f"+-{MAX_COORDINATE:g} pixels with x1 < x2 and y1 < y2")
        score = face.get("score")
        if not _numbers([score], 1) or not 0 <= score <= 1:
            raise bad(f"{where}.score", f"is {_kind(score)}, expected a number from 0 to 1")
        points = face.get("landmarks")
        if not isinstance(points, dict):
            raise bad(f"{where}.landmarks", f"is {_kind(points)}, expected an object with "
                      f"{', '.join(LANDMARK_NAMES)}")
        for landmark in LANDMARK_NAMES:
            if not _numbers(points.get(landmark), 2):
                raise bad(f"{where}.landmarks.{landmark}", f"is {_kind(points.get(landmark))}, expected [x, y]: "
                          f"2 numbers within +-{MAX_COORDINATE:g} pixels")
        boxes.append(box)
        scores.append(score)
        landmarks.append([points[n] for n in LANDMARK_NAMES])
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(landmarks, np.float32).reshape(-1, 5, 2))


# Coordinates beyond this many pixels are not a photograph's (and would overflow float32).
MAX_COORDINATE = 1e6


def _numbers(value: Any, n: int) -> bool:
    """``value`` is a list of ``n`` finite numbers (not booleans) within +-MAX_COORDINATE."""
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_COORDINATE
                    for v in value))  # NaN fails the comparison; a huge integer is compared exactly


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message."""
    import json

    if value is None:
        return "missing (or null)"
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _above(dets: Detections, threshold: float) -> Detections:
    keep = dets.scores >= threshold
    return Detections(dets.boxes[keep], dets.scores[keep], dets.landmarks[keep])
