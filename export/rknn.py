"""RKNN (Rockchip NPUs: RK3588 / RK3588S, RK3576, RK3566 / RK3568, RK3562, RV1106 / RV1103 cameras): a ``.rknn``
model for one SoC (``soc``), built by Rockchip's ``rknn-toolkit2`` from the simplified FP32 ONNX model that the
ONNX target builds (:func:`edgeface.export.onnx.build`: the same names ``input`` / ``loc`` / ``conf`` /
``landmarks``, a fixed size, onnxsim's own check).

- Input: float32 NHWC, BGR minus the mean, exactly what every other target is fed (``mean_values`` / ``std_values``
  are left at 0 / 1: the mean stays outside the model, as the manifest states). The NPU computes in int8 (or
  fp16); the runtime (``rknn-toolkit-lite2`` on the board, or the C API with ``pass_through = 0``) converts the
  float32 input with the model's own input quantisation. Outputs come back as float32 (dequantised by the runtime),
  in the ONNX model's order (``target_info.output_order``).
- INT8: ``build(do_quantization=True)`` calibrated on the real images of the export (``w8a8``: int8 per-channel
  weights, int8 asymmetric activations), with ``algorithm`` (rknn's ``quantized_algorithm``: normal, mmse,
  kl_divergence). ``keep_float`` keeps layers in float16 through rknn's hybrid quantisation
  (``hybrid_quantization_step1`` / ``step2``): ``heads`` (the output heads, from the SSH outputs to ``loc`` /
  ``conf`` / ``landmarks``) and tensor-name prefixes such as ``/body/stage1/``.
- FP16: ``build(do_quantization=False)``, on the SoCs whose NPU computes in fp16 (:data:`SOCS`); RV1106 / RV1103
  have int8 only and are refused before anything runs.

Checked here, in the process that built the model (rknn-toolkit2's simulator runs a model only in the session that
built it: a ``.rknn`` loaded back from disk cannot run on x86): the export pipeline's parity check and ``--eval``
run the simulator through the in-memory runtime this converter hands over (``Conversion.runtime``), and rknn's
per-layer ``accuracy_analysis`` (golden float vs simulator) on the bundled photograph records the worst layers in
``calibration.accuracy_analysis`` (INT8). Where the graph runs (``target_info.placement``) is read from the
compiler's own operator table (each operator's target, NPU or CPU), printed when the model is built; per-layer time
(``eval_perf``) and memory (``eval_memory``) need a board and are not measured here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export import onnx as onnx_export
from edgeface.export.base import Conversion, ExportRequest, TargetOption, TargetSpec
from edgeface.runtimes.rknn import RknnRuntime

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import captured_output
from edgeface.core.images import ASTRONAUT, load_image
from edgeface.core.manifest import OUTPUTS, manifest_for_model
from edgeface.core.processing import ResizePolicy, preprocess
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.rknn"
TOOLKIT = "rknn-toolkit2"
# Rockchip SoCs (rknn-toolkit2's target_platform names) -> whether the NPU computes in fp16, and its NPU cores.
# Source: Rockchip's RKNPU2 / rknn-toolkit2 documentation (supported platforms and data types); checked here:
# rknn-toolkit2 2.5.0 builds fp16 for rk3588 / rk3566 and refuses it for rv1106 / rv1103b ("build" fails).
SOCS: dict[str, dict[str, Any]] = {
    "rk3588": {"fp16": True, "npu_cores": 3, "title": "RK3588 / RK3588S (6 TOPS)"},
    "rk3576": {"fp16": True, "npu_cores": 2, "title": "RK3576 (6 TOPS)"},
    "rk3568": {"fp16": True, "npu_cores": 1, "title": "RK3568 (1 TOPS)"},
    "rk3566": {"fp16": True, "npu_cores": 1, "title": "RK3566 (1 TOPS)"},
    "rk3562": {"fp16": True, "npu_cores": 1, "title": "RK3562 (1 TOPS)"},
    "rv1106": {"fp16": False, "npu_cores": 1, "title": "RV1106 (0.5 TOPS, int8 only)"},
    "rv1103": {"fp16": False, "npu_cores": 1, "title": "RV1103 (0.5 TOPS, int8 only)"},
    "rv1106b": {"fp16": False, "npu_cores": 1, "title": "RV1106B (int8 only)"},
    "rv1103b": {"fp16": False, "npu_cores": 1, "title": "RV1103B (int8 only)"},
}
DEFAULT_SOC = "rk3588"
ALGORITHMS = ("normal", "mmse", "kl_divergence")
# INT8 recipe, chosen by measurement (README, "Choosing the INT8 recipes of the new targets"): rknn's per-layer
# accuracy analysis puts the
# largest errors in the full-resolution MobileNet stage (stage1, 8-64 channels) and the SSH convolutions; plain
# INT8 (all layers int8) matched 10 of 30 FP32 faces at 640x640 (parity fails; output cosine loc 0.87, landmarks
# 0.89), kl_divergence 13 of 30, the heads in float16 10 of 30; stage1 in float16 (hybrid quantisation) all 30,
# landmark error 0.012, output cosine 0.99 (as the ONNX recipe keeps stage1 in float).
INT8_ALGORITHM = "normal"
INT8_KEEP_FLOAT: tuple[str, ...] = ("/body/stage1/",)
# Operators of the compiler's table that only move the input in and the outputs out (not counted as placement).
IO_OPERATORS = ("InputOperator", "OutputOperator")
WORST_LAYERS = 8  # layers of the accuracy analysis recorded in the manifest

def import_toolkit():
    """``rknn.api.RKNN``, or one line saying where rknn-toolkit2 lives."""
    try:
        from rknn.api import RKNN
    except ImportError as exc:
        raise EdgefaceError(
            f"the rknn target needs {TOOLKIT} (Rockchip's converter and NPU simulator, x86-64 Linux wheels), which "
            f"is not importable here ({exc}); it pins torch <= 2.4 and numpy <= 1.26.4, so it lives in its own "
            "environment: run `edgeface export --target rknn` from .venv-rknn (made by scripts/test-rknn.sh, "
            "constraints-rknn.txt)") from None
    return RKNN


def check_soc(precision: str, options: dict[str, Any]) -> str:
    """The ``--soc`` of an export, refused in one line when unknown or unable to run ``precision``."""
    soc = options.get("soc", DEFAULT_SOC)
    if soc not in SOCS:
        raise EdgefaceError(f"--soc {soc!r} is not supported: give {', '.join(SOCS)} (default {DEFAULT_SOC})")
    if precision == "fp16" and not SOCS[soc]["fp16"]:
        fp16 = ", ".join(name for name, chip in SOCS.items() if chip["fp16"])
        raise EdgefaceError(f"--precision fp16 is not available for --soc {soc}: its NPU computes in int8 only; "
                            f"export --precision int8 for it (fp16: {fp16})")
    return soc


def preflight(precision: str, options: dict[str, Any]) -> None:
    """Before any work (the pipeline calls it first): the SoC and precision, then rknn-toolkit2 importable here."""
    check_soc(precision, options)
    import_toolkit()


SPEC = TargetSpec(
    name="rknn",
    title="RKNN",
    aliases=("rockchip",),
    precisions=("int8", "fp16"),
    calibrated=("int8",),
    static_only="a .rknn model is compiled for one input shape; export one bundle per size (--imgsz HxW)",
    options=(
        TargetOption("soc", "the Rockchip SoC the model is compiled for: " + ", ".join(SOCS) + f" (default "
                     f"{DEFAULT_SOC}; fp16 on all but the int8-only RV1106 / RV1103)", flag="--soc",
                     default=DEFAULT_SOC, choices=tuple(SOCS)),
        TargetOption("algorithm", "int8: rknn-toolkit2's quantized_algorithm, normal (default), mmse or "
                     "kl_divergence", default=INT8_ALGORITHM, choices=ALGORITHMS),
        TargetOption("keep_float", "int8: layers kept in float16 by rknn hybrid quantisation: 'heads' and "
                     f"tensor-name prefixes (default {list(INT8_KEEP_FLOAT)})"),
    ),
    # rknn-toolkit2 pins torch <= 2.4 and numpy <= 1.26.4: it installs in an environment of its own
    # (scripts/test-rknn.sh, constraints-rknn.txt) next to edgeface's export extra, never into the main one.
    extra="export",
    runtime="rknn",
    libraries=("torch", "onnx", "onnxsim", "onnxruntime", TOOLKIT),
    bench=(("int8", (640, 640)),),
    preflight=preflight,
)


def check_request(request: ExportRequest) -> str:
    """The SoC of ``request`` (refused in one line when it cannot run the precision); before any work."""
    soc = check_soc(request.precision, request.options)
    if request.input_hw is None:
        raise EdgefaceError(f"the rknn target takes fixed input sizes only: {SPEC.static_only}")
    if request.precision != "int8":
        given = [k for k in ("algorithm", "keep_float") if request.options.get(k) not in (None, (), [])]
        if given:
            raise EdgefaceError(f"option {given[0]!r} is for --precision int8, not {request.precision}")
    return soc


def _call(what: str, method, *args, **kwargs) -> Any:
    """An rknn-toolkit2 API call: its non-zero status or its exception (whose text is a whole traceback) as one
    line."""
    try:
        status = method(*args, **kwargs)
    except Exception as exc:  # rknn-toolkit2 raises ValueError / RuntimeError with its log's traceback as text
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise EdgefaceError(f"{TOOLKIT} {what} failed: {_plain(lines[-1]) if lines else type(exc).__name__}") from None
    if isinstance(status, int) and status != 0:
        raise EdgefaceError(f"{TOOLKIT} {what} failed (status {status})")
    return status


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    return _ANSI.sub("", text).strip()


def _head_tensors(proto) -> list[list[str]]:
    """``keep_float: heads`` as rknn ``custom_hybrid`` pairs: [SSH output tensor, graph output] for every head
    convolution's input and the output it feeds."""
    nodes = set(onnx_export.head_nodes(proto))
    producers = {out: node for node in proto.graph.node for out in node.output}
    pairs = []
    for output in OUTPUTS:
        stack, seen = [output], set()
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.name in seen or node.name not in nodes:
                continue
            seen.add(node.name)
            if node.op_type == "Conv":
                pairs.append([node.input[0], output])
                continue
            stack.extend(node.input)
    return sorted(pairs)


