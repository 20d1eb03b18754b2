"""Core ML (iOS / macOS): an ML Program ``model.mlpackage`` converted by coremltools from a ``torch.export``
ExportedProgram (coremltools' TorchScript route fails with numpy >= 2.4; this one works with any numpy).

- Precisions: fp16 (FP16 compute, the default), fp32, int8 (FP16 compute with INT8 per-channel weights from
  ``coremltools.optimize.coreml.linear_quantize_weights``: weights only, no calibration images).
- Input: by default an image (``ImageType``, BGR, bias = -mean, scale 1), so an app hands Core ML a pixel buffer
  and nothing else; option ``coreml_input="tensor"`` gives a float32 NCHW array input with the mean subtracted
  by the caller. Fixed size; option ``enumerated_sizes=[(h, w), ...]`` adds further sizes (``EnumeratedShapes``).
- Outputs ``loc`` (1, A, 4), ``conf`` (1, A, 2), ``landmarks`` (1, A, 10), float32.

Core ML predicts on Apple platforms only. Elsewhere the export checks what it can: the ExportedProgram against
PyTorch, the saved package's spec (type, input, outputs, precision) and the package's MIL program interpreted
op by op (:mod:`edgeface.export.coreml_mil`) against PyTorch on real images (not with --no-verify).
"""

from __future__ import annotations

import collections
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export.base import DEFAULT_IMGSZ, Conversion, ExportRequest, TargetOption, TargetSpec, parity_images
from edgeface.export.coreml_mil import MILProgramRuntime, UnsupportedOp, load_program, single_thread

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.manifest import OUTPUT_COLUMNS, OUTPUT_MEANINGS, OUTPUTS, manifest_for_model
from edgeface.core.parity import compare
from edgeface.core.processing import ResizePolicy
from edgeface.core.versions import library_versions
from edgeface.inference.detector import Detector

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.mlpackage"
DEBUG_MAP = "executorch_debug_handle_mapping.json"
INPUT_NAME = "input"
DEFAULT_DEPLOYMENT_TARGET = "iOS16"  # ML Programs with FP16 I/O types and per-channel INT8 weights
INT8_WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller tensors (depthwise, heads of small models) stay FP16
EXPORT_TOLERANCE = 1e-4  # ExportedProgram vs eager PyTorch (same ops: differences are export errors)
COMPUTE_PRECISION = {"fp16": "fp16", "fp32": "fp32", "int8": "fp16"}
WEIGHTS = {"fp16": "fp16", "fp32": "fp32",
           "int8": f"int8 per-channel (tensors > {INT8_WEIGHT_THRESHOLD} elements, not the heads), fp16 others"}
SPEC = TargetSpec(
    name="coreml",
    title="Core ML",
    aliases=("ios",),
    precisions=("fp16", "fp32", "int8"),  # int8: weights only, no calibration images
    static_only="Core ML bundles use a fixed input size",
    options=(
        TargetOption("enumerated_sizes", "further input sizes [(h, w), ...] (EnumeratedShapes); on the command line "
                     "several comma-separated --imgsz sizes"),
        TargetOption("coreml_input", "image (pixel buffer, mean in the model; default) or tensor (float32 NCHW, "
                     "mean subtracted by the caller)", default="image"),
        TargetOption("coreml_target", f"minimum deployment target, iOS16 / macOS13 or newer (default "
                     f"{DEFAULT_DEPLOYMENT_TARGET})", default=DEFAULT_DEPLOYMENT_TARGET),
    ),
    extra="coreml",
    runtime="coreml",  # Apple platforms only; elsewhere the export checks the interpreted MIL program
    libraries=("coremltools", "torch"),
    bench=(("fp16", DEFAULT_IMGSZ), ("int8", DEFAULT_IMGSZ)),
)


def _coremltools():
    ct = require("coremltools", "coreml", "Core ML export")
    require("coremltools.optimize.coreml", "coreml", "Core ML export")
    return ct


# --- request ----------------------------------------------------------------------------------------------------


