"""What every converter receives and returns. A converter is one module with one entry function
``convert(model, out_dir, request) -> Conversion``: it writes its model file(s) into ``out_dir`` and describes
them; the shared export pipeline (:mod:`edgeface.export.pipeline`) does the rest (manifest, parity, evaluation,
atomic publication)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


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


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