def _keep_float_prefixes(cfg_path: Path, prefixes: list[str]) -> list[str]:
    """Adds every quantised tensor whose name starts with one of ``prefixes`` to the ``custom_quantize_layers`` of
    rknn's hybrid quantisation config (as float16); returns their names. A prefix that matches nothing is
    refused (a typo would otherwise quantise everything). The file is edited as text, the rest of it byte for
    byte: step2 refuses a config whose recorded ranges were rewritten (a YAML round trip reformats floats)."""
    from ruamel.yaml import YAML  # rknn-toolkit2's own dependency

    text = cfg_path.read_text()
    config = YAML(typ="safe").load(text)
    tensors = list(config.get("quantize_parameters") or {})
    custom = dict(config.get("custom_quantize_layers") or {})
    added = []
    for prefix in prefixes:
        matched = [name for name in tensors if name.startswith(prefix)]
        if not matched:
            raise EdgefaceError(f"keep_float {prefix!r} names no tensor of the model (tensor names look like "
                                "'/body/stage1/...', '/fpn/...', '/ssh1/...'; or 'heads')")
        added += [name for name in matched if name not in custom and name not in added]
    if not added:
        return added
    entries = "".join(f"    {name if re.fullmatch(r'[A-Za-z0-9_/.:-]+', name) and ':' not in name else repr(name)}"
                      f": float16\n" for name in added)
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith("custom_quantize_layers:")), None)
    if at is None:
        lines.insert(0, "custom_quantize_layers:\n" + entries)
    elif lines[at].split(":", 1)[1].strip() in ("", "{}"):
        lines[at] = "custom_quantize_layers:\n" + entries
    else:
        raise EdgefaceError(f"unexpected custom_quantize_layers line in {cfg_path.name}: {lines[at].strip()!r}")
    cfg_path.write_text("".join(lines))
    return added


