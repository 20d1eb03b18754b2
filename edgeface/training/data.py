"""Training annotations: WIDER FACE's official box files and the RetinaFace ``label.txt`` layout with 5 landmarks.

- WIDER FACE (``wider_face_train_bbx_gt.txt``): an image path (``<event>/<name>.jpg``), the number of faces, then
  one line per face ``x y w h blur expression illumination invalid occlusion pose`` (an image with no face has one
  line of zeros). Faces flagged invalid, and boxes without area, are left out. No landmarks.
- RetinaFace (``label.txt`` of the RetinaFace authors' ``retinaface_gt``, as the reference implementation reads it):
  ``# <path>`` lines, each followed by one line per face ``x y w h`` and 5 x ``(x, y, flag)`` landmark values
  (left eye, right eye, nose, left and right mouth corners; a face without landmarks has -1 there), optionally a
  trailing blur/score value. A file with only ``x y w h`` per face is also accepted (no landmarks).

Paths are relative to the images folder. Boxes become corners (x1, y1, x2, y2) = (x, y, x + w, y + h), in pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeface.core.errors import EdgefaceError


@dataclass(frozen=True)
class FaceAnnotations:
    """The labelled faces of one image (pixels)."""

    path: Path
    boxes: np.ndarray  # (F, 4) float32 x1, y1, x2, y2
    landmarks: np.ndarray  # (F, 5, 2) float32 (zeros where absent)
    has_landmarks: np.ndarray  # (F,) bool

    @property
    def key(self) -> tuple[str, str]:
        """(event folder, image stem), as WIDER FACE ground truth names an image."""
        return self.path.parent.name, self.path.stem


class AnnotationError(EdgefaceError):
    pass


def _faces(path: Path, boxes: list, landmarks: list, has: list) -> FaceAnnotations:
    return FaceAnnotations(
        path,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(landmarks, np.float32).reshape(-1, 5, 2),
        np.asarray(has, bool).reshape(-1),
    )


def _numbers(line: str, where: str) -> list[float]:
    try:
        return [float(v) for v in line.split()]
    except ValueError:
        raise AnnotationError(f"{where}: expected numbers, got {line.strip()[:80]!r}") from None


def read_wider(annotation_file: Path, images_dir: Path) -> list[FaceAnnotations]:
    """Faces of every image of a WIDER FACE ``*_bbx_gt.txt`` file (see the module docstring)."""
    lines = annotation_file.read_text(errors="replace").splitlines()
    out, i = [], 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        where = f"{annotation_file}:{i + 1}"
        if i + 1 >= len(lines) or not lines[i + 1].strip().isdigit():
            raise AnnotationError(f"{where}: expected an image path followed by its number of faces "
                                  "(the WIDER FACE wider_face_*_bbx_gt.txt layout)")
        count = int(lines[i + 1])
        rows = lines[i + 2:i + 2 + max(count, 1)]
        if len(rows) < max(count, 1):
            raise AnnotationError(f"{where}: {name} declares {count} faces but the file ends first")
        boxes = []
        for k, row in enumerate(rows[:count]):
            values = _numbers(row, f"{annotation_file}:{i + 3 + k}")
            if len(values) < 4:
                raise AnnotationError(f"{annotation_file}:{i + 3 + k}: a face needs x y w h, got {row.strip()!r}")
            x, y, w, h = values[:4]
            invalid = len(values) > 7 and values[7] == 1
            if w > 0 and h > 0 and not invalid:
                boxes.append((x, y, x + w, y + h))
        out.append(_faces(images_dir / name, boxes, np.zeros((len(boxes), 10)), [False] * len(boxes)))
        i += 2 + max(count, 1)
    return out


def read_retinaface(annotation_file: Path, images_dir: Path) -> list[FaceAnnotations]:
    """Faces of every image of a RetinaFace ``label.txt`` file (see the module docstring)."""
    out: list[FaceAnnotations] = []
    current: tuple[Path, list, list, list] | None = None
    for number, line in enumerate(annotation_file.read_text(errors="replace").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            if current:
                out.append(_faces(*current))
            current = (images_dir / text[1:].strip(), [], [], [])
            continue
        where = f"{annotation_file}:{number}"
        if current is None:
            raise AnnotationError(f"{where}: a face line before any '# <image path>' line (the RetinaFace "
                                  "label.txt layout)")
        values = _numbers(text, where)
        if len(values) not in (4, 5) and len(values) < 19:
            raise AnnotationError(f"{where}: expected x y w h, then 5 x (x, y, flag) landmark values; got "
                                  f"{len(values)} numbers")
        x, y, w, h = values[:4]
        if w <= 0 or h <= 0:
            continue
        points = np.asarray(values[4:19] if len(values) >= 19 else [-1.0] * 15, np.float32).reshape(5, 3)[:, :2]
        labelled = bool((points >= 0).all())
        current[1].append((x, y, x + w, y + h))
        current[2].append(points if labelled else np.zeros((5, 2)))
        current[3].append(labelled)
    if current:
        out.append(_faces(*current))
    return out


def read_annotations(annotation_file: str | os.PathLike, images_dir: str | os.PathLike) -> list[FaceAnnotations]:
    """The labelled images of ``annotation_file`` (WIDER FACE or RetinaFace layout, told apart by the first line)
    whose image files exist under ``images_dir``; at least one must.

    Raises :class:`AnnotationError` (one line, with file and line number) for a malformed file, or when none of its
    images is found.
    """
    annotation_file, images_dir = Path(annotation_file), Path(images_dir)
    if not annotation_file.is_file():
        raise AnnotationError(f"annotation file not found: {annotation_file}")
    if not images_dir.is_dir():
        raise AnnotationError(f"images folder not found: {images_dir}")
    with open(annotation_file, errors="replace") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    reader = read_retinaface if first.startswith("#") else read_wider
    everything = reader(annotation_file, images_dir)
    found = [a for a in everything if a.path.is_file()]
    if not found:
        example = everything[0].path if everything else "none listed"
        raise AnnotationError(f"none of the {len(everything)} images of {annotation_file} is under {images_dir} "
                              f"(e.g. {example}); give the folder the annotation paths are relative to")
    return found
