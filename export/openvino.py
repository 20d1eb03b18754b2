"""OpenVINO IR (Intel CPUs, integrated GPUs and Core Ultra NPUs): ``model.xml`` (the graph) + ``model.bin`` (the
weights), converted by OpenVINO's model-conversion API from the simplified FP32 ONNX model that the ONNX target
builds (:func:`edgeface.export.onnx.build`: the same names ``input`` / ``loc`` / ``conf`` / ``landmarks``, the
same static or dynamic sizes, onnxsim's own check). FP16: weights stored in float16 (``compress_to_fp16``), which
each device decompresses or computes in (the GPU and NPU run FP16 anyway). INT8: NNCF post-training quantisation
(``nncf.quantize``) on the real calibration images, with sensitive layers kept in float as the ONNX recipe does,
or (``max_drop``) NNCF's accuracy-controlled quantisation, which reverts layers to float until the WIDER FACE AP
on a validation subset is within ``max_drop`` points of the float model's.

Checked here: the IR against the ONNX model it came from (OpenVINO CPU vs onnxruntime, FP32), then, by the
export pipeline, the bundle in the OpenVINO runtime on the CPU against PyTorch on real images. The GPU and NPU
compile the same IR on the device; the runtime compiles for the device named and refuses otherwise."""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export import onnx as onnx_export
from edgeface.export import onnx_end2end
from edgeface.export.base import Conversion, ExportRequest, TargetOption, TargetSpec, parity_images
from edgeface.runtimes.openvino import OpenVINORuntime, import_openvino, ov_message

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.images import load_image
from edgeface.core.manifest import OUTPUTS, manifest_for_model
from edgeface.core.processing import ResizePolicy, preprocess
from edgeface.core.versions import library_versions
from edgeface.evaluation.accuracy import WIDER_SETTINGS, default_image_dir, select_images, to_wider_rows
from edgeface.evaluation.widerface import evaluate, image_key, load_ground_truth
from edgeface.inference.detector import Detector

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
FILES = {"model": MODEL_FILE, "weights": WEIGHTS_FILE}
END2END_FILES = {"end2end": "model_end2end.xml", "end2end_weights": "model_end2end.bin"}
# INT8 recipe, chosen by measured WIDER FACE AP (README, "Choosing the INT8 recipes of the new targets"): NNCF's
# "mixed" preset
# (symmetric int8 weights, asymmetric activations: LeakyReLU outputs are not symmetric around 0), and, as in the
# ONNX recipe, the output heads and the full-resolution MobileNet stage kept in float.
INT8_PRESET = "mixed"
INT8_PRESETS = ("mixed", "performance")
INT8_KEEP_FLOAT = ("heads", "/body/stage1/")
# OpenVINO node names of the output heads (the ONNX node names, which the conversion keeps).
HEAD_PATTERN = r"/(Class|Bbox|Landmark)Head\.\d+/.*"
# Accuracy control: WIDER FACE val images with ground truth it validates candidates on, spread over all events.
VALIDATION_N = 100
# Operations NNCF quantises (their activation inputs get a FakeQuantize): what "kept in float" is counted over.
QUANTIZABLE = ("Convolution", "GroupConvolution", "MatMul")


def preflight(precision: str, options: dict[str, Any]) -> None:
    """Refused before any work (calibration included): an end-to-end INT8 model."""
    if options.get("end2end") and precision == "int8":
        raise EdgefaceError("--end2end with the openvino target is for fp32 and fp16 (NNCF quantises the network, "
                            "not an appended NMS graph); export int8 without it, or use --target onnx --end2end")


