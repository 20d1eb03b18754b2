"""The streaming pipeline of `edgeface run`: a thread per stage, frames in order, errors and early stops handled."""

import threading

import cv2
import numpy as np
import pytest

from edgeface import EdgefaceError
from edgeface.inference.pipeline import stream_faces


@pytest.fixture(scope="module")
def frames(astronaut_path):
    """Frames of different content (the bundled photograph, shifted and scaled), so that an out-of-order frame shows."""
    image = cv2.imread(str(astronaut_path))
    return [(f"f{i:02d}", cv2.resize(np.roll(image, 9 * i, axis=1), None, fx=0.3 + 0.02 * i, fy=0.3 + 0.02 * i))
            for i in range(12)]


def _stage_threads():
    return [t for t in threading.enumerate() if t.name.startswith("edgeface-")]


def test_pipelined_gives_the_sequential_faces_in_order(frames, default_detector):
    runs = {pipelined: list(stream_faces(default_detector, iter(frames), pipelined=pipelined))
            for pipelined in (False, True)}
    assert [r.name for r in runs[True]] == [name for name, _ in frames] == [r.name for r in runs[False]]
    assert [r.faces for r in runs[True]] == [r.faces for r in runs[False]]
    assert all(len(r.faces) == 1 for r in runs[True])
    assert all(set(r.seconds) == {"decode", "pre", "infer", "post"} for r in runs[True])
    assert not _stage_threads()


def test_a_source_error_reaches_the_caller_after_the_frames_before_it(frames, default_detector):
    def failing():
        yield from frames[:3]
        raise RuntimeError("camera unplugged")

    seen = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        for result in stream_faces(default_detector, failing()):
            seen.append(result.name)
    assert seen == ["f00", "f01", "f02"]
    assert not _stage_threads()


def test_an_unreadable_frame_passes_through_in_its_place(frames, default_detector):
    bad = EdgefaceError("b.jpg could not be decoded")
    results = list(stream_faces(default_detector, iter([frames[0], ("b", bad), frames[1]])))
    assert [r.name for r in results] == ["f00", "b", "f01"]
    assert results[1].frame is bad and results[1].faces == [] and set(results[1].seconds) == {"decode"}


def test_closing_early_stops_every_stage_and_closes_the_source(frames, default_detector):
    closed = threading.Event()

    def source():
        try:
            yield from frames * 10
        finally:
            closed.set()

    results = stream_faces(default_detector, source(), queue_size=1)
    assert next(results).name == "f00"
    results.close()
    assert closed.is_set() and not _stage_threads()


def test_detect_every_needs_a_tracker(frames, default_detector):
    with pytest.raises(ValueError, match="tracker"):  # at the call, not at the first frame
        stream_faces(default_detector, iter(frames), detect_every=2)
