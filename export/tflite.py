"""TFLite (LiteRT): one static model per input size, NHWC float32 input (what Android / Raspberry Pi apps feed).

- fp32: ``litert_torch.convert`` of the model behind a small NHWC -> NCHW permute (TFLite convolutions are NHWC,
  so the permute folds away and the graph has no transpose).
- fp16: FP16 weights (ai-edge-quantizer ``float_casting``, weight-only), float32 compute and I/O.
- int8: ai-edge-quantizer ``static_wi8_ai8`` (int8 per-channel symmetric weights, int8 per-tensor asymmetric
  activations, min/max ranges from real images). Float32 input/outputs by default; ``options={"int8_io": True}``
  makes the input and outputs int8 tensors themselves (for NPUs), with their scales and zero points in the manifest.

  Measured: an all-8-bit graph of RetinaFace-MobileNet0.25 does not reliably reproduce PyTorch within the INT8
  parity tolerance (65% of faces at IoU >= 0.9 on 60 WIDER images at 320x320, 73% on the parity set at 640x640;
  the boxes are a few percent off). Percentile ranges, global min/max, cross-layer equalisation and splitting the
  LeakyReLU convolutions did not fix it; the error comes from the first backbone stage (stride 2-8, 8-64
  channels): with it in float or at int16 activations, 95%. Hence, for that model (``options`` override them):

  - ``keep_float`` (float-I/O default ``["body.stage1"]``): module paths computed in float. Such a model is also
    faster on a CPU than FP32 and than the all-int8 one.
  - ``int16_activations`` (int8-I/O default ``["body.stage1"]``): module paths with int16 activations (16x8):
    integer-only for NPUs with 16x8 support, slow on CPU (XNNPACK has no int16 kernels);
    ``{"int8_io": True, "int16_activations": []}`` gives the all-int8 graph (e.g. for int8-only NPUs).

  Both are recorded in the manifest's calibration section (with the op count per dtype) and its notes.

  ``qat`` (``--qat RUN``, a folder of ``edgeface train --qat``) exports the run's weights, whose stage1 is equalised
  (cross-layer, :mod:`edgeface.training.equalize`) and trained under 8-bit fake quantisation, as an all-int8 graph:
  nothing in float or int16, ranges by the same min-max calibration. Measured with ``--int8-io`` at 640x640: parity
  92.9% of faces, WIDER AP on the 834 shared val images -0.36 / -0.52 / -0.60 points against FP32 PyTorch (README).

  ai-edge-quantizer 0.10 has no integer LEAKY_RELU (it would run in float between a DEQUANTIZE and a QUANTIZE),
  so in the integer part every LeakyReLU(a) (0 < a < 1) is exported as ``maximum(x, a * x)`` (the same function:
  MUL + MAXIMUM, both integer ops); LeakyReLU(0) becomes RELU.

Which TFLite output is ``loc`` / ``conf`` / ``landmarks`` is not assumed: it is established by running the
converted file in the LiteRT interpreter on real images and comparing with PyTorch, anchor level by anchor level,
and recorded in the manifest (``target_info.output_tensors``); an output that reproduces no PyTorch output (the
scrambled-output failure of other converters) fails the export.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export.base import (
    DEFAULT_IMGSZ,
    Conversion,
    ExportRequest,
    TargetOption,
    TargetSpec,
    binding_photos,
    choose_outputs,
    level_errors,
)
from edgeface.export.qat_run import QAT_OPTION, qat_run_for, qat_summary
from edgeface.runtimes.tflite import load_interpreter

from edgeface.core.errors import EdgefaceError, require
from edgeface.core.manifest import OUTPUTS
from edgeface.core.processing import ResizePolicy, dequantize, level_slices, preprocess, quantize
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
INPUT_NAME = "input"
INT8_RECIPE = "static_wi8_ai8"
# The modules a full 8-bit graph of the MobileNet-0.25 RetinaFace cannot carry within the parity tolerance (see the
# module docstring): computed in float in a float-I/O INT8 model, with int16 activations in an int8-I/O one.
DEFAULT_SENSITIVE = ("body.stage1",)
# Output mapping check: the worst, over anchor levels, RMS difference between a TFLite output and a PyTorch output
# divided by the PyTorch output's spread (standard deviation over the priors of that level), on real images.
# 0 = identical; priors in a wrong order give about sqrt(2). Measured on correct outputs at 320x320: fp32 < 2e-5,
# fp16 < 0.01, int8 with the default recipes < 0.3, the all-int8 graph < 0.5.
MAPPING_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "int8": 0.7}
MAPPING_CALIBRATION_IMAGES = 3  # calibration images used for the check besides the bundled photo (and a crop)
SPEC = TargetSpec(
    name="tflite",
    title="TFLite",
    aliases=("android", "rpi"),
    precisions=("fp32", "fp16", "int8"),
    calibrated=("int8",),
    static_only="TFLite models are exported per input size (dynamic sizes convert but fail at run time)",
    options=(
        TargetOption("int8_io", "int8 with integer input/output tensors (NPUs)", flag="--int8-io", default=False),
        TargetOption("keep_float", "int8: module paths computed in float (float-I/O default "
                     f"{list(DEFAULT_SENSITIVE)})"),
        TargetOption("int16_activations", "int8: module paths with int16 activations (int8-I/O default "
                     f"{list(DEFAULT_SENSITIVE)})"),
        QAT_OPTION,
    ),
    extra="tflite",
    runtime="tflite",
    libraries=("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch"),
    bench=(("fp32", DEFAULT_IMGSZ), ("fp16", DEFAULT_IMGSZ), ("int8", DEFAULT_IMGSZ)),
)


@functools.cache
def _wrappers() -> tuple[type, type]:
    """The two torch modules the export wraps the network in, defined on first use: reading SPEC does not import
    PyTorch."""
    import torch  # deferred: PyTorch (export extra)
    from torch import nn

    class _NHWCInput(nn.Module):
        """NHWC float input -> the NCHW network; outputs by name (they become the signature's output names)."""

        def __init__(self, network: nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, input: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: A002 - the signature input name
            outputs = self.network(input.permute(0, 3, 1, 2))
            return dict(zip(OUTPUTS, outputs))

    class _LeakyReLUAsMaximum(nn.Module):
        """LeakyReLU(a) for 0 < a < 1 written as maximum(x, a * x): integer MUL + MAXIMUM in a quantized graph."""

        def __init__(self, negative_slope: float) -> None:
            super().__init__()
            self.negative_slope = float(negative_slope)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.maximum(x, x * self.negative_slope)

    for cls in (_NHWCInput, _LeakyReLUAsMaximum):
        cls.__qualname__ = cls.__name__  # as if defined at module level (litert-torch names tensors by module)
    return _NHWCInput, _LeakyReLUAsMaximum


def integer_friendly(network: nn.Module, skip: tuple[str, ...] = ()) -> tuple[nn.Module, int]:
    """A copy of ``network`` whose LeakyReLUs (outside the module paths in ``skip``) are ops the INT8 quantizer
    covers; returns it and how many were replaced."""
    from torch import nn  # deferred: PyTorch (export extra)

    leaky_as_maximum = _wrappers()[1]
    network = copy.deepcopy(network).eval()
    changed = 0

    def swap(module: nn.Module, prefix: str) -> None:
        nonlocal changed
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(path == s or path.startswith(s + ".") for s in skip):
                continue
            if isinstance(child, nn.LeakyReLU):
                slope = float(child.negative_slope)
                if slope == 0.0:
                    setattr(module, name, nn.ReLU())
                elif 0.0 < slope < 1.0:
                    setattr(module, name, leaky_as_maximum(slope))
                else:
                    continue
                changed += 1
            else:
                swap(child, path + ".")

    swap(network, "")
    return network, changed


def module_regex(path: str) -> str:
    """Regex over TFLite tensor names for the ops of the torch module at ``path`` ("body.stage1"): litert-torch
    names tensors by the module hierarchy, e.g. ``.../FeatureExtractor_body/...Sequential_stage1/...``."""
    parts = [rf"_{re.escape(p)}[/;]" for p in path.split(".")]
    return ".*" + "[^/;]*".join(parts) + ".*"


def to_tflite(network: nn.Module, input_hw: tuple[int, int]) -> bytes:
    """torch (NCHW) -> float32 TFLite flatbuffer with one NHWC input named ``input``."""
    litert_torch = require("litert_torch", "tflite", "TFLite export")
    import torch  # deferred: PyTorch (export extra)

    h, w = input_hw
    sample = {INPUT_NAME: torch.zeros(1, h, w, 3)}
    with torch.no_grad():
        edge_model = litert_torch.convert(_wrappers()[0](network).eval(), sample_kwargs=sample)
        return bytes(edge_model.model_content())


def _quantizer():
    require("ai_edge_quantizer", "tflite", "TFLite FP16 / INT8 quantisation")
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    return quantizer, recipe, qtyping, AlgorithmName


def to_fp16(float_model: bytes) -> tuple[bytes, dict[str, Any]]:
    quantizer, _, qtyping, algorithms = _quantizer()
    q = quantizer.Quantizer(float_model)
    q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                             algorithm_key=algorithms.FLOAT_CASTING)
    result = q.quantize(enable_progress_report=False)
    return bytes(result.quantized_model), {"tool": "ai_edge_quantizer", "algorithm": "float_casting",
                                           "weights": "float16", "compute": "float32", "io": "float32"}


def _tensor_names(model_content: bytes) -> list[str]:
    interpreter, _ = load_interpreter(model_content=model_content)
    return [t["name"] for t in interpreter.get_tensor_details()]


def op_precisions(model_content: bytes) -> dict[str, int]:
    """How many compute ops (not QUANTIZE / DEQUANTIZE) of a model produce float32, int8, int16 outputs."""

    interpreter, _ = load_interpreter(model_content=model_content)
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    counts = Counter(dtypes[op["outputs"][0]] for op in interpreter._get_ops_details()  # noqa: SLF001
                     if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and len(op["outputs"]))
    return dict(counts)


def to_int8(float_model: bytes, calibration: tuple[np.ndarray, ...], *, int8_io: bool,
            keep_float: tuple[str, ...] = (), int16_activations: tuple[str, ...] = ()
            ) -> tuple[bytes, dict[str, Any]]:
    """Static INT8 calibrated on ``calibration`` (NCHW, as the pipeline gives them; fed here as NHWC), with the
    modules at ``keep_float`` in float and those at ``int16_activations`` with int16 activations."""
    if not calibration:
        raise EdgefaceError("TFLite INT8 needs calibration images (pass --calib DIR)")
    quantizer, recipe, qtyping, algorithms = _quantizer()
    q = quantizer.Quantizer(float_model, getattr(recipe, INT8_RECIPE)())
    names = _tensor_names(float_model)
    for path in (*keep_float, *int16_activations):
        if not any(re.fullmatch(module_regex(path), n) for n in names):
            raise EdgefaceError(f"module {path!r} matches no op of the converted model (keep_float / "
                                "int16_activations take module paths such as 'body.stage1')")
    for path in int16_activations:
        q.add_static_config(regex=module_regex(path), operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                            activation_num_bits=16, weight_num_bits=8)
    for path in keep_float:
        q.update_quantization_recipe(regex=module_regex(path), operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                     algorithm_key=algorithms.NO_QUANTIZE)
    if not int8_io:  # keep the graph's input and outputs float: QUANTIZE after the input, DEQUANTIZE before outputs
        for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
            q.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key=algorithms.NO_QUANTIZE)
    samples = [{INPUT_NAME: np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)} for x in calibration]
    started = time.perf_counter()
    # The calibrator keeps every tensor on purpose (LiteRT warns about that); its per-op progress bars are
    # silenced with every converter's output (edgeface.export.base.quiet).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        ranges = q.calibrate({SIGNATURE: samples}, num_threads=min(16, os.cpu_count() or 1))
    content = bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)
    return content, {
        "tool": "ai_edge_quantizer", "recipe": INT8_RECIPE, "method": "minmax",
        "ranges": "moving average (0.95) of per-image min/max (ai-edge-quantizer default)",
        "algorithm": "min_max_uniform_quantize", "images": len(calibration),
        "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor asymmetric",
        "io": "int8" if int8_io else "float32", "modules_kept_float": list(keep_float),
        "modules_int16_activations": list(int16_activations), "ops_by_output_dtype": op_precisions(content),
        "full_integer": not keep_float, "calibration_seconds": round(time.perf_counter() - started, 1),
    }


