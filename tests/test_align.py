"""Aligned face crops: the 5-point similarity alignment to the ArcFace template, on real faces."""

from __future__ import annotations

import numpy as np
import pytest

from edgeface.core.align import ARCFACE_TEMPLATE, align_face, similarity_to_template, template_for
from edgeface.core.errors import EdgefaceError
from edgeface.core.face import Face
from edgeface.core.images import list_images, load_image

# Large, confident faces: where a recogniser's crop comes from.
MIN_WIDTH, MIN_SCORE = 80, 0.9
# Stated errors, in pixels of the 112 x 112 crop. Measured on these faces: a median 3.5 px misfit of the five points
# to the template (faces are not all frontal); 4.6 px when the detector is run again on the crop (its own landmark
# error on top).
FIT_MEDIAN_PX, REDETECTED_MEDIAN_PX = 4.5, 6.0
# How far (crop pixels) the flipped crop of a mirrored image samples from where the image's crop does.
MIRROR_SHIFT_MEDIAN_PX = 5.0


@pytest.fixture(scope="module")
def faces(default_detector, wider_images, astronaut_path):
    """(image, face) pairs: large, confident faces in the bundled photo and in WIDER val images from every 40th."""
    paths = [astronaut_path, *list_images(wider_images)[::40][:20]]
    found = []
    for path in paths:
        image = load_image(path)
        found += [(image, f) for f in default_detector.detect(image) if f.score >= MIN_SCORE and f.width >= MIN_WIDTH]
    assert len(found) >= 8, len(found)
    return found


def _mapped(face: Face, size=112) -> np.ndarray:
    matrix = similarity_to_template(np.asarray(face.landmarks), template_for(size))
    return np.c_[np.asarray(face.landmarks), np.ones(5)] @ matrix.T


def test_aligned_landmarks_land_on_the_template(faces, default_detector):
    fits, redetected = [], []
    for image, face in faces:
        crop = face.align(image)
        assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
        fits.append(np.linalg.norm(_mapped(face) - ARCFACE_TEMPLATE, axis=1).mean())
        # the detector, run again on the crop (centred in a black canvas: faces filling the frame are not what
        # it was trained on), finds the face with its landmarks on the template
        canvas = np.zeros((224, 224, 3), np.uint8)
        canvas[56:168, 56:168] = crop
        again = [f for f in default_detector.detect(canvas) if f.score >= 0.5]
        assert again, "no face found in an aligned crop"
        best = max(again, key=lambda f: f.score)
        redetected.append(np.linalg.norm(np.asarray(best.landmarks) - 56 - ARCFACE_TEMPLATE, axis=1).mean())
    assert np.median(fits) < FIT_MEDIAN_PX, fits
    assert np.median(redetected) < REDETECTED_MEDIAN_PX, redetected


def _iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)