SPEC = TargetSpec(
    name="openvino",
    title="OpenVINO",
    aliases=("intel",),
    # FP16 first: OpenVINO's own default IR (ovc compresses to FP16), what Intel GPUs and NPUs compute in
    precisions=("fp16", "fp32", "int8"),
    calibrated=("int8",),
    options=(
        TargetOption("preset", "int8: NNCF preset, mixed (default: symmetric weights, asymmetric activations) or "
                     "performance (symmetric both)", default=INT8_PRESET, choices=INT8_PRESETS),
        TargetOption("keep_float", "int8: nodes kept in float: 'heads' and node-name prefixes (default "
                     f"{list(INT8_KEEP_FLOAT)}; none with max_drop)"),
        TargetOption("fast_bias_correction", "int8: NNCF's fast bias correction (default False: the full one, "
                     "which kept more AP at the same speed: README)", default=False, choices=(True, False)),
        TargetOption("max_drop", "int8: NNCF accuracy-controlled quantisation: revert layers to float until the "
                     "mean WIDER FACE AP (easy/medium/hard) of a validation subset is within this many points of "
                     "FP32 (needs the ../shared WIDER ground truth)", flag="--max-drop"),
        TargetOption("validation_n", f"int8 with --max-drop: WIDER val images validated on (default {VALIDATION_N})",
                     default=VALIDATION_N),
        TargetOption("end2end", f"fp32 / fp16: also {END2END_FILES['end2end']}: decode, score threshold, top-k and "
                     "NMS in the IR (static size)", flag="--end2end", default=False),
    ),
    extra="openvino",
    runtime="openvino",
    libraries=("torch", "onnx", "onnxsim", "onnxruntime", "openvino", "nncf"),
    bench=(("fp32", None), ("fp16", None), ("int8", None)),
    preflight=preflight,
)


def import_nncf():
    """``nncf``, imported after OpenVINO's telemetry is blocked (:func:`import_openvino`): NNCF sends its own
    through the same package otherwise."""
    import_openvino()
    return require("nncf", "openvino", "OpenVINO INT8 quantisation")


def to_openvino(proto) -> Any:
    """An ONNX model -> ``openvino.Model`` (OpenVINO's ONNX frontend through ``convert_model``, which takes a
    file: the model is written to a temporary folder first)."""
    import onnx  # deferred: the converters (export extra)

    ov = import_openvino()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, path)
        try:
            return ov.convert_model(str(path))
        except Exception as exc:  # ovc's Error / RuntimeError with a C++ report
            raise EdgefaceError(f"OpenVINO could not convert the ONNX model: {ov_message(exc)}") from None


def _compile_cpu(ov_model, precision_hint: str | None = "f32"):
    ov = import_openvino()
    config = {"INFERENCE_PRECISION_HINT": precision_hint} if precision_hint else {}
    return ov.Core().compile_model(ov_model, "CPU", config)


def _max_diff_to_onnx(ov_model, proto, input_hw: tuple[int, int] | None) -> float:
    """Largest difference of any output of the FP32 IR (OpenVINO CPU, f32) to the ONNX model it came from
    (onnxruntime) on one input: the conversion itself, apart from any later compression or quantisation."""
    import onnxruntime as ort

    h, w = input_hw or (480, 640)
    x = np.random.default_rng(0).normal(0, 60, (1, 3, h, w)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"input": x})))
    try:
        got = _compile_cpu(ov_model)({"input": x})
    except RuntimeError as exc:  # OpenVINO's C++ exceptions arrive as RuntimeError with a long report
        raise EdgefaceError(f"OpenVINO could not compile or run the converted IR on the CPU: {ov_message(exc)}"
                            ) from None
    return max(float(np.abs(got[name] - expected[name]).max()) for name in OUTPUTS)


def _fp16_network(proto):
    """The end-to-end ONNX model with the network's float32 weights rounded to float16 values (still stored as
    float32): the numbers of the FP16 model.xml, whose weights OpenVINO stores in float16 and widens at load.
    ``compress_to_fp16`` would round the appended priors too (0.03 pixel off the host pipeline at 320 x 320).
    Changes ``proto`` in place (a copy from :func:`~edgeface.export.onnx_end2end.append_postprocess`) and returns
    it."""
    from onnx import numpy_helper

    for tensor in proto.graph.initializer:
        if tensor.data_type == 1 and not tensor.name.startswith("pp_"):  # FLOAT; pp_: the post-processing's
            values = numpy_helper.to_array(tensor).astype(np.float16).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return proto