def _reference_inputs(model, request: ExportRequest) -> list[tuple[str, np.ndarray]]:
    """Real pre-processed images (NCHW) for the output check: the bundled photo, a crop of it in which the face
    fills the frame (so that the coarsest anchor level sees a face too) and the first few calibration images."""

    policy = ResizePolicy("fixed", request.input_hw)
    inputs = [(name, preprocess([image], policy=policy, mean_bgr=model.config.mean_bgr)[0])
              for name, image in binding_photos()]
    inputs += [(f"calibration image {i}", x) for i, x in enumerate(request.calibration[:MAPPING_CALIBRATION_IMAGES])]
    return inputs


def map_outputs(model_content: bytes, model, request: ExportRequest, *, strict: bool = True
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Which TFLite output tensor is which PyTorch output, established by running both on real images.

    Returns ``({"input_tensor": ..., "output_tensors": {name: {index, name, dtype, shape, quantization}}}, check)``.
    Raises EdgefaceError if a PyTorch output is reproduced by no TFLite output (``strict=False``, for
    --no-verify: takes the closest one and reports the check as failed instead)."""

    import torch  # deferred: PyTorch (export extra)

    inputs = _reference_inputs(model, request)
    batch = np.concatenate([x for _, x in inputs])
    with torch.inference_mode():
        reference = {n: t.float().numpy() for n, t in zip(OUTPUTS, model.eval()(torch.from_numpy(batch)))}
    interpreter, _ = load_interpreter(model_content=model_content)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    input_q = _quantization(inp)
    outputs = interpreter.get_output_details()
    if len(outputs) != len(OUTPUTS):
        raise EdgefaceError(f"the TFLite model has {len(outputs)} outputs, expected {len(OUTPUTS)} ({OUTPUTS})")
    values: dict[int, list[np.ndarray]] = {int(d["index"]): [] for d in outputs}
    for _, x in inputs:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        interpreter.set_tensor(inp["index"], quantize(x, input_q, _dtype(inp)) if input_q else x)
        interpreter.invoke()
        for d in outputs:
            values[int(d["index"])].append(dequantize(interpreter.get_tensor(d["index"]), _quantization(d)))
    stacked = {k: np.concatenate(v) for k, v in values.items()}
    signature, signature_keys = _signature_keys(interpreter)
    levels = level_slices(request.input_hw, model.config.anchors)
    tolerance = MAPPING_TOLERANCE[request.precision]
    by_name = {d["name"]: (d, stacked[int(d["index"])]) for d in outputs}  # tensor names: unique, and readable
    pairs = [(name, key) for name in OUTPUTS for key, (_, values) in by_name.items()
             if values.shape[1:] == reference[name].shape[1:]]
    errors = {(n, k): level_errors(by_name[k][1], reference[n], levels) for n, k in pairs}
    max_abs = {(n, k): float(np.abs(by_name[k][1] - reference[n]).max()) for n, k in pairs}
    chosen, report = choose_outputs(errors, max_abs, tolerance=tolerance, strict=strict, what="TFLite",
                                    outputs={d["name"]: [int(s) for s in d["shape"]] for d in outputs})
    mapping: dict[str, Any] = {}
    for name, key in chosen.items():
        detail = by_name[key][0]
        index = int(detail["index"])
        mapping[name] = {"index": index, "name": detail["name"], "dtype": _dtype(detail),
                         "shape": [int(s) for s in detail["shape"]], "quantization": _quantization(detail),
                         "position": outputs.index(detail), "signature_key": signature_keys.get(index)}
    worst = max(max(r["error_by_stride"].values()) for r in report.values())
    check = {"status": "passed" if worst <= tolerance else "failed", "images": [n for n, _ in inputs],
             "metric": "per anchor level RMS difference / reference spread", "tolerance": tolerance,
             "outputs": report}
    input_tensor = {"index": int(inp["index"]), "name": inp["name"], "dtype": _dtype(inp),
                    "shape": [int(s) for s in inp["shape"]], "quantization": input_q, "position": 0,
                    "signature_key": signature_keys.get(int(inp["index"]))}
    return {"input_tensor": input_tensor, "output_tensors": mapping, "signature": signature}, check


def _signature_keys(interpreter) -> tuple[str | None, dict[int, str]]:
    """The model's first signature and its input/output keys by tensor index: Android's ``runSignature`` binds
    tensors by these keys (docs/bundle.md)."""
    signatures = interpreter.get_signature_list()
    if not signatures:
        return None, {}
    name = next(iter(signatures))
    runner = interpreter.get_signature_runner(name)
    keys = {int(d["index"]): key for key, d in runner.get_output_details().items()}
    keys.update({int(d["index"]): key for key, d in runner.get_input_details().items()})
    return name, keys


def _dtype(detail: dict[str, Any]) -> str:
    return np.dtype(detail["dtype"]).name


def _quantization(detail: dict[str, Any]) -> dict[str, float] | None:
    """Per-tensor affine quantisation of an integer I/O tensor (None for float tensors)."""
    if not np.issubdtype(np.dtype(detail["dtype"]), np.integer):
        return None
    scale, zero_point = detail["quantization"]
    if not scale:
        raise EdgefaceError(f"TFLite tensor {detail['name']!r} is {_dtype(detail)} without quantisation parameters")
    return {"scale": float(scale), "zero_point": int(zero_point)}


def _module_paths(option: Any, model: nn.Module, what: str) -> tuple[str, ...]:
    paths = (option,) if isinstance(option, str) else tuple(option or ())
    known = dict(model.named_modules())
    for path in paths:
        if path not in known:
            tops = ", ".join(n for n, _ in model.named_children())
            raise EdgefaceError(f"{what}: the model has no module {path!r} (use paths like 'body.stage1'; top-level "
                                f"modules: {tops})")
    return paths


def _qat_run(model: nn.Module, request: ExportRequest, options: dict[str, Any]) -> dict[str, Any] | None:
    """The checked record of the QAT run named by ``options["qat"]`` (popped), or None; refuses what a QAT export
    cannot take (another precision, modules kept in float or at int16)."""
    folder = options.pop("qat", None)
    if not folder:
        return None
    if request.precision != "int8":
        raise EdgefaceError(f"--qat is for --precision int8 (a full-integer model), not {request.precision}")
    if kept := [f"{name}={options[name]}" for name in ("keep_float", "int16_activations") if options.get(name)]:
        raise EdgefaceError(f"--qat makes every operator 8-bit integer; drop {', '.join(kept)}")
    return qat_run_for(model, folder)


def convert(model: nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    require("litert_torch", "tflite", "TFLite export")
    if request.input_hw is None:
        raise EdgefaceError("TFLite models are exported per input size (dynamic sizes convert but fail at run "
                            "time); use --imgsz HxW")
    if request.dynamic_batch:
        raise EdgefaceError("TFLite bundles have a static batch of 1 (the Detector splits larger batches)")
    options = dict(request.options)
    int8_io = bool(options.pop("int8_io", False))
    int8 = request.precision == "int8"
    qat = _qat_run(model, request, options)
    # The measured defaults apply to the MobileNet-0.25 RetinaFace; other backbones get a plain INT8 graph. A QAT
    # run's weights need neither: its stage1 is equalised and trained for 8-bit activations.
    sensitive = DEFAULT_SENSITIVE if model.config.backbone == "mobilenet_v1_0.25" and not qat else ()
    keep_float = _module_paths(options.pop("keep_float", sensitive if int8 and not int8_io else ()), model,
                               "keep_float")
    int16 = _module_paths(options.pop("int16_activations", sensitive if int8 and int8_io else ()), model,
                          "int16_activations")
    if options:
        raise EdgefaceError(f"unknown TFLite options {sorted(options)} (known: "
                            f"{', '.join(o.name for o in SPEC.options)})")
    if not int8 and (int8_io or keep_float or int16):
        raise EdgefaceError(f"int8_io / keep_float / int16_activations apply to INT8 bundles only (this export is "
                            f"{request.precision})")
    notes = [f"static input size {request.input_hw[0]}x{request.input_hw[1]}, batch 1: export one bundle per "
             "input size"]
    network = model.eval()
    calibration = None
    started = time.perf_counter()
    if request.precision == "int8":
        network, rewritten = integer_friendly(network, skip=keep_float)
        if rewritten:
            notes.append(f"INT8: {rewritten} LeakyReLU layers exported as maximum(x, a*x) (the same function; "
                         "ai-edge-quantizer has no integer LEAKY_RELU)")
    float_model = to_tflite(network, request.input_hw)
    convert_seconds = time.perf_counter() - started
    if request.precision == "fp32":
        content, quant_info = float_model, None
    elif request.precision == "fp16":
        content, quant_info = to_fp16(float_model)
    else:
        content, calibration = to_int8(float_model, request.calibration, int8_io=int8_io, keep_float=keep_float,
                                       int16_activations=int16)
        calibration["source"] = request.calibration_source
        quant_info = {k: calibration[k] for k in ("tool", "recipe", "io")}
        if qat is not None:
            calibration["qat"] = qat_summary(qat)
            notes.append(f"full-integer INT8 of the QAT run {request.options['qat']} (weights with stage1 "
                         "equalised and trained under 8-bit fake quantisation); activation ranges by "
                         "ai-edge-quantizer's min-max calibration (the run's learned ranges name ONNX tensors)")
        if keep_float:
            notes.append(f"INT8 with {', '.join(keep_float)} computed in float (an all-int8 graph of this model "
                         "misses the INT8 parity tolerance); pass options keep_float=[] for an all-int8 graph")
        if int16:
            notes.append(f"int16 activations (16x8) in {', '.join(int16)} (an all-8-bit graph of this model misses "
                         "the INT8 parity tolerance): integer-only, for NPUs with 16x8 support; XNNPACK has no int16 "
                         "kernels, so on a CPU use the float-I/O INT8 bundle. Pass options int16_activations=[] for "
                         "an all-int8 graph")
        if int8_io:
            notes.append("int8 input and outputs: quantize the mean-subtracted NHWC input with "
                         "input.quantization and dequantize each output with its quantization")
    (out_dir / MODEL_FILE).write_bytes(content)
    verify = getattr(request, "verify", True)
    info, check = map_outputs(content, model, request, strict=verify)
    if check["status"] != "passed":
        notes.append(f"output mapping NOT verified (--no-verify): the closest TFLite outputs differ from PyTorch "
                     f"beyond the tolerance ({check['outputs']})")
    mapping = info["output_tensors"]
    io_int8 = info["input_tensor"]["dtype"] != "float32"
    if io_int8 != int8_io:
        raise EdgefaceError(f"the converted model's input is {info['input_tensor']['dtype']}, expected "
                            f"{'int8' if int8_io else 'float32'}")
    extra = {**info, "signature": SIGNATURE, "output_check": check,
             "runtime": "LiteRT (ai_edge_litert) or tflite_runtime; XNNPACK CPU delegate by default"}
    return Conversion(
        files={"model": MODEL_FILE},
        layout="NHWC",
        input_dtype=info["input_tensor"]["dtype"],
        input_quantization=info["input_tensor"]["quantization"],
        output_quantization={n: m["quantization"] for n, m in mapping.items()} if io_int8 else None,
        output_dtypes={n: m["dtype"] for n, m in mapping.items()},
        calibration=calibration,
        converter={"exporter": "litert_torch.convert", "channel_last_input": "NHWC -> NCHW permute in a wrapper",
                   "quantizer": quant_info, "convert_seconds": round(convert_seconds, 1),
                   "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        extra=extra,
    )
