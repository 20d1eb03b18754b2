"""``Detector``: image(s) in, :class:`~edgeface.face.Face` lists out, on any runtime."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from edgeface.errors import EdgefaceError
from edgeface.face import Face
from edgeface.images import load_image
from edgeface.processing import Detections, ResizePolicy, postprocess, preprocess

ImageLike = str | os.PathLike | np.ndarray


class Detector:
    """RetinaFace face detector.

    >>> faces = Detector().detect("photo.jpg")                                  # list[Face], PyTorch
    >>> faces = Detector(runtime="onnxruntime", model="bundles/onnx-fp32").detect(img)
    >>> batches = Detector().detect([img_a, img_b])                             # list[list[Face]]

    Arrays are BGR uint8 (OpenCV's order). Defaults suit photographs; the WIDER FACE protocol uses
    ``score_threshold=0.02`` (see :mod:`edgeface.benchmarks.accuracy`). ``backbone``, ``weights`` and
    ``negative_slope`` choose the PyTorch model (torch runtime); ``model`` is an exported bundle.
    """

    def __init__(
        self,
        *,
        runtime=None,
        model: str | os.PathLike | None = None,
        backbone: str = "retinaface_mnet025",
        weights: str | os.PathLike | None = "default",
        negative_slope: float | None = None,
        device: str = "cpu",
        threads: int | None = None,
        resize: str | ResizePolicy | None = None,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
    ) -> None:
        from edgeface.runtimes import Runtime, open_runtime

        if isinstance(runtime, Runtime):
            self.runtime = runtime
        else:
            options = {"device": device, "threads": threads}
            if model is None and runtime in (None, "torch"):
                options.update(weights=weights, backbone=backbone, negative_slope=negative_slope)
            self.runtime = open_runtime(runtime, model=model, **options)
        native = self.runtime.resize
        self.resize = ResizePolicy.parse(resize) if resize is not None else native
        if native.mode == "fixed" and self.resize != native:
            raise EdgefaceError(f"this model has a fixed input size ({native}); it cannot run with resize "
                                f"{self.resize} (export another size, or a dynamic ONNX model)")
        self.anchors = self.runtime.manifest.anchors
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.top_k = top_k
        self.keep_top_k = keep_top_k

    @property
    def name(self) -> str:
        m = self.runtime.manifest
        return f"{m.model['name']} {m.target}/{m.precision} ({self.runtime.name})"

    def detect_arrays(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                      ) -> list[Detections]:
        """BGR uint8 images -> detections as arrays (batched as far as the model allows). ``timings``, when
        given, accumulates the seconds spent in each stage under "pre", "infer" and "post"."""
        clock = time.perf_counter
        step = self.runtime.max_batch or len(images)
        results = []
        for start in range(0, len(images), step):
            t0 = clock()
            chunk = images[start:start + step]
            batch, letterboxes = preprocess(chunk, policy=self.resize, mean_bgr=self.runtime.mean_bgr,
                                            pad_bgr=self.runtime.pad_bgr, layout=self.runtime.layout)
            if self.runtime.max_batch and len(batch) < self.runtime.max_batch and not self.runtime.manifest.dynamic:
                pad = np.zeros((self.runtime.max_batch - len(batch), *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])  # a static batch is filled up, the extra rows ignored
            t1 = clock()
            out = self.runtime.infer(batch)
            t2 = clock()
            results += [
                postprocess(out["loc"][i], out["conf"][i], out["landmarks"][i], letterbox, anchors=self.anchors,
                            score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                            top_k=self.top_k, keep_top_k=self.keep_top_k)
                for i, letterbox in enumerate(letterboxes)
            ]
            if timings is not None:
                for stage, seconds in (("pre", t1 - t0), ("infer", t2 - t1), ("post", clock() - t2)):
                    timings[stage] = timings.get(stage, 0.0) + seconds
        return results

    def detect(self, image: ImageLike | Sequence[ImageLike]) -> list[Face] | list[list[Face]]:
        """Faces of one image (path or array), or one list per image for a list of images."""
        if isinstance(image, (list, tuple)):
            return [d.to_faces() for d in self.detect_arrays([load_image(i) for i in image])]
        return self.detect_arrays([load_image(image)])[0].to_faces()

    def close(self) -> None:
        self.runtime.close()
