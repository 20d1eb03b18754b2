"""TensorRT (Jetson): engines are specific to one GPU and one TensorRT version, so the bundle carries the ONNX
(FP32 weights for an FP16 build, or explicit symmetric QDQ for INT8, which TensorRT consumes directly), the
manifest with the build settings, and is turned into an engine on the device by :func:`build_engine`
(``edgeface build-engine BUNDLE``), which then checks the engine against the bundle's parity images.

What this machine verifies: the ONNX (run in onnxruntime against PyTorch on real images by the export pipeline),
that every operator is one TensorRT's ONNX parser supports at this opset, and the shapes / optimisation profile.
What only the device can verify: the parse, the engine build and the engine's outputs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeface.export import onnx as onnx_export
from edgeface.export.base import Conversion, ExportRequest, TargetSpec

from edgeface.core.bundle import Bundle, load_bundle, staged_bundle, update_bundle, write_manifest
from edgeface.core.errors import EdgefaceError, require, with_article
from edgeface.core.files import atomic_write
from edgeface.core.parity import compare_to_reference
from edgeface.core.versions import library_versions
from edgeface.inference.detector import Detector

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
TIMING_CACHE = "timing.cache"
# ONNX operators that TensorRT's ONNX parser (onnx-tensorrt, TensorRT 8.5 and newer) converts, restricted to
# the ones a convolutional detector can produce; opset 17 is the newest that TensorRT 8.5/8.6 (JetPack 5/6.0)
# parse, TensorRT 10 parses 9-20.
TENSORRT_OPS = frozenset("""
Abs Add AveragePool BatchNormalization Cast Ceil Clip Concat Constant ConstantOfShape Conv ConvTranspose
DequantizeLinear Div Elu Equal Erf Exp Expand Flatten Floor Gather Gemm GlobalAveragePool GlobalMaxPool
HardSigmoid HardSwish Identity LeakyRelu MatMul Max MaxPool Min Mul Neg Pad PRelu QuantizeLinear Range Reciprocal
ReduceMax ReduceMean Relu Reshape Resize Shape Sigmoid Slice Softmax Split Sqrt Squeeze Sub Tanh Tile Transpose
Unsqueeze Where
""".split())
MAX_OPSET = 17
WORKSPACE_MB = 1024
SPEC = TargetSpec(
    name="tensorrt",
    title="TensorRT",
    aliases=("jetson",),
    precisions=("fp16", "fp32", "int8"),
    calibrated=("int8",),
    # TensorRT 8.5/8.6 (JetPack 5) parse ONNX up to opset 17: a newer one is refused before any work
    options=(dataclasses.replace(onnx_export.OPSET, choices=range(13, MAX_OPSET + 1),
                                 help=f"ONNX opset, 13-{MAX_OPSET} (TensorRT 8.5/8.6 parse up to {MAX_OPSET}; default 17)"),
             *(o for o in onnx_export.INT8_OPTIONS if o.name != "qat")),  # QAT learns onnxruntime's uint8
    extra="onnx",  # the bundle is an ONNX; TensorRT itself (the tensorrt extra, or JetPack) builds it on the device
    runtime="tensorrt",
    verify_runtime="onnxruntime",  # the bundle's ONNX, checked here; the engine is checked by build-engine
    libraries=onnx_export.SPEC.libraries,
    bench=(("fp16", None), ("int8", None)),
)


def check_operators(proto: onnx.ModelProto) -> list[str]:
    ops = sorted({node.op_type for node in proto.graph.node})
    unsupported = [op for op in ops if op not in TENSORRT_OPS]
    if unsupported:
        raise EdgefaceError(f"the ONNX model uses operators TensorRT's parser does not take: {unsupported}")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset > MAX_OPSET:
        raise EdgefaceError(f"opset {opset} is newer than TensorRT 8.5/8.6 (Jetson) parse; export with --opset "
                            f"{MAX_OPSET}")
    for node in proto.graph.node:
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in ("nearest", "linear"):
                raise EdgefaceError(f"Resize mode {mode!r} is not supported by TensorRT")
    return ops


def profile(request: ExportRequest) -> dict[str, list[list[int]]]:
    """Optimisation profile of the input: min / opt / max shapes (a static model has all three equal)."""
    if request.input_hw and not request.dynamic_batch:
        shape = [1, 3, *request.input_hw]
        return {"min": shape, "opt": shape, "max": shape}
    ranges = onnx_export.dynamic_ranges(request)
    batch = ranges.get("batch", [1, 1, 1])
    h = ranges.get("height", [request.input_hw[0]] * 3 if request.input_hw else None)
    w = ranges.get("width", [request.input_hw[1]] * 3 if request.input_hw else None)
    return {k: [batch[i], 3, h[i], w[i]] for i, k in enumerate(("min", "opt", "max"))}


def convert(model, out_dir: Path, request: ExportRequest) -> Conversion:
    import onnx  # deferred: the converters (export extra), not needed to read SPEC

    # FP16: TensorRT builds FP16 kernels from FP32 weights itself (keeping FP32 where it must), so the ONNX stays
    # FP32. INT8: symmetric activations, as TensorRT requires of explicit quantisation.
    onnx_request = dataclasses.replace(request, precision="fp32") if request.precision == "fp16" else request
    proto, calibration, checks = onnx_export.build(model, onnx_request, symmetric_activations=True)
    operators = check_operators(proto)
    onnx.save(proto, out_dir / MODEL_FILE)
    build = {"precision": request.precision,
             "builder_flags": {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[request.precision],
             "profile": profile(request), "workspace_mb": WORKSPACE_MB,
             "command": f"edgeface build-engine BUNDLE  (writes {ENGINE_FILE}, {TIMING_CACHE})"}
    return Conversion(
        files={"model": MODEL_FILE},
        dynamic=onnx_export.dynamic_ranges(request),
        calibration=calibration,
        converter={"exporter": "torch.onnx.export (TorchScript)", "opset": request.opset, "simplifier": "onnxsim",
                   "checks": checks,
                   "versions": library_versions(*SPEC.libraries)},
        notes=["The engine is built on the device: `edgeface build-engine BUNDLE` (TensorRT Python API)."],
        extra={
            "build": build,
            "onnx_operators": operators,
            "verified_here": ["ONNX outputs vs PyTorch on real images (onnxruntime)", "ONNX checker",
                              f"operators parseable by TensorRT >= 8.5 at opset <= {MAX_OPSET}",
                              "input shapes and optimisation profile"],
            "verified_on_device_only": ["ONNX parse by TensorRT", "engine build", "engine outputs vs the bundle's "
                                        "parity images (done by build-engine)"],
        },
    )


@dataclasses.dataclass
class Engine:
    """What an engine build produces: the serialized engine (bytes, or TensorRT's IHostMemory: anything with the
    buffer protocol), the updated timing cache (None: keep the bundle's) and the facts recorded in
    ``target_info.engine`` (TensorRT version, device, build time)."""

    data: Any
    timing_cache: Any = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_engine(bundle_dir: str | Path, *, workspace_mb: int | None = None, verify: bool = True,
                 progress: bool = True) -> Path:
    """Build ``model.engine`` from a TensorRT bundle's ONNX with the TensorRT Python API (on the device that will
    run it), reusing and updating the bundle's timing cache, then check it against the parity images.

    The bundle is never changed in place: the engine is built into a staged copy, which replaces the bundle only
    once the engine, the timing cache and the manifest are written and (``verify``) the engine reproduces the
    bundle's reference detections (:func:`install_engine`). A failure, or a kill, leaves the bundle as it was."""

    bundle = load_bundle(bundle_dir)
    if bundle.manifest.target != "tensorrt":  # before asking for TensorRT: no TensorRT would build this bundle
        raise EdgefaceError(f"bundle {bundle.path} is {with_article(bundle.manifest.target)} bundle; build-engine "
                            "takes a tensorrt bundle (`edgeface export --target jetson`)")
    trt = require("tensorrt", "tensorrt", "Building a TensorRT engine")
    log = (lambda m: print(f"edgeface build-engine: {m}", file=sys.stderr)) if progress else (lambda m: None)
    return install_engine(bundle.path, lambda staged: _build(trt, staged, workspace_mb, log),
                          check=engine_parity if verify else None, log=log)


