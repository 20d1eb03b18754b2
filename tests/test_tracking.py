"""Tracking in `edgeface run`: identities on a WIDER video with known motion, faces carried by optical flow
between detections, landmark smoothing, and what the command writes."""

import json
import sys

import cv2
import numpy as np
import pytest

from edgeface import EdgefaceError
from edgeface.cli import main
from edgeface.core.face import Face
from edgeface.core.images import draw_faces

pytest.importorskip("trackers", reason="needs the track extra: pip install edgeface[track]")

from edgeface.benchmarks.tracking import CLIPS, load_clips, make_video, score_tracks  # noqa: E402

from edgeface.inference import stream  # noqa: E402
from edgeface.inference.pipeline import stream_faces  # noqa: E402
from edgeface.inference.tracking import FaceTracker, _moved  # noqa: E402


@pytest.fixture(scope="module")
def wider_video(wider_gt, tmp_path_factory):
    """Two WIDER photographs filmed by a panning, zooming camera: 90 frames each, ground truth known per frame."""
    path = tmp_path_factory.mktemp("video") / "wider.mp4"
    truth, poses = make_video(*load_clips(wider_gt.parent, CLIPS[:2]), path, frames_per_clip=90)
    return path, truth, poses


@pytest.fixture(scope="module")
def detections(wider_video, default_detector):
    """The default detector's faces on every frame, and the frames."""
    frames = [frame for _, frame in stream.frames(str(wider_video[0]))]
    return frames, [default_detector.detect_arrays([f])[0].to_faces() for f in frames]


def test_identities_hold_while_faces_stay_in_view(wider_video, detections):
    _, truth, poses = wider_video
    frames, faces = detections
    tracker = FaceTracker(frame_rate=30)
    scores = score_tracks(truth, poses, [tracker.update(f, d) for f, d in zip(frames, faces)])
    assert scores["faces"] >= 10 and scores["coverage"] > 0.95, scores
    assert scores["id_switches_in_view"] == 0, scores
    assert scores["ids_per_face"] <= 1.3, scores  # a face that leaves the frame and comes back may get a new id


def test_detector_every_third_frame_keeps_the_faces(wider_video, default_detector):
    video, truth, poses = wider_video
    results = list(stream_faces(default_detector, stream.frames(str(video)), tracker=FaceTracker(frame_rate=30),
                                detect_every=3))
    assert [r.detected for r in results[:6]] == [True, False, False, True, False, False]
    assert all("infer" not in r.seconds for r in results if not r.detected)
    scores = score_tracks(truth, poses, [r.faces for r in results])
    assert scores["coverage"] > 0.9 and scores["ids_per_face"] <= 1.5, scores


def test_smoothing_lowers_landmark_jitter(wider_video, detections):
    _, truth, poses = wider_video
    frames, faces = detections
    jitter = {}
    for smooth in (False, True):
        tracker = FaceTracker(frame_rate=30, smooth=smooth)
        jitter[smooth] = score_tracks(truth, poses, [tracker.update(f, d) for f, d in zip(frames, faces)])["jitter_px"]
    assert jitter[True] < 0.95 * jitter[False], jitter


