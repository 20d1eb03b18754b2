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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.files import captured_output
from edgeface.core.images import ASTRONAUT, list_images, load_image
from edgeface.core.manifest import OUTPUTS
from edgeface.evaluation.accuracy import default_image_dir, spread

if TYPE_CHECKING:
    from edgeface.runtimes.base import Runtime

# Real photographs the export's parity check (and Core ML's program check) runs on.
PARITY_IMAGES = 8
# The input size of a static export when none is given, and of the static bundles `bench --all` times.
DEFAULT_IMGSZ = (640, 640)
# Output binding checks (level_errors): a level's spread counts as at least this share of the output's spread over
# all levels, so that a level where nothing varies does not divide by ~0.
LEVEL_SPREAD_FLOOR = 0.1


@dataclass(frozen=True)
class TargetOption:
    """An option a target's converter reads: ``export_bundle(options={name: value})`` (``opset`` is a parameter of
    its own), and, where it has one, the ``edgeface export`` flag that sets it. A target that does not declare an
    option refuses it (:func:`edgeface.export.check_options`), naming the targets that take it."""

    name: str
    help: str
    flag: str | None = None  # the `edgeface export` flag that sets it; None: API only (options={name: value})
    default: Any = None  # what the converter uses when it is not given (None: decided by the converter)
    choices: range | tuple[Any, ...] | None = None  # the values taken, checked before anything runs

    @property
    def label(self) -> str:
        """How messages name it: its flag, else ``option 'name'``."""
        return self.flag or f"option {self.name!r}"

    def check(self, value: Any) -> None:
        if self.choices is None:
            return
        # True == 1: a flag's choices (True, False) take booleans only, numeric choices no booleans
        boolean = not isinstance(self.choices, range) and all(isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) == boolean and value in self.choices:
            return
        if isinstance(self.choices, range):
            accepted = f"{self.choices.start}-{self.choices.stop - 1}"
        else:
            accepted = ", ".join(map(str, self.choices))
        default = f" (default {self.default})" if self.default is not None else ""
        raise EdgefaceError(f"{self.label} {value!r} is not supported: give {accepted}{default}")

    def to_dict(self) -> dict[str, Any]:
        choices = self.choices
        if isinstance(choices, range):
            choices = [choices.start, choices.stop - 1]
        return {"name": self.name, "flag": self.flag, "default": self.default,
                "choices": list(choices) if choices is not None else None, "help": self.help}