def install_engine(bundle_dir: str | Path, build: Callable[[Any], Engine], *,
                   check: Callable[[Bundle], dict[str, Any]] | None = None,
                   log: Callable[[str], None] = lambda m: None) -> Path:
    """Add an engine to a tensorrt bundle the way an export publishes a bundle: ``build(staged)`` makes the engine
    from a staged copy of the bundle (a :class:`~edgeface.core.bundle.Bundle`, checked on load); the engine and timing
    cache are written there (each file whole or not at all), the manifest lists them, ``check(staged)`` (when
    given; the staged bundle with its new manifest, in memory) returns the engine's parity report or raises, and
    only then does the copy replace the bundle, by renames under the folder lock. Any failure before that, or a
    kill, leaves the bundle untouched and no engine file anywhere (the staging folder is removed, or by the next
    run if the process was killed).

    Returns the engine's path in the published bundle."""

    with update_bundle(bundle_dir) as staged:
        manifest = staged.manifest
        if manifest.target != "tensorrt":
            raise EdgefaceError(f"bundle {bundle_dir} is {with_article(manifest.target)} bundle; only a tensorrt "
                                "bundle takes an engine")
        engine = build(staged)
        atomic_write(staged.path / ENGINE_FILE, lambda tmp: tmp.write_bytes(engine.data))
        if engine.timing_cache is not None:
            atomic_write(staged.path / TIMING_CACHE, lambda tmp: tmp.write_bytes(engine.timing_cache))
        manifest.files["engine"] = ENGINE_FILE
        manifest.target_info["engine"] = dict(engine.info)
        if check is not None:  # on the staged bundle as a load reads it; the manifest is written once, last
            manifest.target_info["engine"]["parity"] = check(staged_bundle(staged.path, manifest))
        write_manifest(staged.path, manifest)
    published = Path(bundle_dir) / ENGINE_FILE
    log(f"wrote {published}")
    return published


