"""ncnn (Android, Raspberry Pi, any ARM CPU; Vulkan GPUs): ``model.ncnn.param`` (the graph, text) and
``model.ncnn.bin`` (the weights), made by pnnx from the traced PyTorch model.

- Conversion: ``torch.jit.trace`` -> the pnnx converter (the command-line program in the ``pnnx`` wheel, run
  directly so that its exit status is checked: ``pnnx.export`` ignores it, then imports the Python file pnnx
  generated). pnnx also writes its own .pnnx.param / .pnnx.bin, a .pnnx.onnx and two Python scripts: they stay in a
  temporary folder; the bundle holds the ncnn pair only.
- fp32: fp32 weights (pnnx ``fp16=0``).
- fp16: fp16 weights (half the size), written here from pnnx's fp32 weights with correct rounding (numpy: round to
  nearest even, fp16 subnormals kept), in ncnn's fp16 weight format (tag 0x01306B47). Not pnnx's own ``fp16=1``: its
  converter truncates mantissas and flushes every weight below 2^-14 (6.1e-5) to zero, and this model's first
  convolution, which sees 0-255 pixels, has small weights: 42 of its 216 become 0 (478 weights in all). Measured on
  the 8 parity images (dynamic, original scale): pnnx's fp16 file 97.8% of faces at IoU >= 0.9, landmark error
  0.0025, max |diff| loc 0.45; the re-encoded one, of the same size, 100%, 0.0005, 0.14. The ncnn runtime turns
  on fp16 storage and arithmetic for fp16
  bundles where the hardware has them (ARMv8.2 CPUs, Vulkan GPUs). x86 ncnn has no fp16 arithmetic, so this
  machine checks the fp16 weights computed in fp32, not fp16 arithmetic (see :mod:`edgeface.runtimes.ncnn`).
- Sizes: given a second input shape (``inputshape2``), pnnx writes the head Reshape sizes as expressions of the
  input blob's shape (``6="4,*(*(2,0c),0h)"``) and keeps the FPN crops, so one param file runs any input size
  (``--dynamic``, checked here at sizes other than the two it was traced at); a static export writes fixed sizes
  (``0=4 1=3200``) and runs its own size only.
- INT8: none. ncnn's own INT8 tools (``ncnn2table`` calibration, ``ncnn2int8``) are C++ programs that the ``ncnn``
  and ``pnnx`` wheels do not ship, and no PyPI package makes ncnn INT8 tables: ``ncnnqat`` 0.1.0 (2021, a
  quantisation-aware training tool, source only) fails to build (its setup.py imports a module it does not ship).

pnnx names the blobs ``in0``, ``out0``, ``out1``, ... Which output blob is ``loc`` / ``conf`` / ``landmarks`` is not
assumed: it is established by running the converted model in ncnn on real images and comparing it with PyTorch,
anchor level by anchor level (as :func:`edgeface.export.tflite.map_outputs` does), and recorded in the manifest
(``target_info.output_blobs``); an output that reproduces no PyTorch output (a scrambled output, a lost softmax or
reshape) fails the export.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export.base import Conversion, ExportRequest, TargetSpec, binding_photos, choose_outputs, level_errors
from edgeface.export.onnx import DYNAMIC_RANGES
from edgeface.runtimes.ncnn import load_net, run_net

from edgeface.core.errors import EdgefaceError, first_line, require
from edgeface.core.manifest import OUTPUTS
from edgeface.core.processing import ResizePolicy, level_slices, preprocess
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    from torch import nn

PARAM_FILE = "model.ncnn.param"
WEIGHTS_FILE = "model.ncnn.bin"
# The shapes a dynamic model is traced at: two sizes differing in both height and width, so that pnnx sees both
# as dynamic (multiples of the largest anchor step, 32).
DYNAMIC_TRACE_HW = ((640, 640), (320, 480))
# pnnx's graph optimisation level (its default, 2: operator fusion, constant folding).
PNNX_OPTLEVEL = 2
PNNX_TIMEOUT_S = 600
# ncnn's weight file: per weight blob a 4-byte tag, 0 for float32 data, this for float16 data (padded to 4 bytes).
NCNN_FP16_TAG = 0x01306B47
# Layers that read weights from the .bin, as ncnn's Convolution::load_model reads them: weight_data (tagged, param
# 6 = its size), then, with param 5 (bias_term) = 1, num_output (param 0) float32 biases without a tag.
WEIGHTED_LAYERS = ("Convolution", "ConvolutionDepthWise")
# Layers pnnx writes for this model that read no weights; any other layer type stops the fp16 re-encoding.
WEIGHTLESS_LAYERS = frozenset("Input Split Concat Permute Reshape Softmax ReLU Interp BinaryOp Crop Sigmoid "
                              "Pooling Flatten Eltwise Slice Noop Clip HardSigmoid HardSwish".split())
FP16_SMALLEST_NORMAL = 2.0 ** -14
# Output mapping check: the worst, over anchor levels and images, RMS difference between an ncnn output and a
# PyTorch output divided by the PyTorch output's spread on that level (edgeface.export.base.level_errors: 0 =
# identical, priors in a wrong order ~1.4). Measured on correct outputs: fp32 < 1e-4; fp16 weights < 0.01.
MAPPING_TOLERANCE = {"fp32": 1e-3, "fp16": 0.1}
MAPPING_IMAGES = 2  # real photographs used for the check besides the bundled photo and a crop of its face
# conf must hold softmax probabilities: each row sums to 1 (float32 rounding, fp16 weights).
SOFTMAX_TOLERANCE = 1e-3

SPEC = TargetSpec(
    name="ncnn",
    title="ncnn",
    precisions=("fp16", "fp32"),
    extra="ncnn",
    runtime="ncnn",
    libraries=("pnnx", "ncnn", "torch"),
    bench=(("fp32", None), ("fp16", None)),
)


def pnnx_convert(model: nn.Module, folder: Path, sizes: tuple[tuple[int, int], ...]
                 ) -> tuple[Path, Path, list[str]]:
    """Trace ``model`` at ``sizes[0]`` and convert it with pnnx (a second size makes the shapes dynamic); returns
    the ncnn param and bin (float32 weights) files, inside ``folder``, and the pnnx command line. Raises
    EdgefaceError with pnnx's last message when it fails."""
    pnnx = require("pnnx", "ncnn", "ncnn export (pnnx)")
    import torch  # deferred: PyTorch (export extra)

    h, w = sizes[0]
    traced = folder / "model.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the shape arithmetic pnnx turns into expressions
        try:
            torch.jit.trace(model.eval(), torch.zeros(1, 3, h, w), check_trace=False).save(str(traced))
        except Exception as exc:  # the tracer raises RuntimeError / TypeError on what it cannot trace
            raise EdgefaceError(f"torch.jit.trace could not trace {type(model).__name__} for pnnx "
                                f"({type(exc).__name__}: {first_line(exc)})") from None
    files = {"ncnnparam": "model.ncnn.param", "ncnnbin": "model.ncnn.bin", "ncnnpy": "model_ncnn.py",
             "pnnxparam": "model.pnnx.param", "pnnxbin": "model.pnnx.bin", "pnnxpy": "model_pnnx.py",
             "pnnxonnx": "model.pnnx.onnx"}
    shapes = [f"inputshape=[1,3,{h},{w}]f32"]
    if len(sizes) > 1:
        shapes.append(f"inputshape2=[1,3,{sizes[1][0]},{sizes[1][1]}]f32")
    arguments = [traced.name, *shapes, "device=cpu", f"optlevel={PNNX_OPTLEVEL}", "fp16=0",
                 *(f"{key}={value}" for key, value in files.items())]
    try:
        done = subprocess.run([pnnx.EXEC_PATH, *arguments], cwd=folder, capture_output=True, text=True,
                              errors="replace", timeout=PNNX_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgefaceError(f"pnnx could not run ({type(exc).__name__}: {first_line(exc)})") from None
    param, weights = folder / files["ncnnparam"], folder / files["ncnnbin"]
    if done.returncode != 0 or not param.is_file() or not weights.is_file():
        said = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise EdgefaceError(f"pnnx failed (exit status {done.returncode}"
                            f"{': ' + said[-1][:200] if said else ''}); no ncnn model was written")
    return param, weights, ["pnnx", *arguments]


def param_summary(param: Path) -> dict[str, Any]:
    """The layer and blob counts of an ncnn param file and its layer types with their counts."""
    lines = param.read_text().splitlines()
    if len(lines) < 2 or lines[0].strip() != "7767517":  # the magic number of ncnn's text param format
        raise EdgefaceError(f"{param.name} is not an ncnn param file (its first line is not 7767517)")
    layers, blobs = (int(v) for v in lines[1].split()[:2])
    types = Counter(line.split()[0] for line in lines[2:] if line.strip())
    return {"layers": layers, "blobs": blobs, "layer_types": dict(sorted(types.items()))}


def _param_layers(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """(type, name, params) of each layer of an ncnn text param file."""
    layers = []
    for line in text.splitlines()[2:]:
        parts = line.split()
        if not parts:
            continue
        inputs, outputs = int(parts[2]), int(parts[3])
        params = dict(token.partition("=")[::2] for token in parts[4 + inputs + outputs:])
        layers.append((parts[0], parts[1], params))
    return layers


def fp16_weights(param_text: str, weights: bytes) -> tuple[bytes, dict[str, Any]]:
    """The float32 ncnn weight file ``weights`` (of the graph ``param_text``) with every weight blob re-encoded as
    float16 (round to nearest even, subnormals kept); biases stay float32, as ncnn stores them. Returns the new
    file and counts. Raises EdgefaceError on a layer type whose weights it does not know, or a file that does not
    match the graph."""
    out, pos = bytearray(), 0
    counts = {"weights": 0, "fp16_subnormal": 0, "zeroed_by_pnnx_fp16": 0}
    for kind, name, params in _param_layers(param_text):
        if kind not in WEIGHTED_LAYERS:
            if kind not in WEIGHTLESS_LAYERS:
                raise EdgefaceError(f"fp16: layer {name!r} of type {kind} may hold weights edgeface does not "
                                    "re-encode; export fp32")
            continue
        size, bias = int(params.get("6", 0)), int(params.get("0", 0)) if params.get("5", "0") == "1" else 0
        if pos + 4 + 4 * size + 4 * bias > len(weights) or int.from_bytes(weights[pos:pos + 4], "little") != 0:
            raise EdgefaceError(f"fp16: the weight file does not match layer {name!r} of the graph (expected "
                                f"{size} float32 weights at byte {pos})")
        w = np.frombuffer(weights, np.float32, size, pos + 4)
        pos += 4 + 4 * size
        h = w.astype(np.float16)
        counts["weights"] += size
        counts["fp16_subnormal"] += int(((np.abs(h) < FP16_SMALLEST_NORMAL) & (h != 0)).sum())
        counts["zeroed_by_pnnx_fp16"] += int(((np.abs(w) < FP16_SMALLEST_NORMAL) & (w != 0)).sum())
        out += NCNN_FP16_TAG.to_bytes(4, "little") + h.tobytes() + b"\0" * (-2 * size % 4)
        out += weights[pos:pos + 4 * bias]  # the biases, float32 as ncnn reads them
        pos += 4 * bias
    if pos != len(weights):
        raise EdgefaceError(f"fp16: the weight file has {len(weights) - pos} bytes the graph does not read")
    return bytes(out), counts




def map_outputs(net: Any, model, request: ExportRequest, *, strict: bool = True
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Which ncnn blob is which PyTorch output, established by running both on real images: at the bundle's size
    for a static model, at each image's own size (none of them a traced size) for a
    dynamic one. Also checks that the conf blob holds probabilities (the softmax survived). Returns
    ``({"input_blob": ..., "output_blobs": {name: blob}}, check)``.

    Raises EdgefaceError if the model has not one input, or a PyTorch output is reproduced by no ncnn output
    (``strict=False``, for --no-verify: takes the closest one and reports the check as failed instead)."""
    import torch  # deferred: PyTorch (export extra)

    inputs, outputs = list(net.input_names()), list(net.output_names())
    if len(inputs) != 1:
        raise EdgefaceError(f"the ncnn model has inputs {inputs}, expected one image input")
    policy = ResizePolicy("fixed", request.input_hw) if request.input_hw else ResizePolicy("original")
    errors: dict[tuple[str, str], dict[int, float]] = {}  # (output, blob) -> worst error per stride
    max_abs: dict[tuple[str, str], float] = {}
    row_sums: dict[str, float] = {}  # blob -> worst |row sum - 1| (read for the blob bound to conf)
    images, sizes = binding_photos(MAPPING_IMAGES), []
    for _, image in images:
        x = preprocess([image], policy=policy, mean_bgr=model.config.mean_bgr)[0]
        sizes.append(list(x.shape[2:]))
        with torch.inference_mode():
            reference = {n: t.float().numpy() for n, t in zip(OUTPUTS, model.eval()(torch.from_numpy(x)))}
        got = run_net(net, inputs[0], x[0], {blob: blob for blob in outputs})
        levels = level_slices(tuple(x.shape[2:]), model.config.anchors)
        for blob, value in got.items():
            if value.ndim == 2:
                row_sums[blob] = max(row_sums.get(blob, 0.0), float(np.abs(value.sum(axis=1) - 1).max()))
            for name in OUTPUTS:
                if value.shape != reference[name].shape[1:]:
                    continue
                seen = errors.setdefault((name, blob), {})
                for step, error in level_errors(value[None], reference[name], levels).items():
                    seen[step] = max(seen.get(step, 0.0), error)
                max_abs[(name, blob)] = max(max_abs.get((name, blob), 0.0),
                                            float(np.abs(value - reference[name][0]).max()))
    tolerance = MAPPING_TOLERANCE[request.precision]
    mapping, report = choose_outputs(errors, max_abs, tolerance=tolerance, strict=strict, what="ncnn",
                                     outputs=outputs)
    for name, blob in mapping.items():
        report[name] = {"blob": blob, **report[name]}
    softmax_error = row_sums[mapping["conf"]]
    if softmax_error > SOFTMAX_TOLERANCE and strict:
        raise EdgefaceError(f"the ncnn conf output (blob {mapping['conf']!r}) has rows summing to 1 +- "
                            f"{softmax_error:.3g}, not probabilities: the softmax did not survive the conversion")
    worst = max(max(r["error_by_stride"].values()) for r in report.values())
    passed = worst <= tolerance and softmax_error <= SOFTMAX_TOLERANCE
    check = {"status": "passed" if passed else "failed", "images": [n for n, _ in images], "input_sizes": sizes,
             "metric": "per anchor level RMS difference / reference spread, worst over images", "tolerance": tolerance,
             "outputs": report, "conf_row_sum_max_error": float(f"{softmax_error:.3g}")}
    return {"input_blob": inputs[0], "output_blobs": mapping}, check


def convert(model: nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    require("pnnx", "ncnn", "ncnn export (pnnx)")
    require("ncnn", "ncnn", "checking the ncnn model")
    if request.options:
        raise EdgefaceError(f"unknown ncnn options {sorted(request.options)} (known: none)")
    fp16 = request.precision == "fp16"
    sizes = (request.input_hw,) if request.input_hw else DYNAMIC_TRACE_HW
    started = time.perf_counter()
    fp16_info = None
    with tempfile.TemporaryDirectory(prefix="edgeface-pnnx-") as tmp:
        param, weights, command = pnnx_convert(model, Path(tmp), sizes)
        shutil.copyfile(param, out_dir / PARAM_FILE)
        if fp16:
            content, counts = fp16_weights(param.read_text(), weights.read_bytes())
            (out_dir / WEIGHTS_FILE).write_bytes(content)
            fp16_info = {"writer": "edgeface: numpy float16 (round to nearest even, subnormals kept) in ncnn's fp16 "
                                   "weight format; biases float32", **counts,
                         "not_pnnx_fp16": "pnnx fp16=1 truncates and flushes weights below 2^-14 to zero "
                                          "(parity 97.8%, landmark error 0.0025 measured)"}
        else:
            shutil.copyfile(weights, out_dir / WEIGHTS_FILE)
    convert_seconds = time.perf_counter() - started
    summary = param_summary(out_dir / PARAM_FILE)
    # Checked as the runtime will run it: fp16 switches as for the bundle's precision, on this CPU.
    net, run_info = load_net(out_dir / PARAM_FILE, out_dir / WEIGHTS_FILE, fp16=fp16)
    try:
        binding, check = map_outputs(net, model, request, strict=request.verify)
    finally:
        net.clear()
    notes = []
    if request.input_hw:
        notes.append(f"static input size {request.input_hw[0]}x{request.input_hw[1]} (fixed Reshape sizes): the "
                     "ncnn runtime refuses other sizes (ncnn would return wrong arrays, not an error)")
    else:
        notes.append("dynamic input size: one param file runs any size (Reshape sizes are expressions of the "
                     "input's shape); the batch runs image by image (an ncnn Mat is one CHW image)")
    if fp16:
        notes.append("fp16 weights, rounded to nearest by edgeface (pnnx's own fp16 flushes small weights to zero); "
                     "the ncnn runtime turns on fp16 storage and arithmetic where the hardware has them (ARMv8.2 "
                     f"CPUs, Vulkan GPUs). Checked here: {run_info['fp16']}")
    if check["status"] != "passed":
        notes.append(f"output binding NOT verified (--no-verify): the closest ncnn outputs differ from PyTorch "
                     f"beyond the tolerance ({check['outputs']})")
    dynamic = None
    if request.input_hw is None:
        dynamic = {"height": DYNAMIC_RANGES["height"], "width": DYNAMIC_RANGES["width"]}
    extra = {**binding, "weights": "float16" if fp16 else "float32",
             "shapes": "static" if request.input_hw else "dynamic", **summary, "output_check": check,
             "runtime": "ncnn Python package (ncnn.Net, one Extractor per image); fp16 storage and arithmetic on "
                        "for fp16 bundles, off for fp32, where the hardware has them"}
    return Conversion(
        files={"model": PARAM_FILE, "weights": WEIGHTS_FILE},
        dynamic=dynamic,
        converter={"exporter": "torch.jit.trace -> pnnx", "command": " ".join(command),
                   "weights": "float16" if fp16 else "float32", "fp16_weights": fp16_info,
                   "convert_seconds": round(convert_seconds, 1),
                   "checked_with": run_info, "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        extra=extra,
    )