@dataclass(frozen=True)
class TargetSpec:
    """What a target is, declared once in its converter module (``SPEC``) and read by everything else: the target
    registry (:mod:`edgeface.export`), the export pipeline, ``edgeface export``'s help and checks, ``bench --all``
    and the board profiles. Reading it imports none of the converter's libraries."""

    name: str  # the manifest's ``target``
    title: str  # how messages name it ("TFLite")
    extra: str  # the pip extra that installs the converter: `pip install edgeface[EXTRA]`
    runtime: str  # the runtime that runs its bundles (a registered runtime that declares this target)
    precisions: tuple[str, ...]  # the first is the default
    libraries: tuple[str, ...]  # distributions whose versions the manifest records (converter.versions)
    aliases: tuple[str, ...] = ()  # platform names a user thinks in (``--target jetson``)
    calibrated: tuple[str, ...] = ()  # precisions calibrated on real images (--calib); others need none
    static_only: str | None = None  # why the target takes fixed input sizes only; None: --dynamic works
    # (precision, why) for precisions exported per input size only where others take --dynamic
    static_precisions: tuple[tuple[str, str], ...] = ()
    options: tuple[TargetOption, ...] = ()
    # The runtime that checks a fresh bundle on the export machine (parity, --eval) when ``runtime`` is a device's
    # (a TensorRT bundle's ONNX runs in onnxruntime); None: ``runtime``.
    verify_runtime: str | None = None
    # preflight(precision, options), called before any work (model, calibration): raises EdgefaceError when the
    # converter cannot run here or the request cannot be met, e.g. a toolchain that lives in its own environment
    # (rknn-toolkit2). None: the converter checks and imports what it needs itself.
    preflight: Callable[[str, dict[str, Any]], None] | None = None
    # `edgeface bench --all`: (precision, static input size or None for dynamic), exported and timed in this order.
    bench: tuple[tuple[str, tuple[int, int] | None], ...] = ()
    # `bench --all`: at most this many WIDER images for AP where this machine runs the artifact in an emulator
    # (seconds per image); the table's ap_images column states the subset. None: the run's --limit.
    bench_limit: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.precisions or len(set(self.precisions)) != len(self.precisions):
            problems.append(f"precisions {self.precisions!r}: give each once, the default first")
        for what, values in (("calibrated", self.calibrated), ("bench", [p for p, _ in self.bench])):
            if not set(values) <= set(self.precisions):
                problems.append(f"{what} {sorted(set(values) - set(self.precisions))} not in precisions")
        if self.bench_limit is not None and (isinstance(self.bench_limit, bool) or not isinstance(self.bench_limit, int)
                                             or self.bench_limit < 1):
            problems.append(f"bench_limit {self.bench_limit!r}: give a number of images, at least 1, or None")
        if not {p for p, _ in self.static_precisions} <= set(self.precisions):
            problems.append(f"static_precisions {self.static_precisions!r}: precisions it does not declare")
        if any(size is None for p, size in self.bench if p in dict(self.static_precisions)):
            problems.append("bench: a static-only precision has no dynamic entry")
        if self.static_only is not None and any(size is None for _, size in self.bench):
            problems.append("bench: a static-only target has no dynamic entry")
        names = [o.name for o in self.options]
        if len(set(names)) != len(names):
            problems.append(f"options named twice: {names}")
        if problems:
            raise ValueError(f"target spec {self.name!r}: " + "; ".join(problems))

    @property
    def dynamic(self) -> bool:
        """Whether it exports dynamic input sizes (``--dynamic``), for some precision at least."""
        return self.static_only is None

    def static_reason(self, precision: str) -> str | None:
        """Why ``precision`` takes fixed input sizes only (None: --dynamic works for it)."""
        return self.static_only or dict(self.static_precisions).get(precision)

    @property
    def runtime_here(self) -> str:
        """The runtime that checks its bundles on the export machine."""
        return self.verify_runtime or self.runtime

    def option(self, name: str) -> TargetOption | None:
        return next((o for o in self.options if o.name == name), None)

    def calibrates(self, precision: str) -> bool:
        return precision in self.calibrated

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "aliases": list(self.aliases),
                "precisions": list(self.precisions), "default_precision": self.precisions[0],
                "calibrated": list(self.calibrated), "dynamic": self.dynamic, "static_only": self.static_only,
                "static_precisions": dict(self.static_precisions),
                "options": [o.to_dict() for o in self.options], "extra": self.extra, "runtime": self.runtime,
                "verify_runtime": self.runtime_here, "libraries": list(self.libraries),
                "bench": [{"precision": p, "imgsz": list(size) if size else None} for p, size in self.bench],
                "bench_limit": self.bench_limit}


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
    # An open runtime over the artifact in this process, for one that cannot be reopened from its files here (a
    # .rknn runs in rknn-toolkit2's simulator only in the session that built it): parity and --eval run on it
    # instead of opening the staged bundle, and the pipeline closes it when the export ends. None: they open the
    # staged bundle with the target's ``runtime_here``.
    runtime: Runtime | None = None


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


def binding_photos(parity: int = 0) -> list[tuple[str, np.ndarray]]:
    """(name, BGR image) for an output binding check: the bundled photograph, a crop of it in which the face fills
    the frame (about 90 x 115 pixels, so that the coarsest anchor level sees a face too), then the first
    ``parity`` other images of :func:`parity_images`."""
    photo = load_image(ASTRONAUT)
    images = [("edgeface/assets/astronaut.jpg", photo), ("astronaut.jpg face crop", photo[40:200, 145:305])]
    return images + [(f"parity image {i + 1}", image) for i, image in enumerate(parity_images()[1:1 + parity])]


