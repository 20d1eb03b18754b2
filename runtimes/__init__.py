"""Runtime registry. Adding a backend = one module with a :class:`Runtime` subclass that declares itself (name,
targets, default_for, devices, options, extra, libraries) + one line in :data:`RUNTIMES`. Runtime modules import
their backend library when they open, so reading the registry loads none (no PyTorch)."""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from typing import Any

from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle, load_bundle
from edgeface.core.errors import EdgefaceError, with_article
from edgeface.core.processing import MAX_THREADS

# The registry, one line per runtime, in the order listings show them.
RUNTIMES = (
    "edgeface.runtimes.torch:TorchRuntime",
    "edgeface.runtimes.onnxruntime:OnnxRuntime",
    "edgeface.runtimes.tflite:TFLiteRuntime",
    "edgeface.runtimes.tensorrt:TensorRTRuntime",
    "edgeface.runtimes.coreml:CoreMLRuntime",
    "edgeface.runtimes.ncnn:NcnnRuntime",
    "edgeface.runtimes.openvino:OpenVINORuntime",
    "edgeface.runtimes.executorch:ExecuTorchRuntime",
    "edgeface.runtimes.qnn:QnnRuntime",
    "edgeface.runtimes.rknn:RknnRuntime",
)
# Options every runtime accepts (device is checked against each runtime's ``devices``; threads is ignored by
# runtimes without a CPU thread setting).
COMMON_OPTIONS = ("device", "threads")


@functools.cache
def _registry() -> dict[str, type[Runtime]]:
    """name -> class, read from :data:`RUNTIMES` on first use."""
    found: dict[str, type[Runtime]] = {}
    defaults: dict[str, str] = {}
    for line in RUNTIMES:
        module, _, cls_name = line.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        if not (isinstance(cls, type) and issubclass(cls, Runtime)) or cls.name in found:
            raise TypeError(f"{line}: not a Runtime subclass with a name of its own")
        for target in cls.default_for:
            if target not in cls.targets or target in defaults:
                raise ValueError(f"{line}: default for {target!r}, which it does not run or "
                                 f"{defaults.get(target)} already serves")
            defaults[target] = cls.name
        found[cls.name] = cls
    return found


def list_runtimes() -> list[str]:
    return list(_registry())


def get_runtime_class(name: str) -> type[Runtime]:
    runtimes = _registry()
    if name not in runtimes:
        close = difflib.get_close_matches(name, list(runtimes), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EdgefaceError(f"unknown runtime {name!r}{hint} (runtimes: {', '.join(runtimes)})")
    return runtimes[name]


def default_runtimes() -> dict[str, str]:
    """Bundle target -> the runtime that runs it when none is named (each runtime's ``default_for``)."""
    return {target: cls.name for cls in _registry().values() for target in cls.default_for}


def runtimes_for(target: str) -> list[str]:
    """The runtimes that run bundles of ``target``, by their declared ``targets``."""
    return [name for name, cls in _registry().items() if target in cls.targets]


def runtimes_taking(option: str) -> list[str]:
    """The runtimes whose :meth:`Runtime.open` reads ``option``."""
    return [name for name, cls in _registry().items() if option in cls.options]


def check_options(runtime: str, options: dict[str, Any]) -> None:
    """Refuse an option ``runtime`` does not take, naming the runtimes that do (None counts as not given)."""
    cls = get_runtime_class(runtime)
    cls.check_device(options.get("device"))
    for name, value in options.items():
        if value is None or name in COMMON_OPTIONS or name in cls.options:
            continue
        takers = runtimes_taking(name)
        raise EdgefaceError(f"{name} is not an option of the {runtime} runtime (runtimes that take it: "
                            f"{', '.join(takers) or 'none'})")


def check_runs(runtime: str, bundle) -> None:
    """Refuse a runtime that does not run this bundle's target, before it loads anything (an onnxruntime session
    on a .tflite file only says "InvalidProtobuf")."""
    target = bundle.manifest.target
    if target not in get_runtime_class(runtime).targets:
        others = runtimes_for(target)
        raise EdgefaceError(f"bundle {bundle.path} is {with_article(target)} bundle; runtimes that run it: "
                            f"{', '.join(others) or 'none'}")


def open_runtime(runtime: str | None = None, *, model: str | os.PathLike | Bundle | None = None,
                 **options: Any) -> Runtime:
    """Open ``model`` (a bundle directory, or a :class:`~edgeface.core.bundle.Bundle` already loaded) with
    ``runtime`` (default: the one for the bundle's target); without a bundle, the torch runtime on
    ``weights=...``."""
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise EdgefaceError(f"threads {threads!r}: give a whole number 1-{MAX_THREADS}")
    if runtime is not None:  # an unknown name, device or option before the bundle is read
        check_options(runtime, options)
    bundle = model if isinstance(model, Bundle) or model is None else load_bundle(model)
    if runtime is None:
        if bundle is None:
            runtime = "torch"
        else:
            runtime = default_runtimes().get(bundle.manifest.target)
            if runtime is None:
                raise EdgefaceError(f"bundle {bundle.path} is {with_article(bundle.manifest.target)} bundle, which no "
                                    f"registered runtime runs by default (runtimes: {', '.join(list_runtimes())})")
    # each runtime takes its own devices (Core ML compute units, onnxruntime providers) and options
    check_options(runtime, options)
    cls = get_runtime_class(runtime)
    if bundle is None and runtime != "torch":
        raise EdgefaceError(f"the {runtime} runtime needs a bundle (--model DIR made by `edgeface export`)")
    if bundle is not None:
        check_runs(runtime, bundle)
    return cls.open(bundle, **options)


__all__ = ["COMMON_OPTIONS", "RUNTIMES", "Runtime", "check_options", "check_runs", "default_runtimes",
           "get_runtime_class", "list_runtimes", "open_runtime", "runtimes_for", "runtimes_taking"]
