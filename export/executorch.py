"""ExecuTorch (Android / iOS apps through the XNNPACK delegate): one ``model.pte`` program whose ``forward`` method
takes a float32 NCHW tensor (BGR, mean subtracted by the caller) and returns three float32 tensors.

- Route: ``torch.export`` (the ExportedProgram Core ML also starts from: :func:`edgeface.export.coreml.
  export_program`) -> ``executorch.exir.to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` ->
  ``to_executorch()`` -> the program's bytes.
- Precisions: fp32; int8 by PT2E static quantisation with the ``XNNPACKQuantizer`` (int8 per-channel symmetric
  weights, int8 per-tensor affine activations, HistogramObserver ranges from the calibration images), lowered to
  XNNPACK's quantised kernels. Option ``keep_float`` names the module paths left in float (``"heads"`` = the three
  output heads and the concatenation / softmax after them); the default is :data:`INT8_KEEP_FLOAT`, chosen by
  measured WIDER FACE AP (README, "Choosing the INT8 recipes of the new targets").
- Sizes: static (``--imgsz``), or, for fp32, ``--dynamic`` height / width (multiples of 32 from 32 to
  :data:`DYNAMIC_MAX` pixels, ``torch.export.Dim``): XNNPACK reshapes for each input, ExecuTorch plans its memory
  for the largest (about 225 MB at 2048x2048, measured). INT8 is static only (:data:`INT8_STATIC_REASON`). Batch 1.
- fp16 is not offered: see :data:`FP16_REASON`.

A ``.pte`` method has positional outputs without names. Which position is ``loc`` / ``conf`` / ``landmarks`` is
established by running the written file in the ExecuTorch runtime on real images and comparing each output with
PyTorch's, anchor level by anchor level (:func:`edgeface.export.base.level_errors`), and recorded in the manifest
(``target_info.output_positions``); an output that reproduces no PyTorch output (the scrambled-output failure)
fails the export. A dynamic program is also run at several other sizes against PyTorch.
"""

from __future__ import annotations

import collections
import time
import warnings
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
from edgeface.export.coreml import export_program
from edgeface.runtimes.executorch import LoadedMethod, describe_method

from edgeface.core.errors import EdgefaceError, first_line, require
from edgeface.core.images import ASTRONAUT, load_image
from edgeface.core.manifest import OUTPUT_COLUMNS, OUTPUTS
from edgeface.core.processing import INPUT_MULTIPLE, ResizePolicy, level_slices, preprocess
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.pte"
METHOD = "forward"
BACKEND = "XnnpackBackend"
# --dynamic: the range of input heights and widths (pixels, multiples of 32) and the size the ranges are reported
# around. ExecuTorch plans its memory for the largest input, so the maximum costs memory on the device at every
# size: 2048 is what the ONNX target allows as well (edgeface.export.onnx.DYNAMIC_RANGES).
DYNAMIC_MIN, DYNAMIC_OPT, DYNAMIC_MAX = INPUT_MULTIPLE, 640, 2048
# Sizes a dynamic program is run at against PyTorch at export (besides the binding check at DYNAMIC_CHECK_HW).
DYNAMIC_CHECK_SIZES = ((480, 640), (256, 384), (96, 160))
DYNAMIC_CHECK_HW = (640, 640)
# Output binding check: the worst, over anchor levels, RMS difference between a program output and a PyTorch output
# divided by the PyTorch output's spread (edgeface.export.base.level_errors). 0 = identical; priors in a wrong
# order give about 1.4. Measured at 320x320 / 640x640 on the parity images: fp32 < 1e-5, int8 < 0.2 (the
# default recipe) and < 0.35 (all int8).
MAPPING_TOLERANCE = {"fp32": 1e-3, "int8": 0.7}
# Raw-output difference of a dynamic fp32 program from PyTorch at every checked size (measured: <= 3.2e-5).
DYNAMIC_TOLERANCE = 1e-3
# INT8: module paths kept in float by default ("heads": the output heads and what follows them), chosen by measured
# WIDER FACE AP (README, "Choosing the INT8 recipes of the new targets").
INT8_KEEP_FLOAT = ("heads", "body.stage1")
INT8_LEAKY = "float"
HEAD_MODULES = ("ClassHead", "BboxHead", "LandmarkHead")
# Measured with executorch 1.5.1 on x86-64 (a half-precision program behind float32 casts, 320x320, one core):
# it lowers and runs, but the casts stay outside the delegate, it is 1.5x slower than fp32 (no FP16 arithmetic on
# this CPU: XNNPACK converts) and differs from FP32 PyTorch by up to 0.08 (loc) / 0.15 (landmarks). Phones run
# XNNPACK's FP16 kernels natively, which this machine cannot check.
FP16_REASON = ("fp16 is not offered for ExecuTorch: XNNPACK's fp16 path is slower than fp32 on x86 and its "
               "native Arm kernels cannot be checked here; use fp32 or int8")
