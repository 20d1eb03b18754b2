"""Core ML bundles (``model.mlpackage``, an ML Program).

:class:`CoreMLRuntime` runs the package with Core ML itself, which exists on Apple platforms only (macOS here;
iOS apps load the package with the Core ML framework directly). Everywhere else ``open`` says so and names the
bundles that do run there. (The Core ML export checks its packages on any platform with an interpreter of their
MIL program: :mod:`edgeface.export.coreml_mil`.)
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, first_line, require
from edgeface.core.manifest import OUTPUTS

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE",
                 # short forms
                 "cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ne": "CPU_AND_NE", "ane": "CPU_AND_NE"}
NOT_APPLE = ("Core ML runs on Apple platforms only (macOS / iOS), not on {platform}. Run this bundle on a Mac or "
             "in an iOS app, or export an onnx bundle (`edgeface export --target onnx`, onnxruntime runtime) or a "
             "tflite bundle (`edgeface export --target tflite`) for this machine")


def is_apple() -> bool:
    return sys.platform == "darwin"


def _compute_units(ct, compute_units: Any, device: str | None):
    """``compute_units`` (a ``coremltools.ComputeUnit`` or its name) wins; ``device`` is read only when it names
    Core ML units ("ane", "gpu", "all", ...). ``device="cpu"`` is every command's default and does not restrict
    Core ML: pass ``compute_units="cpu_only"`` for that."""
    if isinstance(compute_units, ct.ComputeUnit):
        return compute_units
    wanted = compute_units
    if wanted is None and device and device.lower() != "cpu":
        wanted = device
    if wanted is None:
        return ct.ComputeUnit.ALL
    key = str(wanted).lower()
    if key not in COMPUTE_UNITS and str(wanted).upper() not in ct.ComputeUnit.__members__:
        raise EdgefaceError(f"unknown Core ML compute units {wanted!r}; use one of "
                            f"{', '.join(k for k in COMPUTE_UNITS if '_' in k or k == 'all')}")
    return ct.ComputeUnit[COMPUTE_UNITS.get(key, str(wanted).upper())]


class CoreMLRuntime(Runtime):
    """``infer`` takes what the shared pre-processing makes for this manifest: NCHW float32, BGR; for an image
    input (``mean_in_graph``) the mean is not subtracted, so values are the 0-255 pixels, letterbox padding in the
    mean colour. Each batch item is one prediction (Core ML bundles have batch 1)."""

    name = "coreml"
    targets = ("coreml",)
    concurrent = False  # one MLModel predicts for one caller at a time; calls take turns under self.lock
    # Core ML compute units by name (any case); "cpu", every command's default, does not restrict them.
    devices = ("cpu", *(k for k in COMPUTE_UNITS if k != "cpu"))
    default_for = ("coreml",)
    options = ("compute_units",)  # no CPU thread setting: Core ML schedules its own
    extra = "coreml"
    libraries = ("coremltools",)

    @classmethod
    def check_device(cls, device: Any) -> None:
        super().check_device(None if device is None else str(device).lower())

    def __init__(self, bundle: Bundle, *, compute_units: Any = None, device: str | None = None) -> None:
        ct = require("coremltools", self.extra, "Running Core ML bundles")
        super().__init__(bundle.manifest, source=str(bundle.path))
        self._ct = ct
        self.compute_units = _compute_units(ct, compute_units, device)
        self.image_input = self.manifest.target_info.get("input_type", "tensor") == "image"
        self.input_name = self.manifest.input.name
        if self.image_input:
            require("PIL.Image", self.extra, "Feeding images to a Core ML model")
        try:
            self.model = ct.models.MLModel(str(bundle.file()), compute_units=self.compute_units)
        except Exception as exc:  # coremltools raises plain Exceptions (compile / load failures)
            raise EdgefaceError(f"Core ML could not load {bundle.file()} ({first_line(exc)})") from None

    @classmethod
    def open(cls, bundle: Bundle | None, *, compute_units: Any = None, device: str | None = None,
             **_: Any) -> "CoreMLRuntime":
        """``compute_units``: all (default) | cpu_only | cpu_and_gpu | cpu_and_ne. ``threads`` has no Core ML
        counterpart and is ignored."""
        if not is_apple():
            raise EdgefaceError(NOT_APPLE.format(platform=sys.platform))
        if bundle is None:
            raise EdgefaceError("the coreml runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target coreml`)")
        return cls(bundle, compute_units=compute_units, device=device)

    def _feed(self, item: np.ndarray) -> dict[str, Any]:
        """One (3, H, W) BGR float item -> the model's input."""
        if self.image_input:
            from PIL import Image

            # Core ML takes RGB PIL images for RGB *and* BGR image inputs (coremltools checks mode == "RGB") and
            # reorders the channels itself to the model's BGR colour layout: hand it RGB pixels.
            pixels = np.clip(np.rint(item), 0, 255).astype(np.uint8).transpose(1, 2, 0)[:, :, ::-1]
            return {self.input_name: Image.fromarray(np.ascontiguousarray(pixels))}  # uint8 HxWx3: mode RGB
        return {self.input_name: np.ascontiguousarray(item[None], dtype=np.float32)}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise EdgefaceError(f"the coreml runtime takes an NCHW batch with 3 channels, got shape {batch.shape}")
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for item in batch:
            feed = self._feed(item)
            with self.lock:
                out = self.model.predict(feed)
            missing = [name for name in OUTPUTS if name not in out]
            if missing:
                raise EdgefaceError(f"{self.source}: the Core ML model has no output(s) {missing} "
                                    f"(it returned {sorted(out)}); re-export the bundle")
            for name in OUTPUTS:
                results[name].append(np.asarray(out[name], dtype=np.float32).reshape(1, -1, _width(name)))
        return {name: np.concatenate(parts) for name, parts in results.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compute_units": self.compute_units.name, "coremltools": self._ct.__version__}

    def close(self) -> None:
        self.model = None


def _width(name: str) -> int:
    return {"loc": 4, "conf": 2, "landmarks": 10}[name]