def _build(trt, bundle, workspace_mb: int | None, log) -> Engine:
    """The TensorRT build of ``bundle``'s ONNX with its manifest's settings (TensorRT Python API)."""
    manifest = bundle.manifest
    settings = manifest.target_info["build"]
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # required before TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.file())):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgefaceError(f"TensorRT could not parse {bundle.file()}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, (workspace_mb or settings["workspace_mb"]) << 20)
    for flag in settings["builder_flags"]:  # FP16 / INT8 (the manifest's schema allows no other)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    shapes = settings["profile"]
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(manifest.input.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)
    cache_file = bundle.path / TIMING_CACHE
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building {settings['precision']} engine (profile {shapes}); this takes minutes on a Jetson")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgefaceError("TensorRT failed to build the engine (see the TensorRT log above)")
    return Engine(data=serialized, timing_cache=config.get_timing_cache().serialize(),
                  info={"tensorrt": trt.__version__, "built_seconds": round(time.perf_counter() - started, 1),
                        "device": _gpu_name()})


def engine_parity(bundle: Bundle) -> dict[str, Any]:
    """The engine of ``bundle`` on the bundle's parity photograph against its recorded FP32 PyTorch faces
    (``parity/reference.json``); raises EdgefaceError when it does not reproduce them."""
    if not (bundle.path / "parity" / "reference.json").is_file():
        return {"status": "skipped", "reason": "the bundle has no parity/reference.json"}
    detector = Detector(model=bundle, runtime="tensorrt", self_check=False)
    try:
        report = compare_to_reference(detector, bundle.path)
    finally:
        detector.close()
    report.check(bundle.manifest.precision)
    if not report.passed:
        raise report.failure("the engine", "the bundle's reference detections", "the bundle was left as it was")
    return report.record()


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None