# INT8 with dynamic sizes does not lower: the XNNPACK partitioner leaves per-channel weight dequantisation outside
# the delegate, which ExecuTorch cannot serialise (executorch 1.5.1: "Missing out variants:
# {'quantized_decomposed::dequantize_per_channel'}").
INT8_STATIC_REASON = ("ExecuTorch INT8 programs are exported per input size: with dynamic height/width the XNNPACK "
                      "partitioner leaves the per-channel weight dequantisation outside the delegate and "
                      "to_executorch fails (executorch 1.5.1); use --imgsz HxW, or --dynamic with fp32")
SPEC = TargetSpec(
    name="executorch",
    title="ExecuTorch",
    precisions=("fp32", "int8"),
    calibrated=("int8",),
    options=(
        TargetOption("keep_float", "int8: module paths computed in float, 'heads' for the output heads (default "
                     f"{list(INT8_KEEP_FLOAT)})"),
        TargetOption("leaky_relu", "int8: LeakyReLU as 'float' (XNNPACK's, between int8 layers) or 'decomposed' "
                     "(a*x + (1-a)*relu(x) in int8 ops)", default=INT8_LEAKY, choices=("float", "decomposed")),
    ),
    extra="executorch",
    runtime="executorch",
    libraries=("executorch", "torch", "torchao"),
    static_precisions=(("int8", INT8_STATIC_REASON),),
    bench=(("fp32", DEFAULT_IMGSZ), ("int8", DEFAULT_IMGSZ)),
)


def _toolchain():
    """The ExecuTorch converter pieces (the executorch extra)."""
    exir = require("executorch.exir", "executorch", "ExecuTorch export")
    partitioner = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch",
                          "ExecuTorch export (XNNPACK delegate)")
    return exir, partitioner.XnnpackPartitioner


# --- request ----------------------------------------------------------------------------------------------------


def _sizes(request: ExportRequest) -> list[tuple[int, int]]:
    """The sizes the program is exported for: the static size, or (opt, min, max) of a dynamic one."""
    if request.input_hw is not None:
        return [tuple(int(v) for v in request.input_hw)]
    return [(DYNAMIC_OPT, DYNAMIC_OPT), (DYNAMIC_MIN, DYNAMIC_MIN), (DYNAMIC_MAX, DYNAMIC_MAX)]


def dynamic_ranges(request: ExportRequest) -> dict[str, list[int]] | None:
    if request.input_hw is not None:
        return None
    return {"height": [DYNAMIC_MIN, DYNAMIC_OPT, DYNAMIC_MAX], "width": [DYNAMIC_MIN, DYNAMIC_OPT, DYNAMIC_MAX]}


