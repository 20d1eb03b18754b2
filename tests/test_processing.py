"""Pre/post-processing against cases computed by hand."""

import numpy as np
import pytest

from edgeface import EdgefaceError
from edgeface.core.processing import (
    AnchorSpec,
    Letterbox,
    ResizePolicy,
    decode_boxes,
    decode_landmarks,
    nms,
    postprocess,
    preprocess,
    prior_boxes,
)

ONE_LEVEL = AnchorSpec(min_sizes=((16, 32),), steps=(16,), variance=(0.1, 0.2))


def test_priors_by_hand():
    priors = prior_boxes((32, 64), ONE_LEVEL)
    # 2 rows x 4 columns x 2 sizes, ordered row, column, size; (cx, cy, w, h) normalised by (W=64, H=32).
    assert priors.shape == (16, 4)
    np.testing.assert_allclose(priors[0], [8 / 64, 8 / 32, 16 / 64, 16 / 32])
    np.testing.assert_allclose(priors[1], [8 / 64, 8 / 32, 32 / 64, 32 / 32])
    np.testing.assert_allclose(priors[2], [24 / 64, 8 / 32, 16 / 64, 16 / 32])
    np.testing.assert_allclose(priors[8], [8 / 64, 24 / 32, 16 / 64, 16 / 32])
    assert not priors.flags.writeable


def test_prior_count_for_odd_sizes_uses_ceil():
    spec = AnchorSpec()
    assert len(prior_boxes((37, 61), spec)) == spec.num_priors((37, 61)) == 2 * (5 * 8 + 3 * 4 + 2 * 2)


def test_decode_boxes_by_hand():
    priors = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    loc = np.array([[1.0, -1.0, 0.0, np.log(2) / 0.2]], np.float32)
    # centre = (0.5 + 1*0.1*0.2, 0.5 - 1*0.1*0.4) = (0.52, 0.46); size = (0.2, 0.8)
    np.testing.assert_allclose(decode_boxes(loc, priors, (0.1, 0.2)), [[0.42, 0.06, 0.62, 0.86]], atol=1e-6)


def test_decode_landmarks_by_hand():
    priors = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    offsets = np.arange(10, dtype=np.float32)[None]  # points (0,1), (2,3), ...
    points = decode_landmarks(offsets, priors, (0.1, 0.2))
    assert points.shape == (1, 5, 2)
    np.testing.assert_allclose(points[0, 0], [0.5, 0.5 + 1 * 0.1 * 0.4])
    np.testing.assert_allclose(points[0, 4], [0.5 + 8 * 0.1 * 0.2, 0.5 + 9 * 0.1 * 0.4])


def test_nms_by_hand():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 4]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # pixel-inclusive: box0 vs box1 overlap 9x9=81 over 100+100-81 -> 0.68 (suppressed at 0.4);
    # box3 (10x5=50) vs box0: 50 / 100 = 0.5 -> box0 suppressed by the higher-scored box3; box1 vs box3:
    # overlap 9x4=36 / (100+50-36)=0.316 -> kept.
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(boxes[:0], scores[:0], 0.4).tolist() == []


def _raw_outputs(input_hw, hits):
    """Raw network outputs with all-background scores except ``hits``: {prior index: score}."""
    n = AnchorSpec().num_priors(input_hw)
    loc = np.zeros((n, 4), np.float32)
    conf = np.tile(np.array([[1.0, 0.0]], np.float32), (n, 1))
    landmarks = np.zeros((n, 10), np.float32)
    for index, score in hits.items():
        conf[index] = (1 - score, score)
    return loc, conf, landmarks


