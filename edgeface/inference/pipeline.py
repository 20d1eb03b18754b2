"""Frames in, faces out, with the stages of a stream overlapped: decoding, pre-processing, inference,
post-processing (decode + NMS) and tracking each run in a thread of their own, joined by bounded queues.

While the network runs on frame k, frame k+1 is pre-processed and frame k+2 decoded, so the throughput approaches
1 / (the slowest stage) instead of 1 / (the sum of the stages) wherever the cores allow: OpenCV and the runtimes
(onnxruntime, LiteRT, ncnn, OpenVINO, ...) release Python's GIL while they work. One thread per stage and FIFO
queues keep the frames in order; a queue of ``queue_size`` frames bounds the memory (a camera faster than the
model waits, it does not pile up frames). Closing the iterator (or an exception in any stage, Ctrl-C included)
stops every stage before it returns, the inference thread included, so that the caller may close the runtime.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.face import Face

# The stages, in order, under the names their seconds are reported by (FrameResult.seconds); "track" runs only with
# a tracker, "pre", "infer" and "post" only on the frames the detector runs on.
STAGES = ("decode", "pre", "infer", "post", "track")
POLL_SECONDS = 0.05  # how often a waiting stage looks whether the stream was stopped


@dataclass
class FrameResult:
    """One frame of the stream. ``frame`` is the BGR image, or the EdgefaceError saying why the source could not
    deliver it (an unreadable image of a folder, a truncated video: ``faces`` is then empty). ``detected`` is False
    for a frame the detector skipped (``detect_every``), whose faces the tracker carried over. ``seconds`` maps
    each stage the frame went through to the seconds it spent there."""

    name: str
    frame: np.ndarray | EdgefaceError
    faces: list[Face] = field(default_factory=list)
    detected: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    # between the stages
    batch: Any = None
    letterboxes: Any = None
    outputs: Any = None


class _Failure:
    """An exception raised in a stage thread, handed down the queues to the caller's thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def stream_faces(detector, frames: Iterator[tuple[str, np.ndarray | EdgefaceError]], *, tracker=None,
                 detect_every: int = 1, pipelined: bool = True, queue_size: int = 2,
                 decoding: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> Iterator[FrameResult]:
    """Faces of each frame of ``frames`` ((name, BGR uint8 frame or EdgefaceError) pairs, as
    :func:`edgeface.inference.stream.frames` yields them), in order, as :class:`FrameResult`.

    ``detector`` is a :class:`~edgeface.inference.detector.Detector`. ``tracker`` (a
    :class:`~edgeface.inference.tracking.FaceTracker`) gives the faces their ``track_id``; with ``detect_every`` N
    the detector runs on every Nth frame only and the tracker carries the faces through the others (what real-time
    apps on a Pi or a Jetson do for speed). ``pipelined=False`` runs the same stages one after the other in the
    caller's thread (the baseline of ``benchmarks/streaming.py``). ``decoding`` wraps every read of ``frames`` (the
    ``edgeface`` command silences the image libraries there). ``frames``, when it has a ``close`` (a generator),
    is closed by the thread that reads it.

    Raises ValueError for ``detect_every`` < 1, or > 1 without a tracker; whatever a stage raises, re-raised in the
    caller's thread after every stage has stopped.
    """
    if detect_every < 1 or (detect_every > 1 and tracker is None):  # checked now, not at the first frame
        raise ValueError("detect_every must be 1, or N > 1 with a tracker to carry the faces between detections")
    stages = [
        _Stage("pre", lambda r: _prepare(detector, r)),
        _Stage("infer", lambda r: _infer(detector, r)),
        _Stage("post", lambda r: _finish(detector, r)),
    ]
    if tracker is not None:
        stages.append(_Stage("track", lambda r: _track(tracker, r), every_frame=True))
    read = _Reader(frames, detect_every, decoding)
    return _pipelined(read, stages, queue_size) if pipelined else _sequential(read, stages)