def _dynamic_shapes(sizes: list[tuple[int, int]]):
    import torch  # deferred: PyTorch (export extra)

    if len(sizes) == 1:
        return None
    dims = {}
    for axis, values, name in ((2, [s[0] for s in sizes], "height"), (3, [s[1] for s in sizes], "width")):
        dims[axis] = INPUT_MULTIPLE * torch.export.Dim(f"{name}_32", min=min(values) // INPUT_MULTIPLE,
                                                       max=max(values) // INPUT_MULTIPLE)
    return {"images": dims}


def keep_float_paths(option: Any, model) -> tuple[str, ...]:
    """The ``keep_float`` option (a module path, a list of them, ``"heads"``) checked against the model."""
    paths = (option,) if isinstance(option, str) else tuple(option or ())
    known = dict(model.named_modules())
    for path in paths:
        if not isinstance(path, str) or (path != "heads" and path not in known):
            tops = ", ".join(n for n, _ in model.named_children())
            raise EdgefaceError(f"keep_float: the model has no module {path!r} (use 'heads' or module paths like "
                                f"'body.stage1'; top-level modules: {tops})")
    return paths


# --- quantisation -----------------------------------------------------------------------------------------------


def _module_path(entry: str) -> str:
    return entry[len("L['self']."):] if entry.startswith("L['self'].") else entry


def float_filter(keep: tuple[str, ...]):
    """A node predicate for the quantizer: False for the nodes computed in float. ``heads`` covers the three head
    ModuleLists and the ops of the top-level forward (the concatenations and the softmax that follow them), whose
    8-bit steps would quantize the decoded outputs themselves."""
    prefixes = [p for k in keep for p in (HEAD_MODULES if k == "heads" else (k,))]

    def quantize(node) -> bool:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return True  # placeholders, constants: the quantizer decides by their users
        paths = [_module_path(path) for path, _ in stack.values()]
        if "heads" in keep and all(p == "" for p in paths):
            return False  # the top-level forward: cat / softmax after the heads
        return not any(p == k or p.startswith(k + ".") for p in paths for k in prefixes)

    return quantize


LEAKY_MODES = ("float", "decomposed")


def integer_leaky(model, skip: tuple[str, ...] = ()) -> tuple[Any, int]:
    """A copy of ``model`` whose LeakyReLU(a) layers (outside the module paths in ``skip``) are written as
    ``a * x + (1 - a) * relu(x)``: the same function from MUL, RELU and ADD, which XNNPACK runs in int8 (its
    LeakyReLU is float only, so in an int8 graph each one runs in float between two conversions). Returns the
    copy and how many layers were rewritten."""
    import copy

    import torch.nn.functional as F  # noqa: N812 - torch's own alias
    from torch import nn  # deferred: PyTorch (export extra)

    class LeakyAsInt8Ops(nn.Module):
        def __init__(self, slope: float) -> None:
            super().__init__()
            self.slope = float(slope)

        def forward(self, x):
            return x * self.slope + F.relu(x) * (1.0 - self.slope)

    model = copy.deepcopy(model).eval()
    changed = 0

    def swap(module, prefix: str) -> None:
        nonlocal changed
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if any(path == k or path.startswith(k + ".") for k in skip):
                continue
            if isinstance(child, nn.LeakyReLU) and 0.0 < float(child.negative_slope) < 1.0:
                setattr(module, name, LeakyAsInt8Ops(child.negative_slope))
                changed += 1
            else:
                swap(child, path + ".")

    swap(model, "")
    return model, changed


def quantize_int8(model, sizes: list[tuple[int, int]], calibration: tuple[np.ndarray, ...],
                  keep: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """PT2E static INT8 for XNNPACK: returns the converted (fake-quantised) module and the calibration record."""
    import torch  # deferred: PyTorch (export extra)

    if not calibration:
        raise EdgefaceError("ExecuTorch INT8 needs calibration images (pass --calib DIR)")
    quantizer_module = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "executorch",
                               "ExecuTorch INT8 quantisation")
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "executorch", "ExecuTorch INT8 quantisation")
    started = time.perf_counter()
    h, w = sizes[0]
    with torch.no_grad():
        try:
            graph = torch.export.export(model.eval(), (torch.zeros(1, 3, h, w),),
                                        dynamic_shapes=_dynamic_shapes(sizes), strict=False).module()
        except Exception as exc:  # torch.export raises many types; the user needs the cause
            raise EdgefaceError(f"torch.export could not export {type(model).__name__} ({exc})") from None
        quantizer = quantizer_module.XNNPACKQuantizer().set_global(
            quantizer_module.get_symmetric_quantization_config(is_per_channel=True))
        if keep:
            quantizer.set_filter_function(float_filter(keep))
        try:
            prepared = pt2e.prepare_pt2e(graph, quantizer)
            for x in calibration:
                prepared(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            converted = pt2e.convert_pt2e(prepared)
        except Exception as exc:  # torchao's PT2E passes raise many types
            raise EdgefaceError(f"PT2E quantisation for XNNPACK failed ({type(exc).__name__}: "
                                f"{first_line(exc)})") from None
    record = {"method": "pt2e static (HistogramObserver activation ranges, MinMax per-channel weights)",
              "tool": "torchao.quantization.pt2e + executorch XNNPACKQuantizer",
              "images": len(calibration), "weights": "int8 per-channel symmetric",
              "activations": "int8 per-tensor affine", "modules_kept_float": list(keep),
              "calibration_seconds": round(time.perf_counter() - started, 1)}
    return converted, record


# --- export and lowering ----------------------------------------------------------------------------------------


def _export_quantized(converted, sizes: list[tuple[int, int]]):
    import torch  # deferred: PyTorch (export extra)

    h, w = sizes[0]
    try:
        return torch.export.export(converted, (torch.zeros(1, 3, h, w),), dynamic_shapes=_dynamic_shapes(sizes),
                                   strict=False)
    except Exception as exc:  # torch.export raises many types
        raise EdgefaceError(f"torch.export could not export the quantised model ({exc})") from None


def lower(exported) -> tuple[bytes, dict[str, Any]]:
    """ExportedProgram -> ``.pte`` bytes through the XNNPACK partitioner, and where the graph runs: nodes inside
    XNNPACK delegate blobs vs ops left to ExecuTorch's portable kernels (named)."""
    exir, partitioner = _toolchain()
    try:
        edge = exir.to_edge_transform_and_lower(exported, partitioner=[partitioner()])
        program = edge.to_executorch()
    except EdgefaceError:
        raise
    except Exception as exc:  # exir raises many types
        raise EdgefaceError(f"ExecuTorch could not lower the program to XNNPACK ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    graph = edge.exported_program().graph
    delegated = 0
    for module in edge.exported_program().graph_module.modules():
        original = getattr(module, "original_module", None)
        if original is not None:
            delegated += sum(1 for n in original.graph.nodes if n.op == "call_function")
    outside = collections.Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name in ("getitem", "executorch_call_delegate") or "exir.memory" in getattr(node.target, "__module__",
                                                                                          ""):
            continue  # delegate calls and their results; memory planning's allocations
        outside[name.split(".")[0] if "." in name else name] += 1
    delegates = sum(1 for n in graph.nodes if n.op == "call_function"
                    and getattr(n.target, "__name__", "") == "executorch_call_delegate")
    info = {"backend": BACKEND, "delegate_calls": delegates, "delegated_ops": delegated,
            "portable_ops": dict(sorted(outside.items())),
            "note": "ops outside the delegate run in ExecuTorch's portable CPU kernels"}
    return bytes(program.buffer), info


# --- checks of the written program ------------------------------------------------------------------------------


def load_method(path: Path) -> LoadedMethod:
    """The ``forward`` method of a ``.pte`` in the ExecuTorch runtime, held with its program (as
    :mod:`edgeface.runtimes.executorch` loads it)."""
    return LoadedMethod(path)


def _run(method, x: np.ndarray) -> list[np.ndarray]:
    import torch  # deferred: PyTorch (export extra)

    outputs = method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
    return [o.detach().numpy().astype(np.float32, copy=True) for o in outputs]


def _reference_inputs(model, input_hw: tuple[int, int]) -> list[tuple[str, np.ndarray]]:
    """Real pre-processed images (NCHW) for the binding check: the parity photographs (the bundled one and WIDER
    images) and a crop of the bundled photo in which the face fills the frame (so that the coarsest anchor level
    sees a face too)."""
    policy = ResizePolicy("fixed", input_hw)
    images = binding_photos(parity=3)
    return [(name, preprocess([im], policy=policy, mean_bgr=model.config.mean_bgr)[0]) for name, im in images]


def _torch_outputs(model, x: np.ndarray) -> dict[str, np.ndarray]:
    import torch  # deferred: PyTorch (export extra)

    with torch.inference_mode():
        return {n: t.float().numpy() for n, t in zip(OUTPUTS, model.eval()(torch.from_numpy(x)))}


def map_outputs(path: Path, model, precision: str, input_hw: tuple[int, int], *, strict: bool = True
                ) -> tuple[dict[str, int], dict[str, Any]]:
    """Which output position of the program's ``forward`` is which PyTorch output, established by running both on
    real images at ``input_hw``. Returns ``({name: position}, check)``. Raises EdgefaceError when a PyTorch output
    is reproduced by no program output (``strict=False``, for --no-verify: takes the closest one and reports the
    check as failed)."""
    method = load_method(path)
    inputs = _reference_inputs(model, input_hw)
    runs = [_run(method, x) for _, x in inputs]
    if len({len(r) for r in runs}) != 1 or len(runs[0]) != len(OUTPUTS):
        raise EdgefaceError(f"the ExecuTorch program returns {len(runs[0])} outputs, expected {len(OUTPUTS)} "
                            f"({', '.join(OUTPUTS)})")
    candidates = [np.concatenate([r[i] for r in runs]) for i in range(len(OUTPUTS))]
    torch_runs = [_torch_outputs(model, x) for _, x in inputs]
    reference = {n: np.concatenate([r[n] for r in torch_runs]) for n in OUTPUTS}
    levels = level_slices(input_hw, model.config.anchors)
    tolerance = MAPPING_TOLERANCE[precision]
    pairs = [(name, position) for name in OUTPUTS for position, values in enumerate(candidates)
             if values.shape == reference[name].shape]
    errors = {(n, p): level_errors(candidates[p], reference[n], levels) for n, p in pairs}
    max_abs = {(n, p): float(np.abs(candidates[p] - reference[n]).max()) for n, p in pairs}
    positions, report = choose_outputs(errors, max_abs, tolerance=tolerance, strict=strict, what="ExecuTorch",
                                       outputs=[list(c.shape) for c in candidates])
    for name, position in positions.items():
        report[name] = {"position": position, **report[name]}
    worst = max(max(r["error_by_stride"].values()) for r in report.values())
    check = {"status": "passed" if worst <= tolerance else "failed", "input_size": list(input_hw),
             "images": [n for n, _ in inputs], "metric": "per anchor level RMS difference / reference spread",
             "tolerance": tolerance, "outputs": report}
    return positions, check


def check_sizes(path: Path, model, precision: str, positions: dict[str, int],
                sizes: tuple[tuple[int, int], ...]) -> dict[str, Any]:
    """A dynamic program at other input sizes: output shapes (priors of each size) and the largest raw difference
    from PyTorch on a real photograph. fp32 must match within :data:`DYNAMIC_TOLERANCE`."""
    method = load_method(path)
    photo = load_image(ASTRONAUT)
    diffs, problems = {}, []
    for h, w in sizes:
        x = preprocess([photo], policy=ResizePolicy("fixed", (h, w)), mean_bgr=model.config.mean_bgr)[0]
        try:
            got = _run(method, x)
        except Exception as exc:  # the runtime's own error type
            raise EdgefaceError(f"the dynamic ExecuTorch program fails at {h}x{w} ({exc})") from None
        want = _torch_outputs(model, x)
        priors = model.config.anchors.num_priors((h, w))
        diffs[f"{h}x{w}"] = {}
        for name, k in OUTPUT_COLUMNS.items():
            out = got[positions[name]]
            if out.shape != (1, priors, k):
                problems.append(f"{name} is {list(out.shape)} at {h}x{w}, expected [1, {priors}, {k}]")
                continue
            diffs[f"{h}x{w}"][name] = float(f"{np.abs(out - want[name]).max():.3g}")
    worst = max((v for d in diffs.values() for v in d.values()), default=0.0)
    if precision == "fp32" and worst > DYNAMIC_TOLERANCE:
        problems.append(f"outputs differ from PyTorch by up to {worst:.3g} (tolerance {DYNAMIC_TOLERANCE})")
    if problems:
        raise EdgefaceError("the dynamic ExecuTorch program is wrong at other input sizes: " + "; ".join(problems)
                            + "; nothing was written")
    return {"status": "passed", "sizes": [list(s) for s in sizes], "max_abs_diff": diffs,
            "tolerance": DYNAMIC_TOLERANCE if precision == "fp32" else None}


def method_meta(path: Path) -> dict[str, Any]:
    """The method's input and output tensors as the program states them (for a dynamic program: the largest
    shapes, for which its memory is planned)."""
    return describe_method(load_method(path))


# --- the converter ----------------------------------------------------------------------------------------------


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    import torch  # deferred: PyTorch (export extra)

    _toolchain()
    options = dict(request.options)
    int8 = request.precision == "int8"
    keep = keep_float_paths(options.pop("keep_float", INT8_KEEP_FLOAT if int8 else ()), model)
    leaky = options.pop("leaky_relu", INT8_LEAKY if int8 else None)
    if options:
        raise EdgefaceError(f"unknown ExecuTorch options {sorted(options)} (known: "
                            f"{', '.join(o.name for o in SPEC.options)})")
    if (keep or leaky) and not int8:
        raise EdgefaceError(f"keep_float / leaky_relu apply to INT8 bundles only (this export is "
                            f"{request.precision})")
    if int8 and request.input_hw is None:
        raise EdgefaceError(INT8_STATIC_REASON)
    sizes = _sizes(request)
    notes = []
    if request.input_hw is None:
        notes.append(f"dynamic height and width, multiples of {INPUT_MULTIPLE} from {DYNAMIC_MIN} to "
                     f"{DYNAMIC_MAX}; batch 1 (the Detector runs a batch image by image). ExecuTorch plans memory "
                     f"for the largest size. torch.export exports this model for multiples of {INPUT_MULTIPLE} only: "
                     "the runtime zero-pads other sizes (the mean colour, as batch padding is) and cuts the outputs "
                     "back to the priors of the size given, so priors at the bottom / right edge can differ from "
                     "PyTorch's there (parity below is at the images' own sizes)")
    else:
        notes.append(f"static input size {sizes[0][0]}x{sizes[0][1]}, batch 1")
    started = time.perf_counter()
    calibration = None
    checks: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export / torchao deprecation chatter
        if int8:
            network, rewritten = integer_leaky(model, keep) if leaky == "decomposed" else (model, 0)
            converted, calibration = quantize_int8(network, sizes, request.calibration, keep)
            calibration["source"] = request.calibration_source
            calibration["leaky_relu"] = leaky
            if rewritten:
                notes.append(f"INT8: {rewritten} LeakyReLU layers written as a*x + (1-a)*relu(x) (the same "
                             "function in int8 MUL / RELU / ADD; XNNPACK's LeakyReLU is float only)")
            exported = _export_quantized(converted, sizes)
            if keep:
                notes.append(f"INT8 with {', '.join(keep)} computed in float (chosen by WIDER FACE AP); "
                             "options keep_float=[] gives an all-int8 graph")
        else:
            exported, checks["export"] = export_program(model, sizes)
        export_seconds = time.perf_counter() - started
        content, delegation = lower(exported)
    lower_seconds = time.perf_counter() - started - export_seconds
    path = out_dir / MODEL_FILE
    path.write_bytes(content)

    check_hw = sizes[0] if request.input_hw is not None else DYNAMIC_CHECK_HW
    positions, output_check = map_outputs(path, model, request.precision, check_hw, strict=request.verify)
    if output_check["status"] != "passed":
        notes.append(f"output binding NOT verified (--no-verify): the closest outputs differ from PyTorch beyond "
                     f"the tolerance ({output_check['outputs']})")
    info: dict[str, Any] = {"method": METHOD, "input_position": 0, "output_positions": positions,
                            "output_check": output_check, "delegation": delegation,
                            "method_meta": method_meta(path)}
    if request.input_hw is None:
        if request.verify:
            info["size_check"] = check_sizes(path, model, request.precision, positions, DYNAMIC_CHECK_SIZES)
        else:
            info["size_check"] = {"status": "skipped", "reason": "--no-verify"}
    info["runtime"] = ("ExecuTorch runtime (executorch.runtime, the XNNPACK delegate on the CPU); on Android the "
                       "Java/Kotlin Module API, on iOS the ExecuTorch framework, both with the XNNPACK backend")
    portable = delegation["portable_ops"]
    if portable:
        notes.append(f"ops outside the XNNPACK delegate (ExecuTorch portable kernels): "
                     f"{', '.join(f'{k} x{v}' for k, v in portable.items())}")
    return Conversion(
        files={"model": MODEL_FILE},
        layout="NCHW",
        input_dtype="float32",
        dynamic=dynamic_ranges(request),
        calibration=calibration,
        converter={"exporter": "torch.export.export" + (" (PT2E-quantised module)" if int8 else
                                                        " + run_decompositions({})"),
                   "lowering": "executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch",
                   "export_seconds": round(export_seconds, 1), "lower_seconds": round(lower_seconds, 1),
                   "checks": checks, "torch": torch.__version__,
                   "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        extra=info,
    )