def _ir_runners(out_dir: Path):
    """The bundle's two IRs as written (fp16 compression included), compiled for the CPU in f32: the network for
    the host pipeline, and the end-to-end model (:func:`edgeface.export.onnx_end2end.verify`'s two sides)."""
    ov = import_openvino()
    core = ov.Core()
    raw = _compile_cpu(core.read_model(str(out_dir / MODEL_FILE), str(out_dir / WEIGHTS_FILE)))
    full = _compile_cpu(core.read_model(str(out_dir / END2END_FILES["end2end"]),
                                        str(out_dir / END2END_FILES["end2end_weights"])))

    def run_raw(batch):
        out = raw({"input": batch})
        return {name: out[raw.output(name)] for name in OUTPUTS}

    def run_end2end(feed):
        out = full(feed)
        return [out[full.output(name)] for name in onnx_end2end.END2END_OUTPUTS]

    return run_raw, run_end2end


def _ignored_scope(ov_model, keep_float):
    """``keep_float`` ("heads" and node-name prefixes) -> an ``nncf.IgnoredScope`` of regular expressions over the
    OpenVINO node names. A prefix that matches no node is refused (a typo would otherwise quantise everything)."""
    nncf = import_nncf()
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    names = [op.get_friendly_name() for op in ov_model.get_ops()]
    patterns = []
    for entry in keep_float:
        pattern = HEAD_PATTERN if entry == "heads" else re.escape(entry) + ".*"
        if not any(re.fullmatch(pattern, name) for name in names):
            raise EdgefaceError(f"keep_float {entry!r} names no node of the model (node names look like "
                                "'/body/stage1/stage1.0/...', '/fpn/...', '/ssh1/...'; or 'heads')")
        patterns.append(pattern)
    return nncf.IgnoredScope(patterns=patterns) if patterns else None, list(keep_float)


def float_operations(ov_model) -> tuple[list[str], int]:
    """The quantisable operations (convolutions, matrix products) whose activation input is not quantised in an
    NNCF-quantised model: the layers kept, or reverted, to float. Returns (their names, the number of quantisable
    operations)."""
    kept, total = [], 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in QUANTIZABLE:
            continue
        total += 1
        source = op.input_value(0).get_node()
        if source.get_type_name() != "FakeQuantize":
            kept.append(op.get_friendly_name())
    return kept, total


def _int8(model: torch.nn.Module, ov_model, request: ExportRequest) -> tuple[Any, dict[str, Any]]:
    nncf = import_nncf()
    options = request.options
    preset_name = options.get("preset", INT8_PRESET)
    preset = {"mixed": nncf.QuantizationPreset.MIXED,
              "performance": nncf.QuantizationPreset.PERFORMANCE}[preset_name]
    fast_bias = options.get("fast_bias_correction", False)  # a boolean: checked against the option's choices
    max_drop = options.get("max_drop")
    # The fixed recipe keeps its float layers; accuracy control starts from an all-int8 model and chooses itself
    # which layers go back to float (a keep_float given with it is kept as well).
    scope, keep = _ignored_scope(ov_model, options.get("keep_float", INT8_KEEP_FLOAT if max_drop is None else ()))
    calibration = nncf.Dataset(list(request.calibration))
    common = dict(preset=preset, subset_size=len(request.calibration), fast_bias_correction=fast_bias,
                  ignored_scope=scope)
    info: dict[str, Any] = {"tool": "nncf.quantize", "images": len(request.calibration), "preset": preset_name,
                            "weights": "int8 per-channel symmetric",
                            "activations": ("int8 symmetric" if preset_name == "performance"
                                            else "uint8/int8 asymmetric"),
                            "fast_bias_correction": fast_bias, "keep_float": keep,
                            "source": request.calibration_source}
    started = time.perf_counter()
    try:
        if max_drop is None:
            quantized = nncf.quantize(ov_model, calibration, **common)
        else:
            quantized, control = _quantize_with_accuracy_control(nncf, model, ov_model, calibration, request,
                                                                 _max_drop(max_drop), common)
            info["tool"] = "nncf.quantize_with_accuracy_control"
            info["accuracy_control"] = control
    except EdgefaceError:
        raise
    except Exception as exc:  # nncf.ValidationError, RuntimeError from OpenVINO, ...
        raise EdgefaceError(f"NNCF could not quantise the model: {ov_message(exc)}") from None
    info["seconds"] = round(time.perf_counter() - started, 1)
    kept, total = float_operations(quantized)
    info["nodes_kept_float"] = kept
    info["quantizable_nodes"] = total
    return quantized, info


