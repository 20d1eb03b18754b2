"""ONNX: named inputs/outputs, static or dynamic (batch, height, width), simplified with onnxsim and checked after
simplification; FP16 with float32 inputs/outputs; INT8 by onnxruntime static quantisation (QDQ, per-channel
weights) calibrated on real images."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export import onnx_end2end
from edgeface.export.base import Conversion, ExportRequest, TargetOption, TargetSpec, parity_images
from edgeface.export.qat_run import QAT_OPTION, qat_run_for, qat_summary

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.manifest import OUTPUTS
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    import onnx
    import torch

MODEL_FILE = "model.onnx"
END2END_FILE = "model_end2end.onnx"
# Dynamic ranges recorded in the manifest (TensorRT optimisation profiles use them too): [min, opt, max].
DYNAMIC_RANGES = {"batch": [1, 1, 8], "height": [32, 640, 2048], "width": [32, 640, 2048]}
# INT8 recipe, chosen by measured WIDER FACE AP (README, "Choosing the INT8 recipe"): min-max calibration, and
# kept in float the output heads (decoded with exp()) and the full-resolution MobileNet stage (stage1, 8-64
# channels), which otherwise costs 1.7-1.9 AP points; TensorRT's symmetric activations need all of stage1.
INT8_METHOD = "minmax"
INT8_PERCENTILE = 99.999
INT8_KEEP_FLOAT = ("heads", "/body/stage1/")
INT8_METHODS = ("minmax", "entropy", "percentile")

# Options shared with the TensorRT target, which exports through build() below.
OPSET = TargetOption("opset", "ONNX opset, 13-20 (default 17, which TensorRT 8.5+ parses)", flag="--opset",
                     default=17, choices=range(13, 21))
INT8_OPTIONS = (
    TargetOption("method", "int8 calibration: minmax (default), entropy or percentile", default=INT8_METHOD,
                 choices=INT8_METHODS),
    TargetOption("keep_float", "int8: nodes kept in float: 'heads' and node-name prefixes (default "
                 f"{list(INT8_KEEP_FLOAT)})"),
    TargetOption("percentile", f"int8 with method percentile: the percentile (default {INT8_PERCENTILE})"),
    QAT_OPTION,
)
# Operators whose output onnxruntime quantises with their input's parameters (values are only moved or copied).
PASS_THROUGH = {"Resize", "Slice", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
SPEC = TargetSpec(
    name="onnx",
    title="ONNX",
    aliases=("x86",),
    precisions=("fp32", "fp16", "int8"),
    calibrated=("int8",),
    options=(OPSET, *INT8_OPTIONS,
             TargetOption("end2end", f"also an end-to-end model ({END2END_FILE}; openvino: model_end2end.xml/.bin, "
                          "fp32/fp16): decode, score threshold, top-k and NMS in the graph (final boxes, scores, "
                          "landmarks by name; static size)", flag="--end2end", default=False)),
    extra="onnx",
    runtime="onnxruntime",
    libraries=("torch", "onnx", "onnxsim", "onnxruntime", "onnxconverter-common"),
    bench=(("fp32", None), ("fp16", None), ("int8", None)),
)


def export_float(model: torch.nn.Module, input_hw: tuple[int, int] | None, dynamic_batch: bool, opset: int
                 ) -> onnx.ModelProto:
    """torch -> ONNX (TorchScript exporter: it targets opset 17, which every TensorRT since 8.6 parses)."""
    import onnx  # deferred: the converters (export extra), not needed to read SPEC
    import torch  # deferred: PyTorch (export extra)

    h, w = input_hw or (640, 640)
    dynamic_axes = None
    if input_hw is None or dynamic_batch:
        axes = {0: "batch"} if dynamic_batch else {}
        if input_hw is None:
            axes |= {2: "height", 3: "width"}
        out_axes = {0: "batch"} if dynamic_batch else {}
        if input_hw is None:
            out_axes |= {1: "priors"}
        dynamic_axes = {"input": axes, **{name: out_axes for name in OUTPUTS}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice; its output is what TensorRT needs
        torch.onnx.export(model.eval(), torch.zeros(1, 3, h, w), buffer, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=list(OUTPUTS), dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    return onnx.load_from_string(buffer.getvalue())


def simplify(proto: onnx.ModelProto, input_hw: tuple[int, int] | None) -> onnx.ModelProto:
    import onnx  # deferred: the converters (export extra)

    onnxsim = require("onnxsim", "onnx", "ONNX simplification")
    kwargs: dict[str, Any] = {}
    if input_hw is None:  # give onnxsim a concrete shape to check with; the graph stays dynamic
        kwargs["test_input_shapes"] = {"input": [1, 3, 480, 640]}
    simplified, ok = onnxsim.simplify(proto, **kwargs)
    if not ok:
        raise EdgefaceError("onnxsim could not validate the simplified ONNX model against the original")
    onnx.checker.check_model(simplified)
    return simplified


def max_output_diff(a: onnx.ModelProto, b: onnx.ModelProto, input_hw: tuple[int, int] | None) -> float:
    import onnxruntime as ort

    h, w = input_hw or (480, 640)
    x = np.random.default_rng(0).normal(0, 60, (1, 3, h, w)).astype(np.float32)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
            for m in (a, b)]
    return max(float(np.abs(p - q).max()) for p, q in zip(*outs))


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    float16 = require("onnxconverter_common", "onnx", "ONNX FP16 conversion")
    # Inputs and outputs stay float32 so that every caller feeds and reads the same tensors.
    return float16.float16.convert_float_to_float16(proto, keep_io_types=True)


def head_nodes(proto: onnx.ModelProto) -> list[str]:
    """The nodes between the last SSH activations and the outputs: 1x1 head convolutions, reshapes, concats,
    softmax. Their outputs are decoded (exp of box sizes, landmark offsets), which 8-bit steps visibly disturb."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    keep, stack = set(), list(OUTPUTS)
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in keep:
            continue
        keep.add(node.name)
        if node.op_type in ("Conv", "Shape"):
            continue  # a head conv: stop at its input, the SSH output; a Shape reads no values
        stack.extend(node.input)
    return sorted(keep)


