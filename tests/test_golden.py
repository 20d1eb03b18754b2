"""The pipeline against the original implementation's predictions and AP on the shared WIDER images."""

import numpy as np
import pytest

from edgeface.evaluation.accuracy import evaluate_detector, predict, select_images
from edgeface.evaluation.widerface import evaluate, image_key, load_ground_truth, read_predictions

GOLDEN_IMAGES = [
    "0--Parade/0_Parade_Parade_0_102.jpg",
    "12--Group/12_Group_Group_12_Group_Group_12_10.jpg",
    "26--Soldier_Drilling/26_Soldier_Drilling_Soldiers_Drilling_26_1022.jpg",
    "52--Photographers/52_Photographers_photographertakingphoto_52_228.jpg",
]


@pytest.fixture(scope="module")
def reference(reference_dir):
    return read_predictions(reference_dir / "biubug6_final_dev")


@pytest.mark.parametrize("name", GOLDEN_IMAGES)
def test_predictions_match_reference_implementation(name, final_detector, wider_images, reference):
    path = wider_images / name
    (key, ours), = predict(final_detector.detect_arrays, [path], progress=False).items()
    theirs = reference[key]
    assert len(ours) == len(theirs)
    # Same boxes (whole pixels, as the reference writes them) and scores, compared as sets: ties may swap.
    order_ours = np.lexsort(ours[:, :4].T[::-1])
    order_theirs = np.lexsort(theirs[:, :4].T[::-1])
    np.testing.assert_array_equal(ours[order_ours, :4], theirs[order_theirs, :4])
    np.testing.assert_allclose(ours[order_ours, 4], theirs[order_theirs, 4], atol=1e-5)


@pytest.mark.parametrize("weights, folder", [("final", "biubug6_final_dev"), ("default", "onnx_mnet025_dev")])
def test_short_ap_regression_matches_reference(weights, folder, final_retinaface, wider_images, wider_gt,
                                               reference_dir):
    """40 images spread over all events: same AP as the reference predictions of those images."""
    from edgeface import Detector
    from edgeface.evaluation.accuracy import WIDER_SETTINGS

    detector = Detector(weights=final_retinaface if weights == "final" else "default", **WIDER_SETTINGS)
    gt = load_ground_truth(wider_gt)
    paths = select_images(wider_images, gt, limit=40)
    ours = evaluate_detector(detector.detect_arrays, wider_images, gt, limit=40, progress=False)
    reference = read_predictions(reference_dir / folder)
    keys = [image_key(p) for p in paths]
    theirs = evaluate({k: reference[k] for k in keys}, gt)
    assert ours.num_images == 40
    for subset in ("easy", "medium", "hard"):
        assert ours.ap[subset] == pytest.approx(theirs.ap[subset], abs=5e-4)
        assert ours.ap[subset] > 0.6  # a broken model scores near 0


def test_default_weights_find_faces_on_wider(default_detector, wider_images):
    faces = default_detector.detect(wider_images / GOLDEN_IMAGES[1])
    assert len(faces) >= 5 and all(f.score >= 0.5 for f in faces)