def _max_drop(value: Any) -> float:
    try:
        drop = float(value)
    except (TypeError, ValueError):
        drop = -1.0
    if not 0 <= drop <= 100 or isinstance(value, bool):
        raise EdgefaceError(f"--max-drop {value!r}: give the largest AP drop to accept, in AP points (e.g. 1.0)")
    return drop


def _validation_source() -> tuple[Path, Path]:
    """The WIDER FACE val images and ground truth accuracy control validates on (../shared or $EDGEFACE_SHARED)."""
    images = default_image_dir()
    gt_dir = images.parents[1] / "ground_truth" if images else None
    if gt_dir is None or not gt_dir.is_dir():
        raise EdgefaceError("--max-drop validates on WIDER FACE images with ground truth, found none (expected "
                            "../shared/data/widerface/val/images and ../ground_truth, or $EDGEFACE_SHARED); "
                            "export without --max-drop for the fixed INT8 recipe")
    return images, gt_dir


def _quantize_with_accuracy_control(nncf, model, ov_model, calibration, request: ExportRequest, max_drop: float,
                                    common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``nncf.quantize_with_accuracy_control`` with WIDER FACE AP as the metric: candidates (the float model, the
    fully quantised one, then ones with layers reverted to float) run through the OpenVINO runtime and the shared
    detector on ``validation_n`` val images at the bundle's input policy (original scale for a dynamic model),
    scored by the official protocol; the metric is the mean of the easy, medium and hard AP, in points. NNCF
    compiles the candidates itself, with the CPU plugin's default inference precision: on CPUs with AMX /
    AVX512-BF16 (this machine's) the float reference and the float layers are scored in bf16, as that CPU runs
    them."""
    images, gt_dir = _validation_source()
    gt = load_ground_truth(gt_dir)
    validation_n = request.options.get("validation_n", VALIDATION_N)
    if isinstance(validation_n, bool) or not isinstance(validation_n, int) or validation_n < 1:
        raise EdgefaceError(f"option 'validation_n' {validation_n!r}: give a number of images, at least 1")
    paths = select_images(images, gt, validation_n)
    policy = ResizePolicy("fixed", request.input_hw) if request.input_hw else ResizePolicy()
    manifest = manifest_for_model(model, target="openvino", precision="int8", files=FILES,
                                  input_hw=request.input_hw, dynamic=onnx_export.dynamic_ranges(request))
    mean = model.config.mean_bgr
    evaluations = []

    def transform(path):  # a validation item as the model input, for NNCF's ranking of layers by output change
        return preprocess([load_image(path)], policy=policy, mean_bgr=mean)[0]

    def validate(compiled, items) -> tuple[float, list[list[np.ndarray]]]:
        """(metric, each item's raw outputs): NNCF ranks layers by how much reverting them moves the outputs."""
        runtime = OpenVINORuntime(manifest, compiled, source="NNCF candidate")
        detector = Detector(runtime=runtime, resize=policy, **WIDER_SETTINGS)
        predictions, outputs = {}, []
        for path in items:
            [(raw, detections)] = detector.infer_arrays([load_image(path)])
            predictions[image_key(path)] = to_wider_rows(detections)
            outputs.append([raw[name][None] for name in OUTPUTS])  # as the model returns them: (1, A, k)
        if len(predictions) < len(paths):  # NNCF's one-item probe of what the function returns
            return 0.0, outputs
        ap = evaluate(predictions, gt, images=list(predictions)).ap
        evaluations.append({k: round(v, 5) for k, v in ap.items()})
        return 100.0 * float(np.mean(list(ap.values()))), outputs

    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        ov_model, calibration, nncf.Dataset(paths, transform), validation_fn=validate, max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE, **common)
    seconds = time.perf_counter() - started
    runs = len(evaluations)
    validate(_compile_cpu(quantized, None), paths)  # the model NNCF returned, scored once more on the same images
    float_ap, chosen_ap = evaluations[0], evaluations[-1]
    control = {"metric": "mean WIDER FACE AP (easy, medium, hard), points", "max_drop": max_drop,
               "validation_images": len(paths), "validation_resize": str(policy), "images_dir": str(images),
               "float_ap": float_ap, "chosen_ap": chosen_ap,
               "drop": round(100 * (np.mean(list(float_ap.values())) - np.mean(list(chosen_ap.values()))), 3),
               "validations": runs, "seconds": round(seconds, 1)}
    return quantized, control


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    """Write ``model.xml`` + ``model.bin`` for ``request`` into ``out_dir``.

    Raises :class:`EdgefaceError` (one line) when OpenVINO cannot convert the ONNX model, NNCF cannot quantise it,
    ``keep_float`` names no node, or ``max_drop`` is given without WIDER ground truth or with a bad value."""
    ov = import_openvino()
    end2end = bool(request.options.get("end2end"))  # fp32 / fp16, static size: checked by the pipeline (preflight)
    if request.options.get("max_drop") is not None:  # refused before any work
        if request.precision != "int8":
            raise EdgefaceError(f"--max-drop is for --precision int8 (accuracy-controlled quantisation), not "
                                f"{request.precision}")
        _max_drop(request.options["max_drop"])
        _validation_source()
    fp32 = dataclasses.replace(request, precision="fp32")
    proto, _, checks = onnx_export.build(model, fp32)
    ov_model = to_openvino(proto)
    if request.verify:
        checks["openvino_vs_onnx_max_abs_diff"] = _max_diff_to_onnx(ov_model, proto, request.input_hw)
        if checks["openvino_vs_onnx_max_abs_diff"] > 1e-3:
            raise EdgefaceError(f"the OpenVINO IR differs from the ONNX model it was converted from by "
                                f"{checks['openvino_vs_onnx_max_abs_diff']:.2e} (FP32, CPU)")
    calibration = None
    if request.precision == "int8":
        ov_model, calibration = _int8(model, ov_model, request)
    try:
        ov.save_model(ov_model, str(out_dir / MODEL_FILE), compress_to_fp16=request.precision == "fp16")
    except RuntimeError as exc:
        raise EdgefaceError(f"OpenVINO could not write the IR: {ov_message(exc)}") from None
    operators = sorted({op.get_type_name() for op in ov_model.get_ops()})
    files, extra = dict(FILES), {}
    if end2end:
        full = onnx_end2end.append_postprocess(proto, request.input_hw, model.config.anchors)
        if request.precision == "fp16":
            full = _fp16_network(full)
        try:
            ov.save_model(to_openvino(full), str(out_dir / END2END_FILES["end2end"]), compress_to_fp16=False)
        except RuntimeError as exc:
            raise EdgefaceError(f"OpenVINO could not write the end-to-end IR: {ov_message(exc)}") from None
        files.update(END2END_FILES)
        check = onnx_end2end.verify(*_ir_runners(out_dir), request.input_hw, model.config.anchors,
                                    model.config.mean_bgr, parity_images(),
                                    against="OpenVINO CPU (f32) on model.xml + edgeface.core.processing.postprocess")
        extra["end2end"] = {**onnx_end2end.describe(request.input_hw), "check": check,
                            "weights": "float16 values stored as float32 (the priors exact)"
                            if request.precision == "fp16" else "float32"}
    return Conversion(
        files=files,
        dynamic=onnx_export.dynamic_ranges(request),
        calibration=calibration,
        converter={"exporter": "torch.onnx.export (TorchScript) -> onnxsim -> openvino.convert_model",
                   "opset": request.opset, "checks": checks, "versions": library_versions(*SPEC.libraries)},
        notes=["Runs on cpu, gpu (Intel integrated graphics) or npu (Core Ultra; fixed input sizes only) with "
               "`--device`; compiled for exactly that device, never a silent CPU fall-back."],
        extra={
            **extra,
            "ir": {"compressed_to_fp16": request.precision == "fp16", "operators": operators},
            "verified_here": ["IR vs its ONNX model (OpenVINO CPU vs onnxruntime, FP32)",
                              "bundle vs PyTorch on real images (OpenVINO CPU)"],
            "verified_on_device_only": ["compilation and outputs on Intel GPU and NPU (no such device here)"]
            + (["the end-to-end model on an Intel GPU, whose plugin computes FP16 bundles in f16 (the decode "
                "and NMS included); the NPU does not take its dynamic outputs"] if end2end else []),
        },
    )