def _sizes(request: ExportRequest) -> list[tuple[int, int]]:
    """The input sizes: ``request.input_hw`` first (the default), then ``enumerated_sizes`` (each validated)."""
    if request.input_hw is None:
        raise EdgefaceError("Core ML bundles use a fixed input size: give imgsz=(H, W) (--imgsz HxW); "
                            "add sizes with the enumerated_sizes option")
    if request.dynamic_batch:
        raise EdgefaceError("Core ML bundles have batch 1 (an app predicts one frame at a time)")
    sizes = [tuple(int(v) for v in request.input_hw)]
    for size in request.options.get("enumerated_sizes") or []:
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise EdgefaceError(f"enumerated_sizes: {size!r} is not an (h, w) pair") from None
        ResizePolicy.parse(f"fixed:{h}x{w}")  # multiples of 32, positive
        if (h, w) not in sizes:
            sizes.append((h, w))
    return sizes


def _input_kind(request: ExportRequest) -> str:
    kind = str(request.options.get("coreml_input", "image")).lower()
    if kind not in ("image", "tensor"):
        raise EdgefaceError(f"coreml_input must be 'image' (pixel buffer, mean in the model) or 'tensor' "
                            f"(float32 NCHW, mean subtracted by the caller), got {kind!r}")
    return kind


def _deployment_target(ct, request: ExportRequest):
    name = str(request.options.get("coreml_target", DEFAULT_DEPLOYMENT_TARGET))
    target = getattr(ct.target, name, None)
    if target is None or target < ct.target.iOS16:
        newer = [t for t in ct.target.__members__ if ct.target[t] >= ct.target.iOS16]
        raise EdgefaceError(f"coreml_target {name!r}: use an ML Program target of iOS16 / macOS13 or newer "
                            f"({', '.join(newer)})")
    return target


# --- torch.export -----------------------------------------------------------------------------------------------


def export_program(model: torch.nn.Module, sizes: list[tuple[int, int]]):
    """The ATen-dialect ExportedProgram coremltools converts, and how it compares with eager PyTorch.

    Several sizes export with symbolic height/width (multiples of 32). ``aten.alias`` (what the FPN's no-op crop
    becomes) has no coremltools converter; it is the identity, so it is removed from the graph.
    """
    import torch  # deferred: PyTorch (export extra), not needed to read SPEC

    model = model.eval()
    h, w = sizes[0]
    dynamic = None
    if len(sizes) > 1:
        dims = {}
        for axis, values, name in ((2, [s[0] for s in sizes], "height"), (3, [s[1] for s in sizes], "width")):
            if len(set(values)) > 1:
                dims[axis] = 32 * torch.export.Dim(f"{name}_32", min=min(values) // 32, max=max(values) // 32)
        dynamic = {"images": dims} if dims else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
        try:
            exported = torch.export.export(model, (torch.zeros(1, 3, h, w),), dynamic_shapes=dynamic, strict=False)
            exported = exported.run_decompositions({})
        except Exception as exc:  # torch.export raises many types; the user needs the cause
            raise EdgefaceError(f"torch.export could not export {type(model).__name__} ({exc})") from None
    graph = exported.graph_module.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    graph.lint()
    exported.graph_module.recompile()

    diffs: dict[str, float] = {}
    rng = np.random.default_rng(0)
    module = exported.module()
    for size in sizes:
        x = torch.from_numpy(rng.normal(0, 60, (1, 3, *size)).astype(np.float32))
        with torch.no_grad():
            for name, a, b in zip(OUTPUTS, model(x), module(x)):
                diffs[name] = max(diffs.get(name, 0.0), float((a - b).abs().max()))
    check = {"max_abs_diff_vs_pytorch": diffs, "sizes": [list(s) for s in sizes], "alias_nodes_removed": removed,
             "ops": sorted({str(n.target) for n in graph.nodes if n.op == "call_function"})}
    if max(diffs.values()) > EXPORT_TOLERANCE:
        raise EdgefaceError(f"the torch.export program differs from the PyTorch model by {max(diffs.values()):.2e} "
                            f"(tolerance {EXPORT_TOLERANCE}): {diffs}")
    return exported, check


# --- conversion -------------------------------------------------------------------------------------------------


def _input_type(ct, kind: str, sizes: list[tuple[int, int]], mean_bgr):
    shapes = [(1, 3, h, w) for h, w in sizes]
    shape = shapes[0] if len(shapes) == 1 else ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
    if kind == "image":
        # The bias is added in the channel order of the colour layout: B, G, R.
        return ct.ImageType(name=INPUT_NAME, shape=shape, color_layout=ct.colorlayout.BGR,
                            bias=[-float(m) for m in mean_bgr], scale=1.0)
    return ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)


