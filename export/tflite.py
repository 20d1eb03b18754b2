"""TFLite (LiteRT): one static model per input size, NHWC float32 input (what Android / Raspberry Pi apps feed).

- fp32: ``litert_torch.convert`` of the model behind a small NHWC -> NCHW permute (TFLite convolutions are NHWC,
  so the permute folds away and the graph has no transpose).
- fp16: FP16 weights (ai-edge-quantizer ``float_casting``, weight-only), float32 compute and I/O.
- int8: full-integer INT8 by ai-edge-quantizer ``static_wi8_ai8`` (int8 per-channel symmetric weights, int8
  per-tensor asymmetric activations, min/max calibration on real images). Float32 input/output around the
  integer graph by default (one QUANTIZE at the input, one DEQUANTIZE per output); ``options={"int8_io": True}``
  makes the input and outputs int8 tensors themselves (for NPUs), their scales and zero points go in the manifest.
  ai-edge-quantizer 0.10 does not quantize LEAKY_RELU (it would run in float between a DEQUANTIZE and a QUANTIZE,
  38 times), so for INT8 every LeakyReLU(a) (0 < a < 1) is exported as ``maximum(x, a * x)`` (the same function:
  MUL + MAXIMUM, both integer ops); LeakyReLU(0) becomes RELU.

Which TFLite output is ``loc`` / ``conf`` / ``landmarks`` is not assumed: it is established by running the
converted file in the LiteRT interpreter on a real image and comparing with PyTorch, level by level of the
anchor pyramid, and recorded in the manifest (``target_info.output_tensors``); an output that reproduces no
PyTorch output (the scrambled-output failure of other converters) fails the export.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeface.errors import EdgefaceError
from edgeface.export.base import Conversion, ExportRequest, library_versions
from edgeface.runtimes.base import OUTPUTS, dequantize, quantize, require

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"
INPUT_NAME = "input"
INT8_RECIPE = "static_wi8_ai8"
# Largest relative RMS error (per anchor level) at which a TFLite output still counts as reproducing a PyTorch
# output, by precision. A permuted / scrambled level gives ~1 or more; measured errors of correct outputs at
# 320x320 and 640x640 are far below these (fp32 ~1e-6, fp16 ~1e-3, int8 ~0.05-0.15).
MAPPING_TOLERANCE = {"fp32": 1e-3, "fp16": 0.03, "int8": 0.35}


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


def integer_friendly(network: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``network`` whose LeakyReLUs are ops the INT8 quantizer covers; returns it and how many changed."""
    network = copy.deepcopy(network).eval()
    changed = 0

    def swap(module: nn.Module) -> None:
        nonlocal changed
        for name, child in module.named_children():
            if isinstance(child, nn.LeakyReLU):
                slope = float(child.negative_slope)
                if slope == 0.0:
                    setattr(module, name, nn.ReLU())
                elif 0.0 < slope < 1.0:
                    setattr(module, name, _LeakyReLUAsMaximum(slope))
                else:
                    continue
                changed += 1
            else:
                swap(child)

    swap(network)
    return network, changed


