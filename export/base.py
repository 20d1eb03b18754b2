"""What every converter receives and returns. A converter is one module with one entry function
``convert(model, out_dir, request) -> Conversion``: it writes its model file(s) into ``out_dir`` and describes
them; the shared export pipeline (:mod:`edgeface.export.pipeline`) does the rest (manifest, parity, evaluation,
atomic publication)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.files import captured_output


@dataclass(frozen=True)
class ExportRequest:
    target: str
    precision: str  # fp32 | fp16 | int8
    input_hw: tuple[int, int] | None  # static input size; None = dynamic height/width
    dynamic_batch: bool = False
    opset: int = 17
    # Real images for INT8 calibration, already pre-processed for this model (float32 NCHW, mean subtracted,
    # each of shape (1, 3, H, W)); empty unless precision is int8.
    calibration: tuple[np.ndarray, ...] = ()
    calibration_source: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # target-specific switches (e.g. int8_io)
    verify: bool = True  # False (--no-verify): converters skip their own numerical checks too


@dataclass
class Conversion:
    """What a converter produced. ``files`` maps roles to file names inside the bundle (``model`` is required)."""

    files: dict[str, str]
    layout: str = "NCHW"
    input_dtype: str = "float32"
    input_quantization: dict[str, float] | None = None  # int8 input: real = scale * (q - zero_point)
    output_quantization: dict[str, dict[str, float]] | None = None  # per output name, for int8 outputs
    output_dtypes: dict[str, str] | None = None
    mean_in_graph: bool = False
    dynamic: dict[str, list[int]] | None = None  # dimension -> [min, opt, max]
    calibration: dict[str, Any] | None = None  # method, images, nodes kept in float, ...
    converter: dict[str, Any] = field(default_factory=dict)  # tool names and versions
    notes: list[str] = field(default_factory=list)
    # Runs the artifact here? None = yes; else the exact reason it cannot (parity then runs on what can).
    not_runnable_here: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific manifest section (e.g. tensorrt build)


# Loggers of the converters' libraries (and the root logger, where onnxruntime's quantizer logs), set to ERROR
# during a conversion.
CONVERTER_LOGGERS = ("", "absl", "tensorflow", "jax", "torch", "torchao", "onnx", "onnxruntime", "onnxscript",
                     "coremltools", "litert_torch", "ai_edge_litert", "ai_edge_quantizer")
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    """Run a conversion without its libraries' console output: deprecation warnings are ignored, the libraries'
    loggers are set to ERROR, and everything written to stdout / stderr meanwhile, by Python (progress bars,
    warnings) or by native code on file descriptors 1 and 2 (TensorFlow / LiteRT / absl / oneDNN logs), goes to a
    temporary file. It is thrown away when the conversion succeeds; when it fails, it is kept as a log file and
    the error (always an :class:`EdgefaceError`, one line) names it. ``what`` names the artifact in that error
    ("tflite fp32 conversion").

    File descriptors are per process: output of other threads during the conversion is captured too. Nested or
    concurrent scopes run inside the first one's capture."""
    if not _quiet_lock.acquire(blocking=False):
        yield
        return
    try:
        with tempfile.TemporaryFile() as log, warnings.catch_warnings():
            for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            levels = {name: logging.getLogger(name).level for name in CONVERTER_LOGGERS}
            for name in CONVERTER_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
            try:
                with captured_output(log):
                    yield
            except Exception as exc:
                raise _with_log(exc, what, log) from (None if isinstance(exc, EdgefaceError) else exc)
            finally:
                for name, level in levels.items():
                    logging.getLogger(name).setLevel(level)
    finally:
        _quiet_lock.release()


def _with_log(exc: Exception, what: str, log) -> EdgefaceError:
    """The conversion's error as one line, naming a file that keeps what the libraries printed."""
    log.flush()
    log.seek(0)
    output = log.read()
    where = ""
    if output.strip():
        fd, path = tempfile.mkstemp(prefix="edgeface-export-", suffix=".log")
        with os.fdopen(fd, "wb") as kept:
            kept.write(output)
        where = f" (the converters' output: {path})"
    if isinstance(exc, EdgefaceError):
        return EdgefaceError(f"{exc}{where}")
    detail = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
    return EdgefaceError(f"the {what} failed ({detail}){where}")