def _rename_outputs(ct, mlmodel):
    """Outputs named loc / conf / landmarks (coremltools normally keeps the names it was given)."""
    names = [o.name for o in mlmodel.get_spec().description.output]
    if names == list(OUTPUTS):
        return mlmodel, {}
    if len(names) != len(OUTPUTS):
        raise EdgefaceError(f"the converted model has outputs {names}; expected {list(OUTPUTS)}")
    spec = mlmodel.get_spec()
    renamed = {}
    for old, new in zip(names, OUTPUTS):
        if old != new:
            ct.utils.rename_feature(spec, old, new, rename_inputs=False)
            renamed[old] = new
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True), renamed


def head_weight_ops(mlmodel) -> list[str]:
    """Names of the convolutions that produce the outputs (the 1x1 heads): their outputs are decoded (exp of box
    sizes, landmark offsets), so their weights stay FP16 in int8 bundles."""
    function = load_program(mlmodel).functions["main"]
    heads, stack, seen = set(), list(function.outputs), set()
    while stack:
        var = stack.pop()
        op = var.op
        if op is None or op.name in seen or op.op_type == "const":
            continue
        seen.add(op.name)
        if op.op_type == "conv":
            heads.add(op.name)
            continue
        for value in op.inputs.values():
            stack.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted(heads)


def quantize_weights(ct, mlmodel):
    import coremltools.optimize.coreml as cto

    keep = head_weight_ops(mlmodel)
    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                            weight_threshold=INT8_WEIGHT_THRESHOLD)
    config = cto.OptimizationConfig(global_config=op_config, op_name_configs={name: None for name in keep})
    quantized = cto.linear_quantize_weights(mlmodel, config=config)
    info = {"method": "weights-only", "images": 0, "source": "",
            "tool": "coremltools.optimize.coreml.linear_quantize_weights",
            "weights": "int8 per-channel symmetric (linear_symmetric)",
            "weight_threshold": INT8_WEIGHT_THRESHOLD, "activations": "fp16 (not quantised)",
            "ops_kept_fp16": keep,
            "note": "no calibration images are used: only weights are quantised; weights of at most "
                    f"{INT8_WEIGHT_THRESHOLD} elements and the output heads stay fp16"}
    return quantized, info


# --- checks on the saved package ----------------------------------------------------------------------------------


def _mil_dtype(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype) if var.dtype is not None else "?"


