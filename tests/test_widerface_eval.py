"""Tests of the WIDER FACE evaluation protocol (edgeface.evaluation.widerface)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgeface.evaluation import widerface as wf
from edgeface.evaluation.widerface import (
    GroundTruth,
    WiderFaceError,
    evaluate,
    image_key,
    load_ground_truth,
    read_predictions,
    write_predictions,
)

SHARED = Path(os.environ.get("EDGEFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GT_DIR = SHARED / "data" / "widerface" / "ground_truth"
IMAGES_DIR = SHARED / "data" / "widerface" / "val" / "images"
REF_DIR = SHARED / "reference"
# AP over the 834 dev images, from shared/reference/README.md (easy, medium, hard).
REFERENCE_AP = {
    "biubug6_final_dev": (0.8942, 0.8651, 0.7050),
    "onnx_mnet025_dev": (0.8901, 0.8651, 0.6959),
}

A = ("0--Parade", "0_Parade_a_1")
B = ("1--Handshaking", "1_Handshaking_b_2")


def make_gt(images: dict, kept: dict | None = None) -> GroundTruth:
    """Tiny GroundTruth: ``images`` maps key -> list of xywh boxes; by default every face is kept in every subset."""
    if kept is None:
        kept = {k: list(range(len(b))) for k, b in images.items()}
    return GroundTruth(
        boxes={k: np.array(b, dtype=float).reshape(-1, 4) for k, b in images.items()},
        kept={s: {k: kept[k] if not isinstance(kept[k], dict) else kept[k][s] for k in images} for s in wf.SUBSETS},
    )


def dets(*rows) -> np.ndarray:
    return np.array(rows, dtype=float).reshape(-1, 5)


FAR = (500, 500, 20, 20)  # a box overlapping no ground truth below


# ------------------------------------------------------------------------------------------ hand-built cases


def test_perfect_detections_give_ap_one():
    gt = make_gt({A: [(10, 10, 30, 30), (100, 10, 30, 40)], B: [(50, 60, 25, 25)]})
    preds = {A: dets((10, 10, 30, 30, 0.9), (100, 10, 30, 40, 0.8)), B: dets((50, 60, 25, 25, 0.7))}
    r = evaluate(preds, gt)
    assert r.ap == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert r.num_images == 2
    assert r.num_faces == {"easy": 3, "medium": 3, "hard": 3}
    for curve in r.pr_curves.values():
        assert curve.shape == (1000, 2)
        assert curve[-1].tolist() == [1.0, 1.0]  # lowest threshold: every detection, all correct, all found


def test_empty_predictions_score_zero_and_faces_still_count():
    gt = make_gt({A: [(10, 10, 30, 30)], B: [(50, 60, 25, 25), (90, 60, 25, 25)]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0/0 must be guarded, not warned about
        r = evaluate({A: dets(), B: np.zeros((0, 5))}, gt)
    assert r.ap == {"easy": 0.0, "medium": 0.0, "hard": 0.0}
    assert r.num_faces == {"easy": 3, "medium": 3, "hard": 3}
    assert np.all(r.pr_curves["hard"] == 0.0)


def test_image_without_predictions_caps_recall():
    gt = make_gt({A: [(10, 10, 30, 30)], B: [(50, 60, 25, 25)]})
    preds = {A: dets((10, 10, 30, 30, 0.9), (*FAR, 0.1)), B: dets()}
    r = evaluate(preds, gt)
    assert r.num_faces["easy"] == 2  # B's face counts although B has nothing to score
    assert r.ap["easy"] == pytest.approx(0.5)


def test_detection_on_ignored_face_is_neither_tp_nor_fp():
    # Face 1 is ignored for easy and medium (kept for hard).
    gt = make_gt({A: [(10, 10, 30, 30), (200, 10, 30, 30)]}, kept={A: {"easy": [0], "medium": [0], "hard": [0, 1]}})
    base = dets((10, 10, 30, 30, 0.9), (*FAR, 0.1))
    with_ignored = np.vstack([dets((200, 10, 30, 30, 0.95)), base])  # ranked first
    r0 = evaluate({A: base}, gt)
    r1 = evaluate({A: with_ignored}, gt)
    assert r0.ap["easy"] == 1.0
    assert r1.ap["easy"] == r0.ap["easy"] == r1.ap["medium"]  # counted as a FP it would be 0.5
    assert r1.num_faces == {"easy": 1, "medium": 1, "hard": 2}
    # Top threshold: only the ignored detection is above it, and it is not a proposal (precision guard -> 0).
    assert r1.pr_curves["easy"][0].tolist() == [0.0, 0.0]
    # For hard the same detection is a true positive.
    assert r1.ap["hard"] == 1.0
    assert r1.pr_curves["hard"][0].tolist() == [1.0, 0.5]


@pytest.mark.parametrize(
    "fp_box",
    [FAR, (12, 10, 30, 30)],  # a detection on nothing, and a duplicate of an already-matched face
    ids=["background", "duplicate"],
)
def test_false_positive_above_true_positive_lowers_ap(fp_box):
    gt = make_gt({A: [(10, 10, 30, 30), (100, 10, 30, 30)]})
    preds = {A: dets((10, 10, 30, 30, 0.9), (*fp_box, 0.5), (100, 10, 30, 30, 0.1))}
    r = evaluate(preds, gt)
    # Ranked TP, FP, TP: points (R, P) = (1/2, 1), (1/2, 1/2), (1, 2/3); VOC AP = 1/2 * 1 + 1/2 * 2/3.
    assert r.ap["easy"] == pytest.approx(5 / 6, abs=1e-12)
    # Order of the file rows must not matter: evaluation sorts by score.
    r_shuffled = evaluate({A: preds[A][[2, 0, 1]]}, gt)
    assert r_shuffled.ap["easy"] == r.ap["easy"]


def test_subset_restricts_faces_and_score_normalisation():
    gt = make_gt({A: [(10, 10, 30, 30)], B: [(50, 60, 25, 25), (90, 60, 25, 25)]})
    preds = {A: dets((10, 10, 30, 30, 1.0), (*FAR, 0.0)), B: dets((50, 60, 25, 25, 3.0))}
    only_a = evaluate({A: preds[A]}, gt)
    assert only_a.num_images == 1 and only_a.num_faces["easy"] == 1  # B's faces not counted
    assert only_a.ap["easy"] == 1.0
    restricted = evaluate(preds, gt, images=[A])
    assert restricted.num_faces == only_a.num_faces
    for s in wf.SUBSETS:
        # B's score 3.0 would push A's TP to 1/3 after normalisation; row 0 (thresh 0.999) shows it does not.
        np.testing.assert_array_equal(restricted.pr_curves[s], only_a.pr_curves[s])
    assert restricted.pr_curves["easy"][0].tolist() == [1.0, 1.0]
    # Requesting both images counts all three faces; B's prediction then joins the normalisation.
    both = evaluate(preds, gt, images=[A, B, A])
    assert both.num_images == 2 and both.num_faces["easy"] == 3
    assert both.ap["easy"] == pytest.approx(2 / 3)


def test_unknown_images_raise():
    gt = make_gt({A: [(10, 10, 30, 30)]})
    with pytest.raises(WiderFaceError, match="not in the ground truth.*9_Nowhere"):
        evaluate({("9--X", "9_Nowhere"): dets((1, 1, 5, 5, 0.5))}, gt)
    with pytest.raises(WiderFaceError, match="9_Nowhere"):
        evaluate({A: dets((1, 1, 5, 5, 0.5))}, gt, images=[A, ("9--X", "9_Nowhere")])


def test_iou_uses_pixel_inclusive_convention():
    # gt x,y,w,h = 0,0,9,9 -> x2 = y2 = 9 -> inclusive area 10 x 10 = 100.
    ious = wf._iou_matrix(np.array([[0.0, 0, 9, 4], [0, 0, 9, 3.9], [9, 9, 20, 20]]), np.array([[0.0, 0, 9, 9]]))
    # 10*5/100; 10*4.9/100; touching corner shares one pixel: 1 / (100 + 144 - 1).
    np.testing.assert_allclose(ious[:, 0], [0.5, 0.49, 1 / 243], rtol=0, atol=1e-12)
    gt = make_gt({A: [(0, 0, 9, 9)]})
    # Half-height box: IoU exactly 0.5 inclusive (36/81 = 0.44 with plain areas) -> a true positive.
    hit = evaluate({A: dets((0, 0, 9, 4, 0.9), (*FAR, 0.1))}, gt)
    assert hit.ap["easy"] == 1.0
    miss = evaluate({A: dets((0, 0, 9, 3.9, 0.9), (*FAR, 0.1))}, gt)
    assert miss.ap["easy"] == 0.0


def test_result_to_dict_is_json():
    gt = make_gt({A: [(10, 10, 30, 30)]})
    r = evaluate({A: dets((10, 10, 30, 30, 0.9), (*FAR, 0.2))}, gt)
    d = json.loads(json.dumps(r.to_dict()))
    assert d == {"ap": {"easy": 1.0, "medium": 1.0, "hard": 1.0}, "num_images": 1,
                 "num_faces": {"easy": 1, "medium": 1, "hard": 1}}


def test_ground_truth_validation():
    with pytest.raises(WiderFaceError, match="out of range"):
        make_gt({A: [(0, 0, 5, 5)]}, kept={A: [1]})
    with pytest.raises(WiderFaceError, match="subsets"):
        GroundTruth(boxes={A: np.zeros((1, 4))}, kept={"easy": {A: [0]}})
    gt = make_gt({A: [(0, 0, 5, 5)]})
    assert gt.boxes[A].dtype == np.float64 and not gt.boxes[A].flags.writeable


def test_bad_prediction_array_raises():
    gt = make_gt({A: [(0, 0, 5, 5)]})
    with pytest.raises(WiderFaceError, match=r"\(N, 5\)"):
        evaluate({A: np.ones((2, 4))}, gt)


# ------------------------------------------------------------------------------------------ txt format


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = np.c_[rng.uniform(0, 500, (4, 4)), rng.random(4)]
    a[0, 4] = np.float32(0.99999785)  # a float32 score must survive exactly
    b = np.c_[np.round(rng.uniform(0, 500, (2, 4))), [0.5, 0.25]]
    pa = write_predictions(tmp_path, *A, a)
    write_predictions(tmp_path, *B, b)
    pe = write_predictions(tmp_path, "2--Demonstration", "2_Demo_empty_3", np.zeros((0, 5)))
    assert pa == tmp_path / A[0] / f"{A[1]}.txt"
    assert pe.read_text().splitlines() == ["2_Demo_empty_3", "0"]
    assert not list(tmp_path.rglob("*.tmp"))  # temp files were renamed into place
    got = read_predictions(tmp_path)
    assert set(got) == {A, B, ("2--Demonstration", "2_Demo_empty_3")}
    np.testing.assert_array_equal(got[A], a)  # full precision, exact
    np.testing.assert_array_equal(got[B], b)
    assert got[("2--Demonstration", "2_Demo_empty_3")].shape == (0, 5)
    assert all(v.dtype == np.float64 for v in got.values())


def test_read_tolerates_original_format_quirks(tmp_path):
    ev = tmp_path / "0--Parade"
    ev.mkdir()
    # Original-style lines with a trailing space, '.jpg' in line 1 and blank trailing lines.
    (ev / "0_Parade_marchingband_1_20.txt").write_text(
        "0_Parade_marchingband_1_20.jpg\n2\n223 406 509 618 0.99999785 \n268 172 443 609 0.9721696 \n\n\n"
    )
    (ev / "0_Parade_Parade_0_7.txt").write_text("images/0--Parade/0_Parade_Parade_0_7.jpg\r\n0\r\n")  # path, CRLF
    (ev / "0_Parade_Parade_0_8.txt").write_text("")  # zero-byte: no detections
    got = read_predictions(tmp_path)
    stems = ("0_Parade_marchingband_1_20", "0_Parade_Parade_0_7", "0_Parade_Parade_0_8")
    assert set(got) == {("0--Parade", s) for s in stems}
    np.testing.assert_array_equal(
        got[("0--Parade", "0_Parade_marchingband_1_20")],
        [[223, 406, 509, 618, 0.99999785], [268, 172, 443, 609, 0.9721696]],
    )
    assert got[("0--Parade", "0_Parade_Parade_0_7")].shape == (0, 5)
    assert got[("0--Parade", "0_Parade_Parade_0_8")].shape == (0, 5)


def test_read_rejects_truncated_file(tmp_path):
    ev = tmp_path / "0--Parade"
    ev.mkdir()
    (ev / "0_Parade_x_1.txt").write_text("0_Parade_x_1\n3\n1 2 3 4 0.5\n")
    with pytest.raises(WiderFaceError, match="3 boxes but 1"):
        read_predictions(tmp_path)


def test_image_key():
    assert image_key("/data/val/images/0--Parade/0_Parade_marchingband_1_20.jpg") == (
        "0--Parade",
        "0_Parade_marchingband_1_20",
    )
    assert image_key(Path("61--Street_Battle") / "61_Street_Battle_streetfight_61_10.jpg")[0] == "61--Street_Battle"
    with pytest.raises(WiderFaceError, match="event"):
        image_key("flat_folder/0_Parade_marchingband_1_20.jpg")


# ------------------------------------------------------------------------------------------ ground truth files


GT_FILES = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")


@pytest.mark.parametrize("missing", GT_FILES)
def test_missing_ground_truth_file_is_named(tmp_path, missing):
    for name in GT_FILES:
        if name != missing:
            (tmp_path / name).write_bytes(b"")
    with pytest.raises(WiderFaceError, match=missing.replace(".", r"\.")) as exc:
        load_ground_truth(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_missing_ground_truth_folder(tmp_path):
    with pytest.raises(WiderFaceError, match="wider_face_val.mat"):
        load_ground_truth(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ shared data


@pytest.fixture(scope="module")
def real_gt() -> GroundTruth:
    if not all((GT_DIR / f).is_file() for f in ("wider_face_val.mat", "wider_hard_val.mat")):
        pytest.skip(f"WIDER FACE ground truth not found under {GT_DIR} (set EDGEFACE_SHARED)")
    return load_ground_truth(GT_DIR)


def test_real_ground_truth_counts(real_gt):
    assert len(real_gt) == 3226
    assert {s: real_gt.num_faces(s) for s in wf.SUBSETS} == {"easy": 7211, "medium": 13319, "hard": 31958}
    # Kept sets are nested: easy within medium within hard.
    for key in real_gt.keys():
        e, m, h = (set(real_gt.kept[s][key].tolist()) for s in wf.SUBSETS)
        assert e <= m <= h


@pytest.mark.parametrize("name", sorted(REFERENCE_AP))
def test_reference_predictions_reproduce_readme_ap(real_gt, name):
    pred_dir = REF_DIR / name
    if not pred_dir.is_dir():
        pytest.skip(f"reference predictions {pred_dir} not found (set EDGEFACE_SHARED)")
    preds = read_predictions(pred_dir)
    assert len(preds) == 834
    r = evaluate(preds, real_gt)
    assert r.num_images == 834
    for subset, expected in zip(wf.SUBSETS, REFERENCE_AP[name]):
        assert r.ap[subset] == pytest.approx(expected, abs=5e-4), (subset, r.ap)
    if IMAGES_DIR.is_dir():
        # The image folder derives the same 834 keys; giving them explicitly is the same evaluation.
        keys = [image_key(p) for p in sorted(IMAGES_DIR.glob("*/*.jpg"))]
        assert set(keys) == set(preds)
        assert evaluate(preds, real_gt, images=keys).ap == r.ap
