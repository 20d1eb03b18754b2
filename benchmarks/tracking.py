"""Tracking on a real video with known motion: ID switches, coverage, landmark jitter and FPS, with the detector on
every frame and on every Nth.

The video is made from WIDER FACE val photographs: a 640 x 480 camera pans over each photograph and zooms in and
out along a known path (``clip_motion``), so every ground-truth face's box is known in every frame, faces leave the
frame and come back, and the frames go through a real codec (MPEG-4 Part 2 in an .mp4, OpenCV's writer). Each
clip's faces are identities of their own.

Metrics, per configuration (``python -m edgeface.benchmarks.tracking``):

- **ID switches** (CLEAR MOT, Bernardin and Stiefelhagen 2008): a ground-truth face matched (IoU >= 0.5, Hungarian
  assignment per frame) to a different track id than at its previous match; "in view" counts those where the face
  was visible in the frame before (a face that left the frame and came back gets a new id from a tracker without
  appearance features: expected). py-motmetrics, the usual library, fails on numpy 2 (``np.asfarray``), hence the
  dozen lines here.
- **ids per face**: distinct track ids a ground-truth face was matched to (1.0 is perfect).
- **coverage**: matched / visible ground-truth faces (visible: wholly in the frame, at least MIN_FACE_PX high).
- **jitter**: each matched face's landmarks mapped back into its photograph (the camera path is known), where they
  should not move: RMS of their frame-to-frame steps, in frame pixels, median over faces. **spread**: RMS of their
  distance to their mean (jitter, plus lag and scale-dependent bias).
- **fps**: frames per second of the whole stream (decoding, detection, tracking), pipelined, from the first frame
  out to the last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from edgeface.core.parity import iou_matrix
from edgeface.evaluation.widerface import image_key, load_ground_truth
from edgeface.inference import stream
from edgeface.inference.detector import Detector
from edgeface.inference.pipeline import stream_faces
from edgeface.inference.tracking import FaceTracker

FRAME_SIZE = (640, 480)  # width, height
FPS = 30.0
MIN_FACE_PX = 24
IOU_MATCH = 0.5
# Photographs with 3 to 8 faces of 40 pixels or more (and none smaller): faces a camera at this distance shows.
CLIPS = (
    "11--Meeting/11_Meeting_Meeting_11_Meeting_Meeting_11_102.jpg",
    "12--Group/12_Group_Team_Organized_Group_12_Group_Team_Organized_Group_12_330.jpg",
    "20--Family_Group/20_Family_Group_Family_Group_20_27.jpg",
    "1--Handshaking/1_Handshaking_Handshaking_1_343.jpg",
)


@dataclass(frozen=True)
class CameraPose:
    """Photograph -> frame: x_frame = scale * (x_photo - cx) + width / 2 (and likewise y)."""

    scale: float
    cx: float
    cy: float

    def matrix(self) -> np.ndarray:
        w, h = FRAME_SIZE
        return np.array([[self.scale, 0, w / 2 - self.scale * self.cx], [0, self.scale, h / 2 - self.scale * self.cy]])

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        w, h = FRAME_SIZE
        return (xy - [self.cx, self.cy]) * self.scale + [w / 2, h / 2]

    def to_photo(self, xy: np.ndarray) -> np.ndarray:
        w, h = FRAME_SIZE
        return (xy - [w / 2, h / 2]) / self.scale + [self.cx, self.cy]


def clip_motion(photo_hw: tuple[int, int], frames: int) -> list[CameraPose]:
    """The camera path over a photograph: one cycle of zoom (x0.85 .. x1.15 around the scale at which the frame shows
    70% of the photograph's width) and of an elliptic pan whose reach takes the faces at the edges out of the frame
    and back (at 150 frames, up to about 10 pixels per frame)."""
    h, w = photo_hw
    base = FRAME_SIZE[0] / (0.7 * w)
    poses = []
    for k in range(frames):
        t = k / frames
        scale = base * (1 + 0.15 * math.sin(2 * math.pi * t))
        cx = w / 2 + 0.25 * w * math.sin(2 * math.pi * t)
        cy = h / 2 + 0.15 * h * math.sin(2 * math.pi * t + 1.0)
        poses.append(CameraPose(scale, cx, cy))
    return poses


def make_video(photos: list[Path], boxes: list[np.ndarray], out: Path, *, frames_per_clip: int = 150):
    """Writes the video to ``out`` (.mp4); returns, per frame, the visible ground truth as (identity, box) pairs and
    the frame's (clip, CameraPose)."""
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, FRAME_SIZE)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {out} (no MPEG-4 encoder)")
    truth, poses = [], []
    try:
        for clip, (photo, gt) in enumerate(zip(photos, boxes)):
            image = cv2.imread(str(photo))
            for pose in clip_motion(image.shape[:2], frames_per_clip):
                writer.write(cv2.warpAffine(image, pose.matrix(), FRAME_SIZE, flags=cv2.INTER_AREA))
                corners = pose.to_frame(gt.reshape(-1, 2)).reshape(-1, 4)
                visible = ((corners[:, 0] >= 0) & (corners[:, 1] >= 0) & (corners[:, 2] <= FRAME_SIZE[0])
                           & (corners[:, 3] <= FRAME_SIZE[1]) & (corners[:, 3] - corners[:, 1] >= MIN_FACE_PX))
                truth.append([((clip, i), corners[i]) for i in np.flatnonzero(visible)])
                poses.append((clip, pose))
    finally:
        writer.release()
    return truth, poses


