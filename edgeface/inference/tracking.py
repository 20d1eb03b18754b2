"""Face identities across video frames: ByteTrack association, optical flow between detections, landmark smoothing.

- **Identities**: ByteTrack (Zhang et al., ECCV 2022, arXiv 2110.06864), as implemented by Roboflow's ``trackers``
  library: a Kalman filter per face and IoU association in two rounds, high-score faces first, then the
  low-score ones, so a face whose score dips keeps its track.
- **Detector every N frames**: on a frame the detector skips, each face is carried over by pyramidal Lucas-Kanade
  optical flow (OpenCV ``calcOpticalFlowPyrLK``, checked forwards and backwards) on its landmarks and on points
  inside its box, and a similarity transform fitted to the points that agree (``estimateAffinePartial2D``,
  least-median): the box and landmarks follow the face's real motion, not a constant-velocity guess.
- **Landmark smoothing** (optional): the One Euro filter (Casiez, Roussel and Vogel, CHI 2012) on each coordinate
  of each tracked face, by its authors' ``OneEuroFilter`` package: strong smoothing when a face is still (no jitter
  on a still face), little when it moves (little lag).

Needs ``pip install edgeface[track]``.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.face import Face

TRACK_EXTRA = "track"
# Points per face for the optical flow: its 5 landmarks and a GRID x GRID lattice over the middle of its box.
GRID = 4
GRID_SPAN = 0.6  # of the box's width and height, centred: the face, not the background at its corners
FLOW_WINDOW = (15, 15)
FLOW_LEVELS = 3
FLOW_AGREEMENT_PX = 1.0  # forward-backward error above which a point's flow is not trusted
MIN_FLOW_POINTS = 4
# One Euro filter settings for coordinates in pixels at the stream's frame rate: 1 Hz minimum cut-off (the
# authors' suggested start), speed coefficient chosen on the synthetic WIDER video of benchmarks/tracking.py.
SMOOTH_MIN_CUTOFF = 1.0
SMOOTH_BETA = 0.3


def _require():
    try:
        import OneEuroFilter  # noqa: F401
        import supervision  # noqa: F401
        import trackers  # noqa: F401
    except ModuleNotFoundError as exc:
        raise EdgefaceError(f"tracking needs {exc.name}, which is not installed here; install it with "
                            f"`pip install edgeface[{TRACK_EXTRA}]`") from None


class FaceTracker:
    """Gives the faces of consecutive video frames their ``track_id`` (1, 2, ... in the order the tracks were
    confirmed), and carries them through frames the detector skips.

    ``frame_rate`` (frames per second of the stream) scales how long a lost track is kept (``lost_seconds``) and
    the smoothing's time base. ``smooth`` turns on One Euro smoothing of the boxes and landmarks.
    ``score_threshold`` is the detector's: every face it reports may start a track (ByteTrack's activation and
    high-score thresholds; the library's defaults, 0.7 and 0.6, would leave faces scoring 0.5 to 0.7 without id).
    A new face gets its id on its second frame (ByteTrack's confirmation, against single-frame false positives);
    until then ``track_id`` is None.

    Not thread-safe: one tracker per stream, fed its frames in order. Raises EdgefaceError when the ``track`` extra is
    not installed.
    """

    def __init__(self, *, frame_rate: float = 30.0, smooth: bool = False, lost_seconds: float = 1.0,
                 score_threshold: float = 0.5) -> None:
        _require()
        from trackers import ByteTrackTracker

        if not frame_rate > 0:
            raise EdgefaceError(f"frame rate must be above 0, not {frame_rate}")
        self.frame_rate = float(frame_rate)
        self.smooth = smooth
        # ByteTrack counts lost frames as lost_track_buffer x frame_rate / 30
        self._tracker = ByteTrackTracker(lost_track_buffer=max(1, round(30 * lost_seconds)), frame_rate=frame_rate,
                                         track_activation_threshold=score_threshold,
                                         high_conf_det_threshold=score_threshold)
        self._lost_frames = max(1, round(lost_seconds * frame_rate))
        self._ids: dict[int, int] = {}  # the library's track ids (shared by every tracker of the process) -> ours
        self._filters: dict[int, tuple[list, int]] = {}  # track id -> (one filter per coordinate, last frame)
        self._previous: tuple[np.ndarray, list[Face]] | None = None
        self._frame = 0

    def update(self, frame: np.ndarray, faces: list[Face] | None) -> list[Face]:
        """The faces of the next ``frame`` (H x W x 3 BGR uint8) with their ``track_id``: the detector's ``faces``,
        or None on a frame the detector skipped, whose faces are carried over from the previous frame by optical
        flow (a face the flow loses is left out until the next detection)."""
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
        if faces is None:
            # a folder's images may change size: nothing to carry across
            same_size = self._previous is not None and self._previous[0].shape == gray.shape
            faces = self._carry(gray) if same_size else []
        tracked = [dataclasses.replace(face, track_id=track_id)
                   for face, track_id in zip(faces, self._associate(faces))]
        self._previous = (gray, tracked)  # unsmoothed: the flow follows the image, the filter runs once per frame
        out = [self._smoothed(face) if self.smooth and face.track_id is not None else face for face in tracked]
        self._forget_old_filters()
        self._frame += 1
        return out

    def _associate(self, faces: list[Face]) -> list[int | None]:
        import supervision as sv

        if faces:
            detections = sv.Detections(xyxy=np.array([f.box for f in faces], np.float32).reshape(-1, 4),
                                       confidence=np.array([f.score for f in faces], np.float32),
                                       data={"index": np.arange(len(faces))})
        else:
            detections = sv.Detections.empty()
        tracked = self._tracker.update(detections)
        ids: list[int | None] = [None] * len(faces)
        if len(tracked):
            for index, library_id in zip(tracked.data["index"], tracked.tracker_id):
                if library_id >= 0:  # -1: not confirmed yet
                    ids[int(index)] = self._ids.setdefault(int(library_id), len(self._ids) + 1)
        return ids

    def _carry(self, gray: np.ndarray) -> list[Face]:
        """The previous frame's faces moved to ``gray`` by optical flow."""
        previous_gray, previous_faces = self._previous
        if not previous_faces:
            return []
        points = np.concatenate([_flow_points(face) for face in previous_faces]).reshape(-1, 1, 2)
        moved, found, _ = cv2.calcOpticalFlowPyrLK(previous_gray, gray, points, None, winSize=FLOW_WINDOW,
                                                   maxLevel=FLOW_LEVELS)
        back, found_back, _ = cv2.calcOpticalFlowPyrLK(gray, previous_gray, moved, None, winSize=FLOW_WINDOW,
                                                       maxLevel=FLOW_LEVELS)
        agree = (found.ravel() == 1) & (found_back.ravel() == 1) & (
            np.linalg.norm((back - points).reshape(-1, 2), axis=1) < FLOW_AGREEMENT_PX)
        per_face = 5 + GRID * GRID
        carried = []
        for k, face in enumerate(previous_faces):
            rows = slice(k * per_face, (k + 1) * per_face)
            good = agree[rows]
            if good.sum() < MIN_FLOW_POINTS:
                continue
            src = points[rows][good].reshape(-1, 2)
            dst = moved[rows][good].reshape(-1, 2)
            matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
            if matrix is None:
                continue
            carried.append(_moved(face, matrix))
        return carried

    def _smoothed(self, face: Face) -> Face:
        from OneEuroFilter import OneEuroFilter

        values = [*face.box, *(v for point in face.landmarks for v in point)]
        filters, _ = self._filters.get(face.track_id, (None, 0))
        if filters is None:
            filters = [OneEuroFilter(self.frame_rate, SMOOTH_MIN_CUTOFF, SMOOTH_BETA) for _ in values]
        self._filters[face.track_id] = (filters, self._frame)
        timestamp = self._frame / self.frame_rate
        out = [f(v, timestamp) for f, v in zip(filters, values)]
        return dataclasses.replace(face, box=tuple(out[:4]),
                                   landmarks=tuple((out[i], out[i + 1]) for i in range(4, 14, 2)))

    def _forget_old_filters(self) -> None:
        for track_id in [t for t, (_, seen) in self._filters.items() if self._frame - seen > self._lost_frames]:
            del self._filters[track_id]


def _flow_points(face: Face) -> np.ndarray:
    """(5 + GRID^2, 2) float32: the landmarks, then a lattice over the middle of the box."""
    x1, y1, x2, y2 = face.box
    cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * GRID_SPAN / 2, (y2 - y1) * GRID_SPAN / 2
    xs, ys = np.meshgrid(np.linspace(cx - half_w, cx + half_w, GRID), np.linspace(cy - half_h, cy + half_h, GRID))
    lattice = np.stack([xs.ravel(), ys.ravel()], axis=1)
    return np.concatenate([np.asarray(face.landmarks), lattice]).astype(np.float32)


def _moved(face: Face, matrix: np.ndarray) -> Face:
    """``face`` under the 2 x 3 similarity ``matrix``: landmarks transformed, the box's centre transformed and its
    size scaled (it stays axis-aligned)."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    landmarks = cv2.transform(np.asarray(face.landmarks, np.float64).reshape(-1, 1, 2), matrix).reshape(-1, 2)
    x1, y1, x2, y2 = face.box
    (cx, cy), = cv2.transform(np.array([[[(x1 + x2) / 2, (y1 + y2) / 2]]]), matrix).reshape(1, 2)
    half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    return dataclasses.replace(face, box=(float(cx - half_w), float(cy - half_h), float(cx + half_w),
                                          float(cy + half_h)),
                               landmarks=tuple((float(x), float(y)) for x, y in landmarks))