def parity_images() -> list[np.ndarray]:
    """Real photographs with faces for the export's parity check, never the user's calibration folder (a parity
    check on the calibration images would pass a model calibrated on images without faces): the bundled photograph
    and WIDER FACE val images when ../shared is present, else the photograph mirrored, halved and tiled 2x2 (four
    faces), so the check always sees several faces at several sizes."""
    photo = load_image(ASTRONAUT)
    images = [photo]
    shared = default_image_dir()
    if shared:
        images += [load_image(p) for p in spread(list_images(shared), PARITY_IMAGES - 1)]
    else:
        half = cv2.resize(photo, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        images += [cv2.flip(photo, 1), half, np.vstack([np.hstack([half, half[:, ::-1]])] * 2)]
    return images


def level_errors(candidate: np.ndarray, reference: np.ndarray, levels) -> dict[int, float]:
    """Per anchor level: RMS difference / the reference's spread over the priors of that level (its standard
    deviation per column k, at least LEVEL_SPREAD_FLOOR of the spread over all levels, so that a level where nothing
    varies does not divide by ~0). 0 for a perfect output, about sqrt(2) for priors in the wrong order; per level,
    so that a scrambled level cannot hide in the average. Arrays are (N, A, k); images are pooled."""
    k = reference.shape[-1]
    overall = np.sqrt(np.mean(reference.reshape(-1, k).var(axis=0)))
    errors = {}
    for step, rows in levels:
        ref = reference[:, rows].reshape(-1, k)
        diff = candidate[:, rows].reshape(-1, k) - ref
        spread = max(np.sqrt(np.mean(ref.var(axis=0))), LEVEL_SPREAD_FLOOR * overall, 1e-9)
        errors[step] = float(np.sqrt(np.mean(diff ** 2)) / spread)
    return errors


def choose_outputs(errors: dict[tuple[str, Any], dict[int, float]], max_abs: dict[tuple[str, Any], float], *,
                   tolerance: float, strict: bool, what: str, outputs: list[Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bind each PyTorch output (``loc``, ``conf``, ``landmarks``, in that order) to the converted model's output
    that reproduces it best: ``errors[(name, key)]`` is :func:`level_errors` of candidate output ``key`` against
    PyTorch's ``name`` (only for candidates of the same shape), ``max_abs`` their largest raw difference. Each
    candidate is bound once.

    Returns ``({name: key}, {name: {"error_by_stride": {stride: error}, "max_abs_diff": float}})``. Raises
    :class:`EdgefaceError` when no candidate has a PyTorch output's shape, or (``strict``; False for --no-verify,
    which binds the closest and lets the caller report the check as failed) when the closest one is beyond
    ``tolerance``: a wrong or scrambled output (``what`` names the format, ``outputs`` its outputs)."""
    chosen: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for name in OUTPUTS:
        scored = [(max(per_level.values()), per_level, key) for (n, key), per_level in errors.items()
                  if n == name and key not in chosen.values()]
        if not scored:
            raise EdgefaceError(f"no {what} output has the shape of PyTorch's {name!r} (outputs: {outputs}): the "
                                "conversion is not usable; nothing was written")
        worst, per_level, key = min(scored, key=lambda s: s[0])
        if worst > tolerance and strict:
            raise EdgefaceError(
                f"no {what} output reproduces PyTorch's {name!r} on real images (closest: {key!r}, error per anchor "
                f"stride {', '.join(f'{k}: {v:.3g}' for k, v in per_level.items())}; tolerance {tolerance}, a "
                "scrambled output gives ~1.4): the converter produced a wrong or scrambled output; nothing was "
                "written")
        chosen[name] = key
        report[name] = {"error_by_stride": {str(k): float(f"{v:.3g}") for k, v in per_level.items()},
                        "max_abs_diff": float(f"{max_abs[(name, key)]:.3g}")}
    return chosen, report