def test_optical_flow_carries_a_face_with_the_image(astronaut_path, default_detector):
    image = cv2.imread(str(astronaut_path))
    shift = np.float32([[1, 0, 7.0], [0, 1, -4.0]])
    moved = cv2.warpAffine(image, shift, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    tracker = FaceTracker()
    (face,) = tracker.update(image, default_detector.detect(image))
    (carried,) = tracker.update(moved, None)
    expected = np.asarray(face.landmarks) + [7.0, -4.0]
    assert np.abs(np.asarray(carried.landmarks) - expected).max() < 0.5
    assert np.allclose(carried.box, np.asarray(face.box) + [7, -4, 7, -4], atol=0.5)


def test_frames_of_other_sizes_carry_nothing_across(astronaut_path, default_detector):
    """A folder's images differ in size: a skipped frame after a size change has no faces until the next
    detection (optical flow needs two frames of one size)."""
    image = cv2.imread(str(astronaut_path))
    frames = [("a", image), ("b", cv2.resize(image, None, fx=0.5, fy=0.5)), ("c", image), ("d", image)]
    results = list(stream_faces(default_detector, iter(frames), tracker=FaceTracker(), detect_every=2))
    assert [len(r.faces) for r in results] == [1, 0, 1, 1]


def test_a_similarity_moves_box_and_landmarks():
    face = Face((10.0, 20.0, 50.0, 80.0), 0.9, ((20.0, 40.0), (40.0, 40.0), (30.0, 50.0), (22.0, 65.0), (38.0, 65.0)))
    matrix = np.array([[2.0, 0.0, 5.0], [0.0, 2.0, -3.0]])  # x2 about the origin, then (5, -3)
    moved = _moved(face, matrix)
    assert np.allclose(moved.box, (25.0, 37.0, 105.0, 157.0))
    assert np.allclose(moved.landmarks, np.asarray(face.landmarks) * 2 + [5.0, -3.0])


def test_ids_are_confirmed_on_the_second_frame_and_count_from_one(astronaut_path, default_detector):
    image = cv2.imread(str(astronaut_path))
    faces = default_detector.detect(image)
    for _ in range(2):  # a second tracker in the same process numbers its own tracks from 1 too
        tracker = FaceTracker()
        assert [f.track_id for f in tracker.update(image, faces)] == [None]
        assert [f.track_id for f in tracker.update(image, faces)] == [1]
        assert [f.track_id for f in tracker.update(image, [])] == []


def test_without_the_track_extra_one_line_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "trackers", None)
    with pytest.raises(EdgefaceError, match=r"pip install edgeface\[track\]"):
        FaceTracker()


def test_a_frame_rate_must_be_positive():
    with pytest.raises(EdgefaceError, match="frame rate"):
        FaceTracker(frame_rate=0)


def test_tracked_faces_are_drawn_with_their_id(astronaut_path, default_detector):
    image = cv2.imread(str(astronaut_path))
    (face,) = default_detector.detect(image)
    plain = draw_faces(image, [face])
    labelled = draw_faces(image, [Face(face.box, face.score, face.landmarks, track_id=3)])
    assert (plain != labelled).any()
    at_the_top = Face((face.box[0], 0.0, face.box[2], face.box[3] - face.box[1]), face.score, face.landmarks, 3)
    drawn = draw_faces(image, [at_the_top])  # the label inside the box, not cut off above the image
    text = (drawn == 255).all(axis=2) & ~(image == 255).all(axis=2)  # white pixels the drawing added
    x1, x2, quarter = int(face.box[0]) + 3, int(face.box[2]) - 3, int(face.box[3] - face.box[1]) // 4
    assert text[3:quarter, x1:x2].any()
    assert face.to_dict().keys() == {"box", "score", "landmarks"}
    assert Face(face.box, face.score, face.landmarks, track_id=3).to_dict()["track_id"] == 3


def test_run_writes_track_ids_and_which_frames_were_detected(wider_video, tmp_path, capsys):
    video = wider_video[0]
    assert main(["run", "--source", str(video), "--detect-every", "2", "--smooth", "--json", "--save",
                 str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 180 and len(list(tmp_path.glob("*.jpg"))) == 180
    assert [r["detected"] for r in lines[:4]] == [True, False, True, False]
    faces = [f for r in lines for f in r["faces"]]
    assert faces and all("track_id" in f for f in faces)
    assert sum(f["track_id"] is not None for f in faces) > 0.9 * len(faces)
    assert "tracking with smoothing, detector every 2 frames" in err and "track" in err.splitlines()[-1]


def test_frame_rate_is_read_from_the_video(wider_video, astronaut_path):
    assert stream.frame_rate(str(wider_video[0])) == pytest.approx(30.0)
    assert stream.frame_rate(str(astronaut_path)) is None and stream.frame_rate("camera:0") is None
