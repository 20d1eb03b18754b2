"""Export targets. Adding a target = one converter module with ``convert(model, out_dir, request)`` + one line in
``_CONVERTERS`` (and its precisions)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from edgeface.export.base import quiet

from edgeface.core.errors import EdgefaceError

_CONVERTERS = {
    "onnx": "edgeface.export.onnx:convert",
    "tflite": "edgeface.export.tflite:convert",
    "coreml": "edgeface.export.coreml:convert",
    "tensorrt": "edgeface.export.tensorrt:convert",
}
PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "tflite": ("fp32", "fp16", "int8"),
    "coreml": ("fp16", "fp32", "int8"),
    "tensorrt": ("fp16", "fp32", "int8"),
}
# Targets whose INT8 is calibrated on images (Core ML INT8 quantises weights only).
CALIBRATED_INT8 = ("onnx", "tflite", "tensorrt")
# Board / platform names a user thinks in -> the target that serves it.
ALIASES = {"jetson": "tensorrt", "android": "tflite", "rpi": "tflite", "ios": "coreml", "x86": "onnx"}


def _suggest(name: str, known: list[str], what: str) -> EdgefaceError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return EdgefaceError(f"unknown {what} {name!r}{hint} (choose from: {', '.join(known)})")


def list_targets() -> list[str]:
    return list(_CONVERTERS)


def resolve_target(name: str) -> str:
    name = name.lower()
    if name in _CONVERTERS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise _suggest(name, list(_CONVERTERS) + list(ALIASES), "target")


def resolve_precision(target: str, precision: str | None) -> str:
    choices = PRECISIONS[target]
    if precision is None:
        return choices[0]
    precision = precision.lower()
    if precision not in choices:
        raise _suggest(precision, list(choices), f"precision for {target}")
    return precision


def get_converter(target: str) -> Callable:
    """The target's ``convert(model, out_dir, request)``, run without its libraries' console output
    (:func:`edgeface.export.base.quiet`); the export pipeline reports progress itself."""
    module, func = _CONVERTERS[resolve_target(target)].split(":")

    def convert(model, out_dir, request):
        with quiet(f"{request.target} {request.precision} conversion"):
            return getattr(importlib.import_module(module), func)(model, out_dir, request)

    return convert


__all__ = ["ALIASES", "CALIBRATED_INT8", "PRECISIONS", "get_converter", "list_targets", "resolve_precision", "resolve_target"]
