"""Runtime registry. Adding a backend = one module with a :class:`Runtime` subclass + one line here."""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any

from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import load_bundle
from edgeface.core.errors import EdgefaceError
from edgeface.core.processing import MAX_THREADS

_RUNTIMES = {
    "torch": "edgeface.runtimes.torch:TorchRuntime",
    "onnxruntime": "edgeface.runtimes.onnxruntime:OnnxRuntime",
    "tflite": "edgeface.runtimes.tflite:TFLiteRuntime",
    "tensorrt": "edgeface.runtimes.tensorrt:TensorRTRuntime",
    "coreml": "edgeface.runtimes.coreml:CoreMLRuntime",
}
# The runtime that runs each export target when none is named.
DEFAULT_FOR_TARGET = {"onnx": "onnxruntime", "tflite": "tflite", "tensorrt": "tensorrt", "coreml": "coreml",
                      "torch": "torch"}


def list_runtimes() -> list[str]:
    return list(_RUNTIMES)


def get_runtime_class(name: str) -> type[Runtime]:
    if name not in _RUNTIMES:
        close = difflib.get_close_matches(name, list(_RUNTIMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EdgefaceError(f"unknown runtime {name!r}{hint} (runtimes: {', '.join(_RUNTIMES)})")
    module, cls = _RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def runtimes_for(target: str) -> list[str]:
    """The runtimes that run bundles of ``target``, by their declared ``targets``."""
    return [name for name in _RUNTIMES if target in get_runtime_class(name).targets]


def check_runs(runtime: str, bundle) -> None:
    """Refuse a runtime that does not run this bundle's target, before it loads anything (an onnxruntime session
    on a .tflite file only says "InvalidProtobuf")."""
    target = bundle.manifest.target
    if target not in get_runtime_class(runtime).targets:
        others = runtimes_for(target)
        raise EdgefaceError(f"bundle {bundle.path} is a {target} bundle; runtimes that run it: "
                            f"{', '.join(others) or 'none'}")


def open_runtime(runtime: str | None = None, *, model: str | os.PathLike | None = None, **options: Any) -> Runtime:
    """Open ``model`` (a bundle directory) with ``runtime`` (default: the one for the bundle's target); without
    a bundle, the torch runtime on ``weights=...``."""
    device, threads = options.get("device"), options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise EdgefaceError(f"threads {threads!r}: give a whole number 1-{MAX_THREADS}")
    if runtime is not None:  # an unknown name or device before the bundle is read
        get_runtime_class(runtime).check_device(device)
    bundle = load_bundle(model) if model is not None else None
    if runtime is None:
        runtime = DEFAULT_FOR_TARGET[bundle.manifest.target] if bundle else "torch"
    cls = get_runtime_class(runtime)
    cls.check_device(device)  # each runtime takes its own devices (Core ML compute units, onnxruntime providers)
    if bundle is None and runtime != "torch":
        raise EdgefaceError(f"the {runtime} runtime needs a bundle (--model DIR made by `edgeface export`)")
    if bundle is not None:
        check_runs(runtime, bundle)
    return cls.open(bundle, **options)


__all__ = ["Runtime", "list_runtimes", "get_runtime_class", "open_runtime", "runtimes_for", "check_runs",
           "DEFAULT_FOR_TARGET"]
