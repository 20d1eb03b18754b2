"""The default resize policy: one face per face on close-ups, WIDER FACE still at original scale (issue 9)."""

import cv2
import numpy as np
import pytest

from edgeface import Detector, EdgefaceError
from edgeface.core.processing import DEFAULT_RESIZE, ResizePolicy, preprocess
from edgeface.evaluation.accuracy import WIDER_SETTINGS

GROUP_PHOTO = "12--Group/12_Group_Group_12_Group_Group_12_379.jpg"  # 1024 x 664, 31 faces found at 0.5


@pytest.fixture(scope="module")
def astronaut(astronaut_path):
    return cv2.imread(str(astronaut_path))


def test_max_policy_scales_down_only():
    policy = ResizePolicy.parse("max:640")
    assert policy == DEFAULT_RESIZE == ResizePolicy("max", (640, 640)) and str(policy) == "max:640"
    assert policy.scale_for((3000, 4000)) == 0.16 and policy.resized_hw((3000, 4000)) == (480, 640)
    assert policy.scale_for((480, 320)) == 1.0 and policy.resized_hw((480, 320)) == (480, 320)
    assert policy.resized_hw((64, 1_000_000)) == (1, 640)  # 0.04 pixels rounds up to 1
    with pytest.raises(EdgefaceError, match="at least 32 pixels"):
        ResizePolicy.parse("max:16")
    batch, (box,) = preprocess([np.zeros((1200, 1600, 3), np.uint8)], policy=policy, mean_bgr=(0, 0, 0))
    assert batch.shape == (1, 3, 480, 640) and box.scale == 0.4 and box.image_hw == (1200, 1600)


def test_defaults_photos_vs_wider_protocol(default_detector):
    from edgeface.runtimes.torch import TorchRuntime

    assert str(default_detector.resize) == "max:640"
    assert str(Detector(**WIDER_SETTINGS).resize) == "original"  # the official WIDER FACE protocol
    assert str(Detector(resize="longest:320", **WIDER_SETTINGS).resize) == "longest:320"  # explicit wins
    fixed = TorchRuntime(default_detector.runtime.network, resize="fixed:320x320")  # keeps its own size
    assert str(Detector(runtime=fixed).resize) == str(Detector(runtime=fixed, **WIDER_SETTINGS).resize) == \
        "fixed:320x320"


def test_upscaled_photo_gives_one_face(default_detector, astronaut):
    """The bundled photo at 2400 px: her face is about 450 x 560 pixels, beyond the anchors at original scale."""
    big = cv2.resize(astronaut, (2400, 2400))
    assert len(Detector(resize="original").detect(big)) > 1  # the fragments the default avoids
    (reference,) = default_detector.detect(astronaut)
    (face,) = default_detector.detect(big)
    assert face.score > 0.99
    assert face.box == pytest.approx([v * 2400 / 512 for v in reference.box], abs=15)  # in the 2400 px image


@pytest.mark.parametrize("rows, cols", [((20, 220), (120, 330)), ((50, 190), (160, 290))])
@pytest.mark.parametrize("width", [640, 1600, 3000])
def test_tight_crop_close_up_gives_one_face(default_detector, astronaut, rows, cols, width):
    """Her face filling the frame (at 3000 px original scale gives 11 and 13 fragments; max:1024 gives 2 on the
    tighter crop)."""
    crop = astronaut[slice(*rows), slice(*cols)]
    close_up = cv2.resize(crop, (width, round(width * crop.shape[0] / crop.shape[1])))
    (face,) = default_detector.detect(close_up)
    x1, y1, x2, y2 = face.box
    assert face.score > 0.99 and (x2 - x1) > 0.35 * width  # one face, most of the frame


def test_group_photo_keeps_its_faces(default_detector, wider_images):
    image = cv2.imread(str(wider_images / GROUP_PHOTO))
    assert image.shape == (664, 1024, 3)
    faces = default_detector.detect(image)
    assert len(faces) >= 30 and all(f.score >= 0.5 for f in faces)
    assert max(f.box[2] for f in faces) > 640  # mapped back to the 1024 px image