class _Stage:
    """One stage: its work on a frame, timed. The detector's stages skip the frames it does not run on."""

    def __init__(self, name: str, work: Callable[[FrameResult], None], *, every_frame: bool = False):
        self.name = name
        self.work = work
        self.every_frame = every_frame

    def __call__(self, result: FrameResult) -> None:
        if isinstance(result.frame, EdgefaceError) or not (result.detected or self.every_frame):
            return
        started = time.perf_counter()
        self.work(result)
        result.seconds[self.name] = time.perf_counter() - started


class _Reader:
    """Reads the frames: the decoding stage."""

    def __init__(self, frames, detect_every: int, decoding):
        self.frames = frames
        self.detect_every = detect_every
        self.decoding = decoding
        self.index = 0

    def next(self) -> FrameResult | None:
        with self.decoding():
            started = time.perf_counter()
            item = next(self.frames, None)
            seconds = time.perf_counter() - started
        if item is None:
            return None
        name, frame = item
        result = FrameResult(name, frame, seconds={"decode": seconds})
        if not isinstance(frame, EdgefaceError):
            result.detected = self.index % self.detect_every == 0
            self.index += 1
        return result

    def close(self) -> None:
        close = getattr(self.frames, "close", None)  # a generator (a video or a camera: released now); any iterator
        if close is not None:
            with self.decoding():  # the video's library may have something to say
                close()


def _prepare(detector, result: FrameResult) -> None:
    result.batch, result.letterboxes = detector.prepare([result.frame])


def _infer(detector, result: FrameResult) -> None:
    result.outputs = detector.forward(result.batch, result.letterboxes)
    result.batch = None  # the input tensor is not needed further down


def _finish(detector, result: FrameResult) -> None:
    result.faces = detector.finish(result.outputs, result.letterboxes)[0][1].to_faces()
    result.outputs = None


def _track(tracker, result: FrameResult) -> None:
    result.faces = tracker.update(result.frame, result.faces if result.detected else None)


def _sequential(read: _Reader, stages: list[_Stage]) -> Iterator[FrameResult]:
    try:
        while (result := read.next()) is not None:
            for stage in stages:
                stage(result)
            yield result
    finally:
        read.close()


def _pipelined(read: _Reader, stages: list[_Stage], queue_size: int) -> Iterator[FrameResult]:
    stop = threading.Event()
    queues = [queue.Queue(maxsize=queue_size) for _ in range(len(stages) + 1)]

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                pass
        return _END

    def reading() -> None:
        try:
            while not stop.is_set() and (result := read.next()) is not None:
                if not put(queues[0], result):
                    break
            read.close()  # before the end is announced: an error closing the source still reaches the caller
            put(queues[0], _END)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, Ctrl-C included
            try:
                read.close()
            finally:
                put(queues[0], _Failure(exc))

    def working(stage: _Stage, inbox: queue.Queue, outbox: queue.Queue) -> None:
        try:
            while (item := get(inbox)) is not _END and not isinstance(item, _Failure):
                stage(item)
                if not put(outbox, item):
                    return
            put(outbox, item)
        except BaseException as exc:  # noqa: BLE001
            put(outbox, _Failure(exc))

    reader = threading.Thread(target=reading, name="edgeface-decode", daemon=True)
    workers = [threading.Thread(target=working, args=(stage, queues[i], queues[i + 1]), daemon=True,
                                name=f"edgeface-{stage.name}") for i, stage in enumerate(stages)]
    reader.start()
    for worker in workers:
        worker.start()
    try:
        while True:
            try:
                item = queues[-1].get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        interrupted = None
        for worker in workers:  # the inference thread is done with the runtime before the caller closes it,
            while worker.is_alive():  # even when Ctrl-C is pressed again while it finishes its frame
                try:
                    worker.join()
                except KeyboardInterrupt as exc:
                    interrupted = exc
        reader.join(timeout=5.0)  # a camera read may block for a frame; the thread closes the source itself
        if interrupted is not None:
            raise interrupted