def _float_layers(cfg_path: Path) -> list[str]:
    from ruamel.yaml import YAML

    config = YAML().load(cfg_path.read_text())
    return sorted(config.get("custom_quantize_layers") or {})


def _placement(log_text: str) -> dict[str, Any]:
    """Where each operator runs, from the compiler's operator table in the build log ("ID OpType DataType Target
    ..."): the share on the NPU and the operators on the CPU, named. Input and output operators (moving data in and
    out) are not counted."""
    lines = [_plain(line) for line in log_text.splitlines()]
    header = next((i for i, line in enumerate(lines) if re.search(r"\bID\s+OpType\s+DataType\s+Target\b", line)),
                  None)
    if header is None:
        raise EdgefaceError(f"{TOOLKIT} printed no operator table when it built the model: its placement (NPU or "
                            "CPU per operator) is unknown")
    ops = []
    for line in lines[header + 1:]:
        body = re.sub(r"^D RKNN: \[[^\]]*\]\s*", "", line)
        if body.startswith("---"):
            if ops:
                break
            continue
        fields = body.split()
        if len(fields) < 5 or not fields[0].isdigit():
            break
        ops.append({"id": int(fields[0]), "op": fields[1], "dtype": fields[2], "target": fields[3],
                    "name": fields[-1]})
    compute = [op for op in ops if op["op"] not in IO_OPERATORS]
    on_npu = [op for op in compute if op["target"] == "NPU"]
    fallback = [f"{op['op']} {op['name']} ({op['dtype']})" for op in compute if op["target"] != "NPU"]
    if not compute:
        raise EdgefaceError(f"{TOOLKIT}'s operator table lists no operator")
    return {"npu_nodes": len(on_npu), "total_nodes": len(compute), "npu_share": round(len(on_npu) / len(compute), 4),
            "cpu_fallback": fallback,
            "counted_by": f"{TOOLKIT}'s compiler operator table (Target NPU / CPU per operator), printed at build; "
                          "input and output operators not counted",
            "dtypes": {d: sum(op["dtype"] == d for op in compute) for d in sorted({op["dtype"] for op in compute})}}