def _source_points(matrix: np.ndarray, crop_points: np.ndarray) -> np.ndarray:
    """Where the crop's pixels ``crop_points`` (N x 2) come from in the image."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    return np.c_[crop_points, np.ones(len(crop_points))] @ inverse.T


def test_a_mirrored_image_gives_the_mirrored_crop(faces, default_detector):
    shifts, mirrored_differences, plain_differences = [], [], []
    for image, face in faces:
        mirrored = np.ascontiguousarray(image[:, ::-1])
        width = image.shape[1]
        # the same face, found in the mirrored image (its box mirrored back)
        twin = max(default_detector.detect(mirrored),
                   key=lambda f: _iou((width - f.box[2], f.box[1], width - f.box[0], f.box[3]), face.box))
        # geometry, up to the detector's landmark noise between the two images (crop pixels)
        shifts.append(_mirror_shift(similarity_to_template(np.asarray(face.landmarks), ARCFACE_TEMPLATE),
                                    similarity_to_template(np.asarray(twin.landmarks), ARCFACE_TEMPLATE), width))
        # pixels
        crop, crop_of_mirror = face.align(image).astype(np.int16), twin.align(mirrored).astype(np.int16)
        mirrored_differences.append(np.abs(crop_of_mirror[:, ::-1] - crop).mean())
        plain_differences.append(np.abs(crop_of_mirror - crop).mean())  # a face is not symmetric
    # measured: a median 3.7 px, from the default detector placing the landmarks of the two images differently
    assert np.median(shifts) < MIRROR_SHIFT_MEDIAN_PX, shifts
    assert np.median(plain_differences) > 1.5 * np.median(mirrored_differences), (plain_differences,
                                                                                 mirrored_differences)


def _mirror_shift(matrix, twin_matrix, width: int) -> float:
    """Mean distance, in crop pixels, between where the crop's pixels come from in the image and where the
    flipped crop of the mirrored image takes them from (0 for a perfectly mirrored crop)."""
    grid = np.stack(np.meshgrid(np.arange(0, 112, 8), np.arange(0, 112, 8)), -1).reshape(-1, 2).astype(float)
    direct = _source_points(matrix, grid)
    via_mirror = _source_points(twin_matrix, np.c_[111 - grid[:, 0], grid[:, 1]])
    via_mirror[:, 0] = width - 1 - via_mirror[:, 0]
    return float(np.linalg.norm(direct - via_mirror, axis=1).mean() * np.hypot(*matrix[:, 0]))


def test_mirrored_landmarks_give_the_mirrored_crop(faces):
    for image, face in faces:
        width = image.shape[1]
        points = [(width - 1 - x, y) for x, y in face.landmarks]
        # as the detector names them in the mirrored image: left and right swap (eyes, mouth corners)
        twin = [points[i] for i in (1, 0, 2, 4, 3)]
        shift = _mirror_shift(similarity_to_template(np.asarray(face.landmarks), ARCFACE_TEMPLATE),
                              similarity_to_template(np.asarray(twin), ARCFACE_TEMPLATE), width)
        # the ArcFace template is not quite symmetric about the crop's centre x 55.5 (eyes' centre 55.91,
        # mouth's 56.14): the flipped crop is shifted by about twice that
        assert shift < 1.5, shift


def test_sizes_scale_the_template():
    # 96 x 112 is the original SphereFace / ArcFace template: the 112 one shifted left by 8 pixels
    np.testing.assert_allclose(template_for((96, 112)), ARCFACE_TEMPLATE - [8, 0], atol=1e-5)
    np.testing.assert_allclose(template_for(224), ARCFACE_TEMPLATE * 2, atol=1e-4)
    np.testing.assert_allclose(template_for(112), ARCFACE_TEMPLATE)
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    face = Face(box=(100, 80, 220, 230), score=0.99, landmarks=tuple(map(tuple, ARCFACE_TEMPLATE + [120, 100])))
    assert face.align(image, (96, 112)).shape == (112, 96, 3)
    # landmarks already on the template, shifted: the crop is the image, shifted (a pure translation)
    np.testing.assert_array_equal(face.align(image), image[100:212, 120:232])
    assert align_face(image[..., 0], np.asarray(face.landmarks), 64).shape == (64, 64)


@pytest.mark.parametrize("size", [0, 8, (112,), (96.5, 112), "112", 5000])
def test_a_bad_size_is_one_clear_error(size):
    face = Face(box=(0, 0, 10, 10), score=1.0, landmarks=tuple(map(tuple, ARCFACE_TEMPLATE)))
    with pytest.raises(EdgefaceError, match="aligned crop size"):
        face.align(np.zeros((50, 50, 3), np.uint8), size)


def test_degenerate_landmarks_are_one_clear_error():
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(EdgefaceError, match="coincide"):
        Face(box=(0, 0, 10, 10), score=1.0, landmarks=((5.0, 5.0),) * 5).align(image)
    with pytest.raises(EdgefaceError, match="finite"):
        align_face(image, np.full((5, 2), np.nan))
    with pytest.raises(EdgefaceError, match="H x W"):
        align_face(np.zeros((0, 5, 3), np.uint8), ARCFACE_TEMPLATE)


def test_detect_writes_aligned_crops(astronaut_path, tmp_path, capsys):
    import json
    import shutil

    import cv2

    from edgeface.cli import main

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(astronaut_path, images / "a.jpg")
    crops = tmp_path / "crops"
    assert main(["detect", str(images), "--crops", str(crops), "--json"]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out.splitlines()[0])
    assert len(record["faces"]) == 1 and record["faces"][0]["crop"] == str(crops / "a_face0.jpg")
    crop = cv2.imread(str(crops / "a_face0.jpg"))
    face = Face(box=tuple(record["faces"][0]["box"]), score=1.0,
                landmarks=tuple(tuple(v) for v in record["faces"][0]["landmarks"].values()))
    # the file is the face's aligned crop (JPEG-compressed)
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - face.align(load_image(images / "a.jpg"))).mean() < 4
    assert "aligned crops (112x112)" in err
    # again, at 96 x 112: its own earlier crop is replaced; a file of the user's is not
    assert main(["detect", str(images), "--crops", str(crops), "--crop-size", "96x112"]) == 0
    assert cv2.imread(str(crops / "a_face0.jpg")).shape == (112, 96, 3) and "1 file(s)" in capsys.readouterr().err
    (crops / "a_face0.jpg").write_bytes(astronaut_path.read_bytes())
    assert main(["detect", str(images), "--crops", str(crops)]) == 2
    assert "did not write it" in capsys.readouterr().err
    assert (crops / "a_face0.jpg").read_bytes() == astronaut_path.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["detect", str(images), "--crops", str(crops), "--crop-size", "8"])
    assert exit_info.value.code == 2 and "give WxH pixels, 16-4096" in capsys.readouterr().err


def test_crops_and_out_in_one_folder_or_a_bad_size_are_refused(astronaut_path, tmp_path, capsys):
    import shutil

    from edgeface.cli import main

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(astronaut_path, images / "a.jpg")
    results = tmp_path / "results"
    assert main(["detect", str(images), "--out", str(results), "--crops", str(results)]) == 2
    assert "is the --out folder" in capsys.readouterr().err and not results.exists()
    with pytest.raises(SystemExit):
        main(["detect", str(images), "--crops", str(tmp_path / "c"), "--crop-size", "96x112x3"])
    assert "give WxH pixels" in capsys.readouterr().err
    # a user's file where a crop would go is refused before any work: nothing else is written
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "a_face3.jpg").write_bytes(b"mine")
    assert main(["detect", str(images), "--crops", str(crops), "--out", str(tmp_path / "out")]) == 2
    assert "did not write it" in capsys.readouterr().err
    assert sorted(p.name for p in crops.iterdir()) == ["a_face3.jpg"] and not (tmp_path / "out").exists()