@contextlib.contextmanager
def _quiet_litert_torch():
    """litert-torch prints a progress tree per conversion step; the pipeline reports progress itself."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(key)
    os.environ[key] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def to_tflite(network: nn.Module, input_hw: tuple[int, int]) -> bytes:
    """torch (NCHW) -> float32 TFLite flatbuffer with one NHWC input named ``input``."""
    litert_torch = require("litert_torch", "tflite", "TFLite export")
    h, w = input_hw
    sample = {INPUT_NAME: torch.zeros(1, h, w, 3)}
    with _quiet_litert_torch(), torch.no_grad():
        edge_model = litert_torch.convert(_NHWCInput(network).eval(), sample_kwargs=sample)
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


def to_int8(float_model: bytes, calibration: tuple[np.ndarray, ...], *, int8_io: bool
            ) -> tuple[bytes, dict[str, Any]]:
    """Full-integer INT8 calibrated on ``calibration`` (NCHW, as the pipeline gives them; fed here as NHWC)."""
    if not calibration:
        raise EdgefaceError("TFLite INT8 needs calibration images (pass --calib DIR)")
    quantizer, recipe, qtyping, algorithms = _quantizer()
    q = quantizer.Quantizer(float_model, getattr(recipe, INT8_RECIPE)())
    if not int8_io:  # keep the graph's input and outputs float: QUANTIZE after the input, DEQUANTIZE before outputs
        for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
            q.update_quantization_recipe(regex=".*", operation_name=op, algorithm_key=algorithms.NO_QUANTIZE)
    samples = [{INPUT_NAME: np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)} for x in calibration]
    started = time.perf_counter()
    ranges = q.calibrate({SIGNATURE: samples}, num_threads=min(16, os.cpu_count() or 1))
    result = q.quantize(ranges, enable_progress_report=False)
    return bytes(result.quantized_model), {
        "tool": "ai_edge_quantizer", "recipe": INT8_RECIPE, "method": "minmax",
        "algorithm": "min_max_uniform_quantize", "images": len(calibration),
        "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor asymmetric",
        "io": "int8" if int8_io else "float32", "calibration_seconds": round(time.perf_counter() - started, 1),
    }


def _sample_input(model, request: ExportRequest) -> tuple[np.ndarray, str]:
    """One real pre-processed image, NCHW: the first calibration image, else the bundled astronaut photo."""
    if request.calibration:
        return request.calibration[0], "first calibration image"
    from edgeface.images import load_image
    from edgeface.processing import ResizePolicy, preprocess

    path = resources.files("edgeface") / "assets" / "astronaut.jpg"
    batch, _ = preprocess([load_image(Path(str(path)))], policy=ResizePolicy("fixed", request.input_hw),
                          mean_bgr=model.config.mean_bgr)
    return batch, "edgeface/assets/astronaut.jpg"


def _level_slices(model, input_hw: tuple[int, int]) -> list[tuple[int, slice]]:
    """Prior ranges of each anchor level (stride), in the order the heads emit them."""
    anchors = model.config.anchors
    h, w = input_hw
    out, start = [], 0
    for step, sizes in zip(anchors.steps, anchors.min_sizes):
        n = -(-h // step) * -(-w // step) * len(sizes)
        out.append((step, slice(start, start + n)))
        start += n
    return out


def _relative_error(candidate: np.ndarray, reference: np.ndarray, levels) -> tuple[float, dict[int, float]]:
    """Worst, over the anchor levels, RMS difference divided by the reference's spread across priors (its
    standard deviation per column k): 0 for a perfect output, about sqrt(2) for priors in the wrong order. Per
    level, so that a scrambled level cannot hide in the average."""
    per_level = {}
    for step, rows in levels:
        ref = reference[:, rows].reshape(-1, reference.shape[-1])
        diff = candidate[:, rows].reshape(-1, reference.shape[-1]) - ref
        spread = np.sqrt(np.mean(ref.var(axis=0)))
        per_level[step] = float(np.sqrt(np.mean(diff ** 2)) / max(spread, 1e-6))
    return max(per_level.values()), per_level


def map_outputs(model_content: bytes, model, request: ExportRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    """Which TFLite output tensor is which PyTorch output, established by running both on a real image.

    Returns (output_tensors, check) where output_tensors maps each name in OUTPUTS to the TFLite tensor's index,
    name, dtype and quantization. Raises EdgefaceError if an output reproduces no PyTorch output."""
    from edgeface.runtimes.tflite import load_interpreter

    sample, source = _sample_input(model, request)
    with torch.inference_mode():
        reference = {n: t.float().numpy() for n, t in zip(OUTPUTS, model.eval()(torch.from_numpy(sample)))}
    interpreter, _ = load_interpreter(model_content=model_content)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    x = np.ascontiguousarray(sample.transpose(0, 2, 3, 1))
    input_q = _quantization(inp)
    interpreter.set_tensor(inp["index"], quantize(x, input_q, _dtype(inp)) if input_q else x)
    interpreter.invoke()
    outputs = interpreter.get_output_details()
    if len(outputs) != len(OUTPUTS):
        raise EdgefaceError(f"the TFLite model has {len(outputs)} outputs, expected {len(OUTPUTS)} ({OUTPUTS})")
    values = {d["index"]: dequantize(interpreter.get_tensor(d["index"]), _quantization(d)) for d in outputs}
    levels = _level_slices(model, request.input_hw)
    tolerance = MAPPING_TOLERANCE[request.precision]
    mapping: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    used: set[int] = set()
    for name in OUTPUTS:
        ref = reference[name]
        scored = []
        for detail in outputs:
            if detail["index"] in used or tuple(detail["shape"]) != ref.shape:
                continue
            worst, per_level = _relative_error(values[detail["index"]], ref, levels)
            scored.append((worst, per_level, detail))
        if not scored:
            shapes = {d["name"]: list(map(int, d["shape"])) for d in outputs}
            raise EdgefaceError(f"no TFLite output has the shape of PyTorch's {name!r} {list(ref.shape)} "
                                f"(outputs: {shapes}); the conversion is not usable")
        worst, per_level, detail = min(scored, key=lambda s: s[0])
        if worst > tolerance:
            raise EdgefaceError(
                f"no TFLite output reproduces PyTorch's {name!r} on a real image (best: {detail['name']!r}, "
                f"relative error per anchor stride {_fmt(per_level)}, tolerance {tolerance}): the converter "
                f"produced a wrong or scrambled output; nothing was written")
        used.add(detail["index"])
        mapping[name] = {"index": int(detail["index"]), "name": detail["name"], "dtype": _dtype(detail),
                         "shape": [int(s) for s in detail["shape"]], "quantization": _quantization(detail)}
        errors[name] = {"normalized_rms_error_by_stride": {str(k): float(f"{v:.3g}") for k, v in per_level.items()},
                        "max_abs_diff": float(np.abs(values[detail["index"]] - ref).max())}
    check = {"input": source, "tolerance": tolerance, "outputs": errors}
    input_tensor = {"index": int(inp["index"]), "name": inp["name"], "dtype": _dtype(inp),
                    "shape": [int(s) for s in inp["shape"]], "quantization": input_q}
    return {"input_tensor": input_tensor, "output_tensors": mapping}, check


def _fmt(per_level: dict[int, float]) -> str:
    return ", ".join(f"{k}: {v:.3g}" for k, v in per_level.items())


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


def convert(model: nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    require("litert_torch", "tflite", "TFLite export")
    if request.input_hw is None:
        raise EdgefaceError("TFLite models are exported per input size (dynamic sizes convert but fail at run "
                            "time); use --imgsz HxW")
    if request.dynamic_batch:
        raise EdgefaceError("TFLite bundles have a static batch of 1 (the Detector splits larger batches)")
    int8_io = bool(request.options.get("int8_io", False))
    if int8_io and request.precision != "int8":
        raise EdgefaceError(f"int8_io applies to INT8 bundles only (this export is {request.precision})")
    notes = [f"static input size {request.input_hw[0]}x{request.input_hw[1]}, batch 1: export one bundle per "
             "input size"]
    network = model.eval()
    calibration = None
    started = time.perf_counter()
    if request.precision == "int8":
        network, rewritten = integer_friendly(network)
        if rewritten:
            notes.append(f"INT8: {rewritten} LeakyReLU layers exported as maximum(x, a*x) (same function; "
                         "ai-edge-quantizer has no integer LEAKY_RELU)")
    float_model = to_tflite(network, request.input_hw)
    convert_seconds = time.perf_counter() - started
    if request.precision == "fp32":
        content, quant_info = float_model, None
    elif request.precision == "fp16":
        content, quant_info = to_fp16(float_model)
    else:
        content, calibration = to_int8(float_model, request.calibration, int8_io=int8_io)
        calibration["source"] = request.calibration_source
        quant_info = {k: calibration[k] for k in ("tool", "recipe", "io")}
        if int8_io:
            notes.append("int8 input and outputs: quantize the mean-subtracted NHWC input with "
                         "input.quantization and dequantize each output with its quantization")
    (out_dir / MODEL_FILE).write_bytes(content)
    info, check = map_outputs(content, model, request)
    mapping = info["output_tensors"]
    io_int8 = info["input_tensor"]["dtype"] != "float32"
    if io_int8 != int8_io:
        raise EdgefaceError(f"the converted model's input is {info['input_tensor']['dtype']}, expected "
                            f"{'int8' if int8_io else 'float32'}")
    extra = {**info, "signature": SIGNATURE, "output_check": check, "interpreter": "LiteRT (ai_edge_litert) or "
             "tflite_runtime; XNNPACK CPU delegate by default"}
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
                   "versions": library_versions("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch")},
        notes=notes,
        extra=extra,
    )
