"""The one interface every backend implements. A runtime only moves tensors: it takes a pre-processed batch in the
layout its manifest states and returns the raw outputs by name in the canonical layout (N, A, 4|2|10), float32.
Pre- and post-processing stay in :mod:`edgeface.core.processing`, shared by all."""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError
from edgeface.core.manifest import Manifest
from edgeface.core.processing import ResizePolicy


class Runtime(ABC):
    """Subclasses declare ``name``, ``targets``, ``default_for``, ``concurrent``, ``devices``, ``options``,
    ``extra`` and ``libraries`` and implement :meth:`open` and :meth:`infer`. A runtime module imports its backend
    library in :meth:`open` (``require``), so the registry reads every declaration without loading any backend.

    Threads: one runtime (and the :class:`~edgeface.inference.detector.Detector` holding it) may be shared by any
    number of threads; :meth:`infer` is safe to call from all of them at once. Backends whose inference state is
    not reentrant (``concurrent = False``: tflite's interpreter, TensorRT's execution context, Core ML's model) run
    one call at a time under :attr:`lock` and the others wait; ``concurrent = True`` backends (onnxruntime's
    session, torch in inference mode) run the calls in parallel. For parallel throughput on a serialising backend,
    open one runtime per thread.
    """

    name: ClassVar[str]
    # Bundle targets (manifest ``target``) this runtime runs; :func:`edgeface.runtimes.open_runtime` refuses
    # any other before loading anything.
    targets: ClassVar[tuple[str, ...]] = ()
    # Whether infer() may run in several threads at once; False: calls are serialised under self.lock.
    concurrent: ClassVar[bool] = True
    # The ``device`` values this runtime accepts (:meth:`check_device`); "cuda:N" stands for cuda:0, cuda:1, ...
    # "cpu" is every command's default (``--device cpu``), so every runtime takes it.
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # The bundle targets this runtime runs when none is named (one runtime per target; a subset of ``targets``).
    default_for: ClassVar[tuple[str, ...]] = ()
    # The keyword options of :meth:`open` it reads besides ``device``; any other is refused by
    # :func:`edgeface.runtimes.open_runtime`, naming the runtimes that take it. ``threads`` is accepted by every
    # runtime (boards and bench set it for all): those that do not list it have no CPU thread setting.
    options: ClassVar[tuple[str, ...]] = ()
    # The pip extra that installs its backend library (`pip install edgeface[EXTRA]`); None: the base install.
    extra: ClassVar[str | None] = None
    # Distributions whose versions a bench report records for it.
    libraries: ClassVar[tuple[str, ...]] = ()
    # Whether this runtime was opened on the bundle's end-to-end model (decode + NMS in the graph): the Detector
    # then calls :meth:`infer_end2end` instead of :meth:`infer` and decodes nothing.
    end2end: bool = False

    def __init__(self, manifest: Manifest, *, source: str) -> None:
        self.manifest = manifest
        self.source = source  # bundle path or checkpoint, for reports
        self.lock = threading.Lock()

    @classmethod
    def check_device(cls, device: Any) -> None:
        """Refuse a ``device`` this runtime does not take, in one line naming the ones it does."""
        if device is None or _device_matches(str(device), cls.devices):
            return
        raise EdgefaceError(f"unknown device {device!r} for the {cls.name} runtime: use "
                            f"{', '.join(cls.devices)}")

    @classmethod
    @abstractmethod
    def open(cls, bundle: Bundle | None, **options: Any) -> "Runtime":
        """Open a bundle (torch also accepts ``weights=...`` without one)."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for one pre-processed batch, by name, (N, A, k) float32."""

    def infer_end2end(self, batch: np.ndarray, *, score_threshold: float, iou_threshold: float, pixel: float
                      ) -> dict[str, np.ndarray]:
        """Final faces of one pre-processed image (batch 1) from the bundle's end-to-end model: ``boxes`` (K, 4),
        ``scores`` (K,), ``landmarks`` (K, 10), float32, in input pixels, highest score first (``pixel``: one image
        pixel in input pixels, for the reference's pixel-inclusive NMS). Runtimes that run none raise
        EdgefaceError."""
        raise EdgefaceError(f"the {self.name} runtime runs no end-to-end model")

    # What the shared pre-processing must produce for this model, all read from the manifest.
    @property
    def layout(self) -> str:
        return self.manifest.input.layout

    @property
    def mean_bgr(self) -> tuple[float, float, float]:
        return self.manifest.mean_bgr

    @property
    def pad_bgr(self) -> tuple[float, float, float]:
        """The colour padding must have before any mean subtraction: the model's mean (zero after it)."""
        return tuple(self.manifest.preprocessing["mean_bgr"])

    @property
    def resize(self) -> ResizePolicy:
        return ResizePolicy.parse(self.manifest.preprocessing["resize"])

    @property
    def max_batch(self) -> int | None:
        batch = self.manifest.input.shape[0]
        if isinstance(batch, int):
            return batch
        return (self.manifest.dynamic or {}).get("batch", [None, None, None])[2]

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "source": self.source, "target": self.manifest.target,
                "precision": self.manifest.precision}

    def close(self) -> None:
        """Release the backend's resources (sessions, device memory)."""

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What infer() says on a runtime opened on the end-to-end model.
END2END_NOT_RAW = ("this runtime runs the end-to-end model: its outputs are final faces (infer_end2end), not the "
                   "network's")


def require_end2end_model(bundle: Bundle) -> None:
    """Refuse ``end2end=True`` on a bundle exported without it, in one line suggesting the export at the bundle's
    own input size (640x640 for a dynamic one)."""
    if "end2end" in bundle.manifest.files:
        return
    spec = bundle.manifest.input
    height, width = spec.shape[1:3] if spec.layout == "NHWC" else spec.shape[2:4]
    size = f"{height}x{width}" if isinstance(height, int) and isinstance(width, int) else "640x640"
    command = f"edgeface export --target {bundle.manifest.target} --imgsz {size} --end2end"  # parses: tests
    raise EdgefaceError(f"bundle {bundle.path} has no end-to-end model: export it with `{command}`")


def check_end2end_io(manifest: Manifest, source: str, inputs: list[str], outputs: list[str]) -> None:
    """The end-to-end model's input and output names against the manifest's ``target_info.end2end``."""
    described = manifest.target_info.get("end2end") or {}
    expected = sorted(described.get("inputs", {})), sorted(described.get("outputs", {}))
    if (sorted(inputs), sorted(outputs)) != expected:
        raise EdgefaceError(f"bundle {source}: the end-to-end model's inputs {sorted(inputs)} and outputs "
                            f"{sorted(outputs)} are not what its manifest's target_info.end2end describes; re-export "
                            "the bundle")


def _device_matches(device: str, accepted: tuple[str, ...]) -> bool:
    for name in accepted:
        if name.endswith(":N"):
            if re.fullmatch(re.escape(name[:-1]) + r"\d+", device):
                return True
        elif device == name:
            return True
    return False