def check_package(path: Path, *, kind: str, sizes: list[tuple[int, int]], precision: str, anchors,
                  mean_bgr, deployment_target: str) -> dict[str, Any]:
    """Everything the saved package's spec and MIL program say, checked against the request; EdgefaceError on any
    mismatch."""
    ct = _coremltools()
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    problems: list[str] = []
    checks: dict[str, Any] = {"model_type": spec.WhichOneof("Type"),
                              "specification_version": spec.specificationVersion}
    if checks["model_type"] != "mlProgram":
        raise EdgefaceError(f"{path} is a {checks['model_type']}, not an ML Program")
    minimum_spec = {"iOS16": 7, "iOS17": 8, "iOS18": 9}.get(deployment_target)
    if minimum_spec and spec.specificationVersion < minimum_spec:
        problems.append(f"specification version {spec.specificationVersion} < {minimum_spec} ({deployment_target})")

    # input
    inputs = spec.description.input
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        problems.append(f"inputs {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    feature = inputs[0].type
    h, w = sizes[0]
    if kind == "image":
        image = feature.imageType
        color = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace)
        enumerated = [[s.height, s.width] for s in image.enumeratedSizes.sizes]
        checks["input"] = {"name": inputs[0].name, "type": feature.WhichOneof("Type"), "color_space": color,
                           "height": image.height, "width": image.width, "enumerated_sizes": enumerated}
        if feature.WhichOneof("Type") != "imageType" or color != "BGR" or (image.height, image.width) != (h, w):
            problems.append(f"input is {checks['input']}, expected a BGR image of {h}x{w}")
    else:
        array = feature.multiArrayType
        dtype = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType)
        enumerated = [list(s.shape)[2:] for s in array.enumeratedShapes.shapes]
        checks["input"] = {"name": inputs[0].name, "type": feature.WhichOneof("Type"), "dtype": dtype,
                           "shape": list(array.shape), "enumerated_sizes": enumerated}
        if feature.WhichOneof("Type") != "multiArrayType" or dtype != "FLOAT32" or list(array.shape) != [1, 3, h, w]:
            problems.append(f"input is {checks['input']}, expected float32 [1, 3, {h}, {w}]")
    if len(sizes) > 1 and sorted(map(list, sizes)) != sorted(enumerated):
        problems.append(f"enumerated sizes {enumerated}, expected {[list(s) for s in sizes]}")

    # outputs: names, types, shapes (flexible-size models state no shape: the interpreted program is checked instead)
    priors = anchors.num_priors((h, w))
    outputs = {}
    for out in spec.description.output:
        array = out.type.multiArrayType
        outputs[out.name] = {"dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType),
                             "shape": list(array.shape)}
    checks["outputs"] = outputs
    if list(outputs) != list(OUTPUTS):
        problems.append(f"outputs {list(outputs)}, expected {list(OUTPUTS)}")
    for name, k in OUTPUT_COLUMNS.items():
        got = outputs.get(name, {})
        if got.get("dtype") != "FLOAT32":
            problems.append(f"output {name} is {got.get('dtype')}, expected FLOAT32")
        if len(sizes) == 1 and got.get("shape") != [1, priors, k]:
            problems.append(f"output {name} has shape {got.get('shape')}, expected [1, {priors}, {k}]")

    # the MIL program: image pre-processing, compute dtypes, weights
    function = load_program(model).functions["main"]
    operations = list(function.operations)
    counts = collections.Counter(op.op_type for op in operations)
    compute = collections.Counter(_mil_dtype(op.outputs[0]) for op in operations if op.op_type == "conv")
    quantized = [op for op in operations if op.op_type.startswith("constexpr_")]
    weight_kinds, elements = collections.Counter(), collections.Counter()
    for op in operations:
        if op.op_type == "conv":
            weight = op.inputs["weight"]
            compressed = weight.op is not None and weight.op.op_type.startswith("constexpr_")
            stored = "int8" if compressed else _mil_dtype(weight)
            weight_kinds[stored] += 1
            elements[stored] += int(np.prod(weight.shape))
    quantized_dtypes = sorted({_mil_dtype(v) for op in quantized for k, v in op.inputs.items()
                               if k in ("quantized_data", "data")})
    checks["mil"] = {"opset": spec.mlProgram.functions["main"].opset, "ops": dict(sorted(counts.items())),
                     "conv_output_dtypes": dict(compute), "conv_weights": dict(weight_kinds),
                     "conv_weight_elements": dict(elements), "quantized_data_dtypes": quantized_dtypes}
    expected = COMPUTE_PRECISION[precision]
    if set(compute) != {expected}:
        problems.append(f"convolutions compute in {dict(compute)}, expected only {expected}")
    if precision == "int8":
        if not quantized or quantized_dtypes != ["int8"] or not weight_kinds.get("int8"):
            problems.append(f"no int8-quantised convolution weights (weights {dict(weight_kinds)}, "
                            f"quantised data {quantized_dtypes})")
    elif quantized:
        problems.append(f"{len(quantized)} compressed weights in a {precision} model")
    if kind == "image":
        adds = [op for op in function.inputs[INPUT_NAME].child_ops if op.op_type == "add"]
        y = adds[0].inputs["y"].val if adds else None
        values = None if y is None else np.asarray(y).reshape(-1).tolist()
        checks["input"]["bias_in_program"] = values
        if values is None or not np.allclose(values, [-float(m) for m in mean_bgr]):
            problems.append(f"image bias in the program is {values}, expected {[-float(m) for m in mean_bgr]}")

    weights = path / "Data" / "com.apple.CoreML" / "weights"
    checks["weight_file_bytes"] = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    checks["package_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if problems:
        raise EdgefaceError(f"the Core ML package {path.name} is not what was asked: " + "; ".join(problems))
    checks["passed"] = True
    return checks


# --- numerical check of the converted program, on any platform ----------------------------------------------------


def check_program(model, path: Path, *, precision: str, kind: str, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """The package's MIL program, interpreted, fed what the shared pre-processing makes for the bundle's manifest,
    against PyTorch fed the standard (mean-subtracted) input, both through :meth:`Detector.infer_arrays`: detection
    parity on real images at the default size (the project's tolerances for ``precision``), raw outputs and shapes
    at every size. The manifest here only tells the interpreter how the package is fed (the bundle's own is built
    by the export pipeline from the conversion)."""
    manifest = manifest_for_model(model, target="coreml", precision=precision, files={"model": MODEL_FILE},
                                  input_hw=sizes[0], mean_in_graph=kind == "image")
    try:
        runtime = MILProgramRuntime(manifest, path)
    except UnsupportedOp as exc:
        return {"status": "skipped", "reason": str(exc)}
    candidate = Detector(runtime=runtime)
    with single_thread():  # PyTorch too: both run one image at a time
        reference = Detector.for_model(model, resize=candidate.resize)
        report = compare(reference, candidate, parity_images()).check(precision)
    result: dict[str, Any] = {
        "status": "passed" if report.passed else "failed",
        "what": "the package's MIL program interpreted op by op with NumPy/PyTorch (FP16 tensors rounded to FP16 "
                "between ops), fed the shared pre-processing's output for the bundle (letterbox padding in the "
                "mean colour), compared with FP32 PyTorch; not the Core ML runtime",
        "mil_ops": runtime.interpreter.op_types, **report.to_dict()}
    shapes, diffs = {}, {}
    rng = np.random.default_rng(1)
    for h, w in sizes:  # every size the model takes: output shapes and raw differences on random pixels
        pixels, size = rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"fixed:{h}x{w}"
        with single_thread():
            ((got, _),) = candidate.infer_arrays([pixels], resize=size)
            ((want, _),) = reference.infer_arrays([pixels], resize=size)
        priors = model.config.anchors.num_priors((h, w))
        shapes[f"{h}x{w}"] = {name: [1, *got[name].shape] for name in OUTPUTS}  # batch-1 programs
        diffs[f"{h}x{w}"] = {name: float(np.abs(got[name] - want[name]).max()) for name in OUTPUTS}
        wrong = {name: list(got[name].shape) for name, k in OUTPUT_COLUMNS.items() if got[name].shape != (priors, k)}
        if wrong:
            raise EdgefaceError(f"the Core ML program gives output shapes {wrong} at {h}x{w} (per image); "
                                f"expected ({priors}, k)")
    result["output_shapes"] = shapes
    result["max_abs_diff_random_pixels"] = diffs
    if not report.passed:
        raise report.failure("the converted Core ML program (interpreted)", "PyTorch",
                             "nothing was written. Use --no-verify to keep it anyway")
    return result


def prediction_unavailable(path: Path, kind: str, input_hw: tuple[int, int]) -> str | None:
    """None on macOS; elsewhere the reason Core ML cannot predict, with coremltools' own message."""
    if sys.platform == "darwin":
        return None
    ct = _coremltools()
    message = "CoreML.framework is not available"
    h, w = input_hw
    feed: dict[str, Any] = {INPUT_NAME: np.zeros((1, 3, h, w), np.float32)}
    if kind == "image":
        try:
            from PIL import Image
        except ImportError:  # coremltools refuses prediction before it looks at the inputs
            feed = {}
        else:
            feed = {INPUT_NAME: Image.fromarray(np.zeros((h, w, 3), np.uint8))}
    try:
        ct.models.MLModel(str(path)).predict(feed)
    except Exception as exc:  # coremltools raises a plain Exception
        message = str(exc)
    else:  # pragma: no cover - a non-macOS platform where Core ML predicts
        return None
    return f"Core ML prediction needs macOS: coremltools {ct.__version__} raises '{message}' elsewhere"


# --- the converter ----------------------------------------------------------------------------------------------


def describe_input(kind: str, sizes: list[tuple[int, int]], mean_bgr) -> dict[str, Any]:
    h, w = sizes[0]
    mean = [float(m) for m in mean_bgr]
    common = {"input_name": INPUT_NAME, "input_size": [h, w],
              "resize": "scale = min(H / h, W / w) keeping the aspect ratio, bilinear; the image at the top-left, "
                        "the rest padded (bottom/right); detections / scale = original pixels (not Vision's "
                        "scaleFit, which centres the image)",
              "batch": 1}
    if kind == "image":
        info = {"input_type": "image", "color_layout": "BGR", "bias": [-m for m in mean], "scale": 1.0,
                "pixel_range": "0-255", "pad_value_bgr": mean, **common,
                "app": (f"pass a {w}x{h} CVPixelBuffer (kCVPixelFormatType_32BGRA or 32ARGB) as '{INPUT_NAME}'; "
                        "Core ML reorders it to BGR and adds the bias (the mean) itself. Fill the padding with "
                        f"B,G,R = {mean} (zero after the bias, as the reference pads)")}
    else:
        info = {"input_type": "tensor", "dtype": "float32", "shape": [1, 3, h, w], "layout": "NCHW",
                "color_order": "BGR", "mean_bgr_subtracted_by_caller": mean, "pixel_range": "0-255 minus mean",
                "pad_value": 0.0, **common,
                "app": f"pass an MLMultiArray float32 [1, 3, {h}, {w}]: BGR pixels minus {mean}, zero padding"}
    if len(sizes) > 1:
        info["enumerated_sizes"] = [list(s) for s in sizes]
        info["input_size_note"] = ("the model also takes the enumerated sizes; the bundle's manifest (anchors, "
                                   "parity, resize) describes the default size")
    return info


def _describe_model(mlmodel, model, precision: str, kind: str, sizes: list[tuple[int, int]]) -> None:
    """What Xcode shows for the model: summary, input and output meanings, edgeface metadata."""

    h, w = sizes[0]
    mlmodel.short_description = f"RetinaFace {model.config.name} face detector ({precision}), exported by edgeface"
    mlmodel.input_description[INPUT_NAME] = (
        f"{w}x{h} BGR image, 0-255; the model subtracts the mean {list(model.config.mean_bgr)} itself"
        if kind == "image" else f"float32 [1, 3, {h}, {w}]: BGR pixels minus the mean {list(model.config.mean_bgr)}")
    for name in OUTPUTS:
        mlmodel.output_description[name] = OUTPUT_MEANINGS[name]
    mlmodel.user_defined_metadata.update({"edgeface.model": model.config.name, "edgeface.precision": precision,
                                          "edgeface.input_type": kind})


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    import torch  # deferred: PyTorch (export extra)

    ct = _coremltools()
    kind = _input_kind(request)
    sizes = _sizes(request)
    target = _deployment_target(ct, request)
    precision = request.precision
    if precision not in COMPUTE_PRECISION:
        raise EdgefaceError(f"Core ML precision {precision!r}: choose fp16, fp32 or int8")
    mean_bgr = model.config.mean_bgr

    exported, export_check = export_program(model, sizes)
    with warnings.catch_warnings():
        # coremltools' internals warn (deprecated registry access) hundreds of times per conversion
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            mlmodel = ct.convert(
                exported,
                inputs=[_input_type(ct, kind, sizes, mean_bgr)],
                outputs=[ct.TensorType(name=name, dtype=np.float32) for name in OUTPUTS],
                convert_to="mlprogram",
                minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
                skip_model_load=True,  # loading compiles the model (macOS only); the runtime does that when used
            )
        except Exception as exc:  # coremltools raises many types (NotImplementedError, ValueError, RuntimeError)
            raise EdgefaceError(f"coremltools could not convert the model ({type(exc).__name__}: {exc})") from None
    mlmodel, renamed = _rename_outputs(ct, mlmodel)
    calibration = None
    if precision == "int8":
        mlmodel, calibration = quantize_weights(ct, mlmodel)
    _describe_model(mlmodel, model, precision, kind, sizes)
    path = out_dir / MODEL_FILE
    mlmodel.save(str(path))
    # coremltools writes an ExecuTorch debug-handle map beside the model for torch.export sources; the package's
    # Manifest.json does not list it and Core ML never reads it.
    debug_map = path / DEBUG_MAP
    if debug_map.is_file():
        debug_map.unlink()

    spec_checks = check_package(path, kind=kind, sizes=sizes, precision=precision, anchors=model.config.anchors,
                                mean_bgr=mean_bgr, deployment_target=target.name)
    if request.verify:
        program_check = check_program(model, path, precision=precision, kind=kind, sizes=sizes)
    else:
        program_check = {"status": "skipped", "reason": "--no-verify"}
    not_runnable = prediction_unavailable(path, kind, sizes[0])

    priors = model.config.anchors.num_priors(sizes[0])
    extra = {
        **describe_input(kind, sizes, mean_bgr),
        "outputs": {name: [1, priors, k] for name, k in OUTPUT_COLUMNS.items()},
        "output_dtype": "float32",
        "model_type": "mlprogram",
        "minimum_deployment_target": target.name,
        "compute_precision": COMPUTE_PRECISION[precision],
        "weights": WEIGHTS[precision],
        "spec_checks": spec_checks,
        "program_check": program_check,
        "prediction_here": "not available (macOS only)" if not_runnable else "Core ML (parity below)",
    }
    notes = [
        "converted from a torch.export ExportedProgram (coremltools' TorchScript route fails with numpy >= 2.4)",
    ]
    if not_runnable:
        notes.append("checked on this machine: ExportedProgram vs PyTorch, the package's spec and precision, and "
                     "its MIL program interpreted op by op against PyTorch (target_info.program_check); Core ML "
                     "itself was not run")
    newest = getattr(getattr(ct, "_deps", None), "_TORCH_MAX_VERSION", None)
    if newest and _version_tuple(torch.__version__) > _version_tuple(newest):
        notes.append(f"coremltools {ct.__version__} is tested with torch up to {newest}; converted with torch "
                     f"{torch.__version__} (the checks above passed)")
    if renamed:
        notes.append(f"outputs renamed in the spec: {renamed}")
    return Conversion(
        files={"model": MODEL_FILE},
        layout="NCHW",
        input_dtype="float32",
        mean_in_graph=kind == "image",
        calibration=calibration,
        converter={"tool": "coremltools.convert (torch.export ExportedProgram -> ML Program)",
                   "exporter": "torch.export.export + run_decompositions({})",
                   "minimum_deployment_target": target.name,
                   "compute_precision": COMPUTE_PRECISION[precision],
                   "checks": {"export": export_check},
                   "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        not_runnable_here=not_runnable,
        extra=extra,
    )
