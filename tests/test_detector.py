"""The Detector API on real photographs, and bad input."""

import cv2
import numpy as np
import pytest

from edgeface import LANDMARK_NAMES, Detector, EdgefaceError, Face
from edgeface.core.images import load_image


@pytest.fixture(scope="module")
def astronaut(astronaut_path):
    return cv2.imread(str(astronaut_path))


def _one_face(faces):
    assert len(faces) == 1, faces
    return faces[0]


def test_astronaut_face_and_landmark_order(default_detector, astronaut_path):
    face = _one_face(default_detector.detect(astronaut_path))
    assert isinstance(face, Face) and face.score > 0.99
    x1, y1, x2, y2 = face.box
    assert 150 < x1 < 200 and 30 < y1 < 80 and 250 < x2 < 300 and 150 < y2 < 200  # her face, 512x512 photo
    points = dict(zip(LANDMARK_NAMES, face.landmarks))
    assert points["left_eye"][0] < points["nose"][0] < points["right_eye"][0]  # "left" as seen in the image
    assert points["mouth_left"][0] < points["mouth_right"][0]
    assert max(points["left_eye"][1], points["right_eye"][1]) < points["nose"][1] < points["mouth_left"][1]
    assert all(x1 < x < x2 and y1 < y < y2 for x, y in face.landmarks)
    assert set(face.to_dict()["landmarks"]) == set(LANDMARK_NAMES)


def test_array_path_and_batch_agree(default_detector, astronaut, astronaut_path):
    from_path = _one_face(default_detector.detect(astronaut_path))
    from_array = _one_face(default_detector.detect(astronaut))
    small = cv2.resize(astronaut, (300, 200))
    batch = default_detector.detect([astronaut, small])
    assert from_path == from_array
    assert len(batch) == 2 and _one_face(batch[0]).box == pytest.approx(from_array.box, abs=0.5)
    assert _one_face(batch[1]).box[2] < 300  # found in the smaller image, mapped to its own pixels


@pytest.mark.parametrize("policy", ["longest:320", "fixed:640x640", "fixed:256x320"])
def test_resize_policies_map_back_to_original_pixels(policy, default_detector, astronaut):
    reference = _one_face(default_detector.detect(astronaut))
    detector = Detector(resize=policy)
    face = _one_face(detector.detect(astronaut))
    assert face.box == pytest.approx(reference.box, abs=6)


def test_grayscale_and_rgba_inputs_are_converted(default_detector, astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    assert _one_face(default_detector.detect(gray)).score > 0.9
    assert _one_face(default_detector.detect(gray[..., None])).score > 0.9
    bgra = cv2.cvtColor(astronaut, cv2.COLOR_BGR2BGRA)
    assert _one_face(default_detector.detect(bgra)).box == _one_face(default_detector.detect(astronaut)).box


def test_image_without_faces(default_detector):
    assert default_detector.detect(np.full((120, 160, 3), 90, np.uint8)) == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 0, 3), np.uint8), "is empty"),
        (np.zeros((64, 64, 3), np.float32), "dtype float32"),
        (np.zeros((64, 64, 2), np.uint8), "expected H x W x 3"),
        (np.zeros((2, 64, 64, 3), np.uint8), "expected H x W x 3"),
    ],
)
def test_bad_arrays_give_clear_errors(bad, message):
    with pytest.raises(EdgefaceError, match=message):
        load_image(bad)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(EdgefaceError, match="image not found"):
        load_image(tmp_path / "missing.jpg")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"this is not a JPEG")
    with pytest.raises(EdgefaceError, match="could not be decoded as an image"):
        load_image(fake)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(EdgefaceError, match="could not be decoded"):
        load_image(empty)