def _accuracy_analysis(rknn, image: np.ndarray, folder: Path) -> dict[str, Any]:
    """rknn's per-layer accuracy analysis (float "golden" vs the simulator) on one real image: the output tensors'
    cosine and the worst layers, by the error accumulated up to them ("entire") and by their own ("single")."""
    npy = folder / "analysis_input.npy"
    np.save(npy, image)
    _call("accuracy_analysis", rknn.accuracy_analysis, inputs=[str(npy)], output_dir=str(folder / "snapshot"))
    table = folder / "snapshot" / "error_analysis.txt"
    rows = []
    for line in table.read_text(errors="replace").splitlines():
        match = re.match(r"^\[(\w+)\]\s+(\S+)\s+([0-9.]+)\s*\|\s*([0-9.]+)\s+([0-9.]+)\s*\|\s*([0-9.]+)",
                         _plain(line))
        if match:
            op, name, cos, _, single, _ = match.groups()
            rows.append({"layer": name, "op": op, "cos": float(cos), "single_cos": float(single)})
    if not rows:
        raise EdgefaceError(f"{TOOLKIT}'s accuracy analysis wrote no table ({table})")
    outputs = {row["layer"]: row["cos"] for row in rows if row["layer"] in OUTPUTS}
    return {"image": ASTRONAUT.name, "compared": "float model (golden) vs simulator, cosine per layer output",
            "outputs_cos": outputs,
            "worst_layers": sorted(rows, key=lambda r: r["cos"])[:WORST_LAYERS],
            "worst_single_layers": sorted(rows, key=lambda r: r["single_cos"])[:WORST_LAYERS],
            "layers": len(rows)}


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    """Write ``model.rknn`` for ``request`` into ``out_dir`` and hand over the simulator running it.

    Raises :class:`EdgefaceError` (one line) when rknn-toolkit2 is not installed, the SoC has no fp16, a
    ``keep_float`` prefix names no tensor, or a toolkit step fails."""
    soc = check_request(request)
    RKNN = import_toolkit()
    options = request.options
    int8 = request.precision == "int8"
    algorithm = options.get("algorithm", INT8_ALGORITHM)
    keep_float = options.get("keep_float", INT8_KEEP_FLOAT) if int8 else ()
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    keep_float = list(keep_float)
    fp32 = dataclasses.replace(request, precision="fp32")
    proto, _, checks = onnx_export.build(model, fp32)
    policy = ResizePolicy("fixed", request.input_hw)
    mean = model.config.mean_bgr
    timings: dict[str, float] = {}
    rknn = None
    with tempfile.TemporaryDirectory(prefix="edgeface-rknn-") as tmp:
        work = Path(tmp)
        import onnx  # deferred: the converters

        onnx_path = work / "model.onnx"
        onnx.save(proto, onnx_path)
        dataset = work / "dataset.txt"
        if int8:
            paths = []
            for i, tensor in enumerate(request.calibration):  # (1, 3, H, W) float32, mean subtracted
                paths.append(work / f"calib_{i:04d}.npy")
                np.save(paths[-1], np.ascontiguousarray(tensor, dtype=np.float32))
            dataset.write_text("".join(f"{p}\n" for p in paths))
        build_log = work / "build.log"
        started = time.perf_counter()
        try:
            with open(build_log, "w+") as log, captured_output(log):
                rknn = RKNN(verbose=True)  # verbose: the compiler prints its operator table (placement)
                config = dict(target_platform=soc, optimization_level=3, float_dtype="float16")
                if int8:
                    config.update(quantized_dtype="w8a8", quantized_algorithm=algorithm, quantized_method="channel")
                _call("config", rknn.config, **config)
                _call("load_onnx", rknn.load_onnx, model=str(onnx_path))
                float_layers: list[str] = []
                if int8 and keep_float:
                    heads = _head_tensors(proto) if "heads" in keep_float else None
                    with contextlib.chdir(work):  # step1 writes model.model / .data / .quantization.cfg here
                        _call("hybrid_quantization_step1", rknn.hybrid_quantization_step1, dataset=str(dataset),
                              custom_hybrid=heads)
                        cfg = work / "model.quantization.cfg"
                        _keep_float_prefixes(cfg, [k for k in keep_float if k != "heads"])
                        float_layers = _float_layers(cfg)
                        rknn.release()
                        rknn = RKNN(verbose=True)
                        _call("config", rknn.config, **config)
                        _call("hybrid_quantization_step2", rknn.hybrid_quantization_step2,
                              model_input=str(work / "model.model"), data_input=str(work / "model.data"),
                              model_quantization_cfg=str(cfg))
                else:
                    _call("build", rknn.build, do_quantization=int8, dataset=str(dataset) if int8 else None)
                _call("export_rknn", rknn.export_rknn, str(out_dir / MODEL_FILE))
                timings["build"] = round(time.perf_counter() - started, 1)
                _call("init_runtime (simulator)", rknn.init_runtime)
            log_text = build_log.read_text(errors="replace")
            placement = _placement(log_text)
            analysis = None
            if int8 and request.verify:
                started = time.perf_counter()
                photo = preprocess([load_image(ASTRONAUT)], policy=policy, mean_bgr=mean)[0]
                with open(work / "analysis.log", "w") as log, captured_output(log):
                    analysis = _accuracy_analysis(rknn, photo, work)
                timings["accuracy_analysis"] = round(time.perf_counter() - started, 1)
        except BaseException:
            if rknn is not None:
                rknn.release()
            if build_log.exists():  # what the toolkit printed, into the export's own log (base.quiet)
                with contextlib.suppress(OSError):
                    os.write(2, build_log.read_bytes()[-200_000:])
            raise

    version = library_versions(TOOLKIT).get(TOOLKIT, "unknown")
    manifest = manifest_for_model(model, target="rknn", precision=request.precision, files={"model": MODEL_FILE},
                                  layout="NHWC", input_hw=request.input_hw)
    runtime = RknnRuntime(manifest, rknn, source=f"{out_dir / MODEL_FILE} ({TOOLKIT} {version} simulator, in "
                                                 "memory)", backend="simulator")
    calibration = None
    if int8:
        calibration = {"tool": f"{TOOLKIT} build (do_quantization)" if not keep_float
                       else f"{TOOLKIT} hybrid_quantization_step1 / step2",
                       "images": len(request.calibration), "source": request.calibration_source,
                       "dtype": "w8a8", "algorithm": algorithm, "weights": "int8 per-channel",
                       "activations": "int8 asymmetric per-tensor", "keep_float": keep_float,
                       "nodes_kept_float": float_layers}
        if analysis is not None:
            calibration["accuracy_analysis"] = analysis
    return Conversion(
        files={"model": MODEL_FILE},
        layout="NHWC",
        calibration=calibration,
        converter={"exporter": f"torch.onnx.export (TorchScript) -> onnxsim -> {TOOLKIT} load_onnx / build / "
                               "export_rknn", "opset": request.opset, "checks": checks, "seconds": timings,
                   "versions": library_versions(*SPEC.libraries)},
        notes=[f"Compiled for {SOCS[soc]['title']}: run it on that SoC with rknn-toolkit-lite2 (the rknn runtime) "
               "or the RKNN C API (rknn_inputs_set with a float32 NHWC input and pass_through = 0; outputs with "
               "want_float = 1), in target_info.output_order.",
               f"Checked on x86 in {TOOLKIT}'s simulator in the process that built it; Rockchip reports that the "
               "simulator and boards can differ: the runtime's self-check on the bundled photograph "
               "(parity/reference.json) runs on the board when the bundle is opened."],
        runtime=runtime,
        extra={
            "soc": soc,
            "npu_cores": SOCS[soc]["npu_cores"],
            "toolkit": f"{TOOLKIT} {version}",
            "output_order": list(OUTPUTS),
            "placement": placement,
            "verified_here": [f"parity against PyTorch on real images in the {TOOLKIT} simulator",
                              *(["per-layer accuracy analysis (calibration.accuracy_analysis)"] if analysis else [])],
            "not_measured_here": ["per-layer NPU time (eval_perf) and memory (eval_memory): they need the board",
                                  "outputs on the board's NPU (the simulator is not bit-exact to every board)"],
        },
    )