def score_tracks(truth, poses, predictions) -> dict[str, float]:
    """The metrics of the module docstring; ``predictions`` per frame: a list of Face (with track_id)."""
    last_id: dict = {}
    last_seen: dict = {}  # identity -> last frame it was visible
    ids: dict = {}
    switches = switches_in_view = matched = visible = 0
    landmarks: dict = {}  # identity -> list of (frame, landmarks in the photograph (5, 2), scale)
    for k, (gt, (clip, pose), faces) in enumerate(zip(truth, poses, predictions)):
        visible += len(gt)
        in_view = {identity for identity, _ in gt if last_seen.get(identity) == k - 1}
        last_seen.update({identity: k for identity, _ in gt})
        if not gt or not faces:
            continue
        overlap = iou_matrix(np.array([box for _, box in gt]), np.array([f.box for f in faces]))
        rows, cols = linear_sum_assignment(-overlap)
        for r, c in zip(rows, cols):
            if overlap[r, c] < IOU_MATCH:
                continue
            identity, face = gt[r][0], faces[c]
            matched += 1
            landmarks.setdefault(identity, []).append((k, pose.to_photo(np.asarray(face.landmarks)), pose.scale))
            if face.track_id is None:
                continue
            if identity in last_id and last_id[identity] != face.track_id:
                switches += 1
                switches_in_view += identity in in_view
            last_id[identity] = face.track_id
            ids.setdefault(identity, set()).add(face.track_id)
    jitter, spread = [], []
    for samples in landmarks.values():
        if len(samples) < 10:
            continue
        frames = np.array([k for k, _, _ in samples])
        points = np.stack([p for _, p, _ in samples])
        scales = np.array([s for _, _, s in samples])
        deviation = np.linalg.norm(points - points.mean(axis=0), axis=2) * scales[:, None]
        spread.append(float(np.sqrt(np.mean(deviation ** 2))))
        consecutive = np.flatnonzero(np.diff(frames) == 1)
        if len(consecutive):
            steps = np.linalg.norm(points[consecutive + 1] - points[consecutive], axis=2) * scales[consecutive, None]
            jitter.append(float(np.sqrt(np.mean(steps ** 2))))
    median = lambda values: float(np.median(values)) if values else float("nan")  # noqa: E731
    return {"id_switches": switches, "id_switches_in_view": switches_in_view,
            "ids_per_face": float(np.mean([len(v) for v in ids.values()])) if ids else 0.0,
            "faces": len(landmarks), "coverage": matched / max(visible, 1),
            "jitter_px": median(jitter), "spread_px": median(spread)}


def load_clips(widerface: Path, clips: tuple[str, ...] = CLIPS) -> tuple[list[Path], list[np.ndarray]]:
    """The ``clips`` photographs (val image names) and their ground-truth boxes (xyxy), from the official val
    ground truth (``ground_truth/wider_face_val.mat``)."""
    gt = load_ground_truth(widerface / "ground_truth")
    photos = [widerface / "val" / "images" / name for name in clips]
    boxes = [gt.boxes[image_key(photo)] for photo in photos]
    return photos, [np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1) for b in boxes]


CONFIGURATIONS = (  # (name, track, smooth, detect_every)
    ("detector only", False, False, 1),
    ("track", True, False, 1),
    ("track + smooth", True, True, 1),
    ("track, detector every 2", True, False, 2),
    ("track, detector every 3", True, False, 3),
    ("track, detector every 5", True, False, 5),
)


def run(video: Path, truth, poses, *, model=None, threads: int = 1) -> list[dict]:
    rows = []
    warm_up = Detector(model=model, threads=threads)  # the process's first stream runs slower (allocations, caches)
    try:
        with contextlib.closing(stream_faces(warm_up, stream.frames(str(video)))) as results:
            for _, _ in zip(range(100), results):
                pass
    finally:
        warm_up.close()
    for name, track, smooth, every in CONFIGURATIONS:
        detector = Detector(model=model, threads=threads)
        tracker = (FaceTracker(frame_rate=FPS, smooth=smooth, score_threshold=detector.score_threshold)
                   if track else None)
        predictions, times = [], []
        try:
            for result in stream_faces(detector, stream.frames(str(video)), tracker=tracker, detect_every=every):
                predictions.append(result.faces)
                times.append(time.perf_counter())
        finally:
            detector.close()
        # from the first frame out to the last: the steady stream, without the first frame's start-up
        row = {"configuration": name, "fps": (len(times) - 1) / (times[-1] - times[0]),
               **score_tracks(truth, poses, predictions)}
        if not track:
            row["id_switches"] = row["id_switches_in_view"] = row["ids_per_face"] = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m edgeface.benchmarks.tracking", description=__doc__.split("\n")[0])
    parser.add_argument("--widerface", type=Path, default=Path("../shared/data/widerface"))
    parser.add_argument("--out", type=Path, required=True, help="folder: video.mp4 and tracking.json")
    parser.add_argument("--model", help="a bundle (default: the default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames-per-clip", type=int, default=150)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photos, boxes = load_clips(args.widerface)
    video = args.out / "video.mp4"
    truth, poses = make_video(photos, boxes, video, frames_per_clip=args.frames_per_clip)
    rows = run(video, truth, poses, model=args.model, threads=args.threads)
    (args.out / "tracking.json").write_text(json.dumps({"frames": len(truth), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