class CalibrationReader:
    """onnxruntime calibration data reader over pre-processed real images (NCHW float32 batches fed as ``input``)."""

    def __init__(self, batches: tuple[np.ndarray, ...]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}


def to_int8(proto: onnx.ModelProto, calibration: tuple[np.ndarray, ...], *, method: str = INT8_METHOD,
            keep_float: tuple[str, ...] = INT8_KEEP_FLOAT, symmetric_activations: bool = False,
            percentile: float = INT8_PERCENTILE, overrides: dict[str, list[dict[str, Any]]] | None = None,
            ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Static INT8 (QDQ, per-channel weights). ``symmetric_activations`` for TensorRT, which takes symmetric
    int8 only. ``overrides``: onnxruntime's ``TensorQuantOverrides`` (tensor name -> [{"scale", "zero_point"}]),
    the learned quantisation of a QAT run (:func:`tensor_overrides`)."""
    quantization = require("onnxruntime.quantization", "onnx", "ONNX INT8 quantisation")
    import tempfile

    import onnx  # deferred: the converters (export extra)

    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    # "heads" names the output heads; any other entry is a node-name prefix such as "/body/stage1/".
    exclude = head_nodes(proto) if "heads" in keep_float else []
    exclude += [n.name for n in proto.graph.node
                if any(n.name.startswith(p) for p in keep_float if p != "heads") and n.name not in exclude]
    extra = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        # Its log chatter (a generic "consider pre-processing" advice on the root logger, which does not apply to
        # dynamic-shape models) is silenced with every converter's (edgeface.export.base.quiet).
        quantization.quantize_static(
            str(src), str(dst), CalibrationReader(calibration),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=(quantization.QuantType.QInt8 if symmetric_activations
                             else quantization.QuantType.QUInt8),
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=methods[method],
            nodes_to_exclude=exclude,
            extra_options=extra,
        )
        quantized = onnx.load(dst)
    info = {"method": method, "images": len(calibration), "format": "QDQ", "weights": "int8 per-channel symmetric",
            "activations": "int8 symmetric" if symmetric_activations else "uint8 asymmetric",
            "nodes_kept_float": exclude, "tool": "onnxruntime.quantization.quantize_static"}
    if method == "percentile":
        info["percentile"] = percentile
    return quantized, info


def quantised_tensors(proto: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Tensor name -> (scale, zero point) of each QuantizeLinear on an activation of a QDQ model (onnxruntime names
    a quantised graph output ``<name>_QuantizeLinear_Input``; the original name is given)."""
    from onnx import numpy_helper  # deferred: the converters (export extra)

    constants = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            name = node.input[0].removesuffix("_QuantizeLinear_Input")
            out[name] = (float(constants[node.input[1]]), int(constants[node.input[2]]))
    return out


def tensor_overrides(proto: onnx.ModelProto, learned: dict[str, tuple[float, int]]
                     ) -> dict[str, list[dict[str, Any]]]:
    """``TensorQuantOverrides`` for :func:`to_int8` on the float graph ``proto``: the ``learned`` (scale, zero
    point) of each tensor, and for each pass-through operator's output (:data:`PASS_THROUGH`) those of the tensor it
    copies. Raises :class:`EdgefaceError` when a learned tensor is not in the graph."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    absent = sorted(set(learned) - set(producers) - {i.name for i in proto.graph.input})
    if absent:
        raise EdgefaceError(f"{len(absent)} tensors of the QAT run are not in the exported graph (e.g. {absent[0]}): "
                            "export with the opset the QAT run used")
    chosen = dict(learned)
    for node in proto.graph.node:
        if node.op_type in PASS_THROUGH:
            source = node.input[0]
            while source not in learned and source in producers and producers[source].op_type in PASS_THROUGH:
                source = producers[source].input[0]
            if source in learned:
                chosen[node.output[0]] = learned[source]
    return {name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, np.uint8)}]
            for name, (scale, zero) in chosen.items()}


def build(model: torch.nn.Module, request: ExportRequest, *, symmetric_activations: bool = False
          ) -> tuple[onnx.ModelProto, dict[str, Any] | None, dict[str, Any]]:
    """The ONNX model of a request, with calibration details and checks; shared with the TensorRT target."""
    import onnx  # deferred: the converters (export extra)

    proto = export_float(model, request.input_hw, request.dynamic_batch, request.opset)
    simplified = simplify(proto, request.input_hw)
    checks = {"onnxsim_max_abs_diff": max_output_diff(proto, simplified, request.input_hw),
              "nodes_before_simplify": len(proto.graph.node), "nodes": len(simplified.graph.node)}
    if checks["onnxsim_max_abs_diff"] > 1e-3:
        raise EdgefaceError(f"onnxsim changed the model's outputs by {checks['onnxsim_max_abs_diff']:.2e}")
    calibration = None
    if request.options.get("qat") and request.precision != "int8":
        raise EdgefaceError(f"--qat is for --precision int8 (a full-integer model), not {request.precision}")
    if request.precision == "fp16":
        simplified = to_fp16(simplified)
    elif request.precision == "int8":
        options = {k: request.options[k] for k in ("method", "keep_float", "percentile") if k in request.options}
        qat = None
        if request.options.get("qat"):
            qat = _qat_for(model, request)
            options = {"keep_float": (), "overrides": tensor_overrides(simplified, qat["tensors"])}
        simplified, calibration = to_int8(simplified, request.calibration,
                                          symmetric_activations=symmetric_activations, **options)
        calibration["source"] = request.calibration_source
        if qat is not None:
            calibration["qat"] = qat_summary(qat)
    onnx.checker.check_model(simplified)
    return simplified, calibration, checks


def _qat_for(model: torch.nn.Module, request: ExportRequest) -> dict[str, Any]:
    """The QAT record of ``request.options["qat"]``, refused with its reason when it cannot apply."""
    if kept := request.options.get("keep_float"):
        raise EdgefaceError(f"--qat makes every operator integer; drop --keep-float ({kept})")
    if given := [name for name in ("method", "percentile") if request.options.get(name) is not None]:
        raise EdgefaceError(f"--qat uses the run's learned quantisation, not a calibration method: drop "
                            f"{', '.join(given)}")
    qat = qat_run_for(model, request.options["qat"])
    if request.opset != qat.get("opset", request.opset):
        raise EdgefaceError(f"the QAT run named the tensors of an opset {qat['opset']} export; export with "
                            f"--opset {qat['opset']}")
    return qat


def dynamic_ranges(request: ExportRequest) -> dict[str, list[int]] | None:
    dims = {}
    if request.dynamic_batch:
        dims["batch"] = DYNAMIC_RANGES["batch"]
    if request.input_hw is None:
        dims |= {"height": DYNAMIC_RANGES["height"], "width": DYNAMIC_RANGES["width"]}
    return dims or None


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    import onnx  # deferred: the converters (export extra)

    end2end = bool(request.options.get("end2end"))  # a static size: checked by the pipeline before any work
    proto, calibration, checks = build(model, request)
    onnx.save(proto, out_dir / MODEL_FILE)
    files, extra, notes = {"model": MODEL_FILE}, {}, []
    if end2end:
        full = onnx_end2end.append_postprocess(proto, request.input_hw, model.config.anchors)
        onnx.save(full, out_dir / END2END_FILE)
        files["end2end"] = END2END_FILE
        check = onnx_end2end.verify(*onnx_end2end.onnxruntime_runners(proto, full), request.input_hw,
                                    model.config.anchors, model.config.mean_bgr, parity_images(),
                                    against="onnxruntime + edgeface.core.processing.postprocess")
        extra["end2end"] = {**onnx_end2end.describe(request.input_hw), "check": check}
        notes.append(f"{END2END_FILE}: decode, score threshold, top-k and NMS in the graph (inputs score_threshold, "
                     "iou_threshold, pixel; outputs boxes, scores, landmarks, num_detections in input pixels): "
                     "target_info.end2end")
    return Conversion(
        files=files,
        dynamic=dynamic_ranges(request),
        calibration=calibration,
        converter={"exporter": "torch.onnx.export (TorchScript)", "opset": request.opset, "simplifier": "onnxsim",
                   "checks": checks,
                   "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        extra=extra,
    )