def test_postprocess_maps_priors_back_to_original_pixels():
    # A 64x64 input holding an image scaled by 0.5: the first prior (centre 4,4; size 16) maps to 2x pixels.
    loc, conf, landmarks = _raw_outputs((64, 64), {0: 0.9, 1: 0.3})
    dets = postprocess(loc, conf, landmarks, Letterbox(0.5, (120, 100), (64, 64)), anchors=AnchorSpec(),
                       score_threshold=0.5)
    assert len(dets) == 1
    np.testing.assert_allclose(dets.boxes[0], [(4 - 8) * 2, (4 - 8) * 2, (4 + 8) * 2, (4 + 8) * 2], atol=1e-4)
    np.testing.assert_allclose(dets.landmarks[0], np.full((5, 2), 8.0), atol=1e-4)  # zero offsets: prior centre
    assert dets.scores.tolist() == pytest.approx([0.9])


def test_postprocess_top_k_and_keep_top_k():
    hits = {i: 0.5 + i / 1000 for i in range(0, 400, 40)}  # ten far-apart priors on the stride-8 level
    loc, conf, landmarks = _raw_outputs((160, 160), hits)
    letterbox = Letterbox(1.0, (160, 160), (160, 160))
    assert len(postprocess(loc, conf, landmarks, letterbox, anchors=AnchorSpec(), score_threshold=0.1)) == 10
    dets = postprocess(loc, conf, landmarks, letterbox, anchors=AnchorSpec(), score_threshold=0.1, top_k=4)
    assert len(dets) == 4 and np.all(np.diff(dets.scores) <= 0) and dets.scores[0] == pytest.approx(0.86)
    assert len(postprocess(loc, conf, landmarks, letterbox, anchors=AnchorSpec(), score_threshold=0.1,
                           keep_top_k=3)) == 3


def test_postprocess_rejects_outputs_of_another_size():
    loc, conf, landmarks = _raw_outputs((64, 64), {})
    with pytest.raises(EdgefaceError, match="do not belong together"):
        postprocess(loc, conf, landmarks, Letterbox(1.0, (96, 96), (96, 96)), anchors=AnchorSpec())


def test_resize_policies_parse():
    assert ResizePolicy.parse("original") == ResizePolicy()
    assert ResizePolicy.parse("longest:640") == ResizePolicy("longest", (640, 640))
    assert ResizePolicy.parse("640x480") == ResizePolicy.parse("fixed:640x480") == ResizePolicy("fixed", (640, 480))
    assert str(ResizePolicy.parse("fixed:640x480")) == "fixed:640x480"
    for bad in ["630x640", "huge", "longest:8"]:
        with pytest.raises(EdgefaceError, match="resize|policy"):
            ResizePolicy.parse(bad)


def test_preprocess_subtracts_mean_and_pads_batch():
    a = np.full((10, 20, 3), (104, 117, 123), np.uint8)
    b = np.full((30, 5, 3), 200, np.uint8)
    batch, boxes = preprocess([a, b], policy=ResizePolicy(), mean_bgr=(104, 117, 123))
    assert batch.shape == (2, 3, 30, 20) and batch.dtype == np.float32
    assert np.all(batch[0] == 0)  # mean-coloured image and its padding are both zero
    assert np.all(batch[1, :, :, :5] == np.array([96, 83, 77], np.float32)[:, None, None])
    assert np.all(batch[1, :, :, 5:] == 0)
    assert boxes[1] == Letterbox(1.0, (30, 5), (30, 20))
    nhwc, _ = preprocess([a], policy=ResizePolicy(), mean_bgr=(0, 0, 0), layout="NHWC")
    assert nhwc.shape == (1, 10, 20, 3) and nhwc[0, 0, 0].tolist() == [104, 117, 123]


def test_preprocess_fixed_size_letterboxes():
    image = np.zeros((100, 200, 3), np.uint8)
    batch, (box,) = preprocess([image], policy=ResizePolicy.parse("64x64"), mean_bgr=(0, 0, 0))
    assert batch.shape == (1, 3, 64, 64)
    assert box.scale == pytest.approx(0.32) and box.input_hw == (64, 64)
    _, (box,) = preprocess([image], policy=ResizePolicy.parse("longest:50"), mean_bgr=(0, 0, 0))
    assert box.scale == pytest.approx(0.25) and box.input_hw == (25, 50)
