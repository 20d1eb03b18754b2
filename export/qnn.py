"""QNN (Snapdragon phones and boards, Hexagon NPU): a static QDQ ONNX model that onnxruntime's QNN execution provider
runs entirely on the HTP, and the ahead-of-time compiled QNN context binary of it for one SoC, the deployable
artifact.

- The float model is :mod:`edgeface.export.onnx`'s (``export_float``, ``simplify``), prepared with
  ``onnxruntime.quantization.execution_providers.qnn.qnn_preprocess_model`` and quantised with the QNN EP's own
  configuration (``get_qnn_qdq_config``: the overrides that make every operator's types ones the HTP takes),
  calibrated on real images. Every node is quantised: no float islands (the ONNX target's recipe keeps the heads
  and stage1 in float; on a QNN device those would run on the CPU).
- Variants (``activation_bits``): 8-bit activations and weights ("w8a8", uint8 asymmetric activations, int8
  per-channel symmetric weights: the default) or 16-bit activations with 8-bit weights ("w8a16", uint16
  activations). The manifest's precision is ``int8`` for both; the variant is in ``calibration``.
- Placement, in ``target_info.placement``: the QDQ model is loaded on the QNN EP with CPU fallback allowed and the
  node assignment recorded (``session.record_ep_graph_assignment_info``); any node not on the NPU is named, and
  fails the export unless ``allow_fallback``. Then it is loaded with fallback disabled
  (``session.disable_cpu_ep_fallback``), which only succeeds when the whole graph runs on the HTP.
- The context binary (``ep.context_enable``, embedded) for ``soc_model`` (a SoC name of :data:`SOCS`; boards set
  it), compiled here on x86-64 with the simulator's HTP backend, is the bundle's ``context`` file; its outputs are
  checked against the QDQ model's on the HTP.

Parity and ``--eval`` run the QDQ model on the simulated HTP (the ``qnn`` runtime): seconds per 640x640 image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.export import onnx as onnx_export
from edgeface.export.base import Conversion, ExportRequest, TargetOption, TargetSpec
from edgeface.runtimes.qnn import EP_NAME, assignment, qnn_session

from edgeface.core.errors import EdgefaceError, first_line, require
from edgeface.core.manifest import OUTPUTS
from edgeface.core.versions import library_versions

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.onnx"
CONTEXT_FILE = "model_ctx.onnx"  # the QNN EP's name for an EPContext model is <model>_ctx.onnx
# Snapdragon SoCs: name -> (QNN soc_model number, HTP architecture). Source: the QNN SoC table as Qualcomm's
# ExecuTorch backend carries it (pytorch/executorch backends/qualcomm/serialization/qc_schema.py, QcomChipset and
# _soc_info_table). Only SoCs whose context binary of this model compiles here (onnxruntime-qnn 2.7.0, QNN SDK
# 2.51): SM8350 (30, v68) fails to finalize ("QNN_COMMON_ERROR_MEM_ALLOC"), QCM6490 (93, v68) fails in
# onnxruntime's layout transformation ("Node '/fpn/Resize_token_..' OpType:Resize with domain:com.ms.internal.nhwc
# was inserted using the NHWC format as requested by QNNExecutionProvider, but was not selected by that EP").
SOCS = {
    "SM8450": (36, 69),  # Snapdragon 8 Gen 1
    "SM8475": (42, 69),  # Snapdragon 8+ Gen 1
    "SM8550": (43, 73),  # Snapdragon 8 Gen 2
    "SM8650": (57, 75),  # Snapdragon 8 Gen 3
    "SM8750": (69, 79),  # Snapdragon 8 Elite
    "SM8850": (87, 81),  # Snapdragon 8 Elite Gen 5
    "QCS9100": (77, 73),  # Dragonwing IQ-9075 (Qualcomm's robotics / industrial boards)
    "SA8295": (39, 68),  # Snapdragon Cockpit (automotive)
}
DEFAULT_SOC = "SM8650"
ACTIVATION_BITS = (8, 16)
VARIANTS = {8: "w8a8", 16: "w8a16"}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_PERCENTILE = 99.999
# w8a8: activations kept in 16 bits (selectors of int16_tensors), chosen by measured WIDER FACE AP (README,
# "Choosing the INT8 recipes of the new targets").
INT16_ACTIVATIONS: tuple[str, ...] = ("/body/stage1/",)
# ONNX opset of the float model. 16-bit activations need QuantizeLinear of opset 21, which the TorchScript exporter
# does not write: below 21 the quantiser uses the com.microsoft Q/DQ operators, which the QNN EP takes.
OPSET = 17

SPEC = TargetSpec(
    name="qnn",
    title="QNN",
    aliases=("snapdragon",),
    precisions=("int8",),
    calibrated=("int8",),
    static_only="the Hexagon NPU (HTP) runs graphs compiled for one input shape; export one bundle per size "
                "(--imgsz HxW)",
    options=(
        TargetOption("soc_model", f"the Snapdragon SoC the context binary is compiled for: "
                     f"{', '.join(SOCS)} (default {DEFAULT_SOC}, Snapdragon 8 Gen 3)", flag="--soc-model",
                     default=DEFAULT_SOC, choices=tuple(SOCS)),
        TargetOption("activation_bits", "activations in 8 bits (w8a8, default) or 16 bits (w8a16); weights are "
                     "8-bit either way", flag="--activation-bits", default=8, choices=ACTIVATION_BITS),
        TargetOption("int16_activations", "w8a8: activations kept in 16 bits, on the NPU: 'heads', 'input' and "
                     f"node-name prefixes (default {list(INT16_ACTIVATIONS)})"),
        TargetOption("method", "calibration: minmax (default), entropy or percentile", default="minmax",
                     choices=CALIBRATION_METHODS),
        TargetOption("percentile", f"with method percentile: the percentile (default {DEFAULT_PERCENTILE})"),
        TargetOption("per_channel", "int8 per-channel symmetric weights (default true) or uint8 per-tensor",
                     default=True, choices=(True, False)),
        TargetOption("allow_fallback", "accept nodes the NPU does not take, run on the CPU and named in "
                     "target_info.placement (default false: such a graph fails the export)", default=False,
                     choices=(True, False)),
    ),
    extra="qnn",
    runtime="qnn",
    libraries=("torch", "onnx", "onnxsim", "onnxruntime", "onnxruntime-qnn"),
    bench=(("int8", (640, 640)),),
    bench_limit=50,  # the x86 HTP emulator takes seconds per 640x640 image
)


def float_model(model: torch.nn.Module, input_hw: tuple[int, int], folder: Path) -> tuple[Path, dict[str, Any]]:
    """The simplified float ONNX model prepared for the QNN quantiser (``qnn_preprocess_model``), saved in
    ``folder``; with onnxsim's check."""
    import onnx  # deferred: the converters (export extra)

    preprocess = require("onnxruntime.quantization.execution_providers.qnn", SPEC.extra, "QNN quantisation")
    proto = onnx_export.export_float(model, input_hw, False, OPSET)
    simplified = onnx_export.simplify(proto, input_hw)
    checks = {"onnxsim_max_abs_diff": onnx_export.max_output_diff(proto, simplified, input_hw),
              "nodes_before_simplify": len(proto.graph.node), "nodes": len(simplified.graph.node)}
    if checks["onnxsim_max_abs_diff"] > 1e-3:
        raise EdgefaceError(f"onnxsim changed the model's outputs by {checks['onnxsim_max_abs_diff']:.2e}")
    # onnxsim's bookkeeping in metadata_props makes qnn_preprocess_model fail (onnxruntime 1.31: "cannot convert
    # dictionary update sequence element #0 to a sequence"); a deployed model does not need it.
    del simplified.metadata_props[:]
    # Constant nodes become initializers: the QNN config quantises every op type present, Constant included, so
    # the FPN Resize's scales [1, 1, 2, 2] would become a uint8 activation (1.0 -> 0.996: a runtime that computes
    # the output shape from the scales makes 63 channels of 64; onnxruntime's CPU EP then fails).
    for node in [n for n in simplified.graph.node if n.op_type == "Constant"]:
        value = next(a for a in node.attribute if a.name == "value")
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value.t)
        tensor.name = node.output[0]
        simplified.graph.initializer.append(tensor)
        simplified.graph.node.remove(node)
    checks["constants_to_initializers"] = True
    src, prepared = folder / "float.onnx", folder / "prepared.onnx"
    onnx.save(simplified, src)
    try:
        changed = preprocess.qnn_preprocess_model(str(src), str(prepared))
    except Exception as exc:  # onnxruntime's graph fusions: ValueError, onnx errors
        raise EdgefaceError(f"onnxruntime's QNN pre-processing failed on the model: {first_line(exc)}") from None
    if changed:
        src = prepared
        checks["qnn_preprocess"] = "changed the graph"
    else:
        checks["qnn_preprocess"] = "no change needed"
    return src, checks


def int16_tensors(src: Path, selectors: list[str] | tuple[str, ...]) -> list[str]:
    """The activation tensors of the float model ``src`` that ``selectors`` name: "heads" (the output heads, as
    :func:`edgeface.export.onnx.head_nodes` finds them), "input" (the graph input) or node-name prefixes
    ("/body/stage1/"). Raises :class:`EdgefaceError` for a selector that names nothing."""
    import onnx  # deferred: the converters (export extra)

    proto = onnx.load(src)
    heads = set(onnx_export.head_nodes(proto))
    chosen: list[str] = []
    for selector in selectors:
        if selector == "input":
            found = [i.name for i in proto.graph.input]
        else:
            found = [out for n in proto.graph.node if n.op_type not in ("Constant", "Shape")
                     and (n.name in heads if selector == "heads" else n.name.startswith(selector))
                     for out in n.output]
        if not found:
            raise EdgefaceError(f"int16_activations: {selector!r} names no node of the model (give 'heads', 'input' "
                                "or a node-name prefix such as '/body/stage1/')")
        chosen += [t for t in found if t not in chosen]
    return chosen


def quantize(src: Path, dst: Path, calibration: tuple[np.ndarray, ...], *, activation_bits: int = 8,
             method: str = "minmax", per_channel: bool = True, percentile: float = DEFAULT_PERCENTILE,
             int16_activations: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Static QDQ quantisation of the float model ``src`` into ``dst`` with the QNN EP's configuration
    (``get_qnn_qdq_config``), calibrated on ``calibration`` (pre-processed float32 NCHW images).
    ``int16_activations`` (selectors of :func:`int16_tensors`) quantises those activations to uint16 in an 8-bit
    graph: the QNN config inserts the conversions, which the HTP runs too. Returns the calibration record for the
    manifest."""
    quantization = require("onnxruntime.quantization", SPEC.extra, "QNN quantisation")
    qnn = require("onnxruntime.quantization.execution_providers.qnn", SPEC.extra, "QNN quantisation")
    methods = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
               "percentile": quantization.CalibrationMethod.Percentile}
    activation_type = quantization.QuantType.QUInt16 if activation_bits == 16 else quantization.QuantType.QUInt8
    # The HTP takes per-channel weights as signed symmetric int8; per-tensor weights as uint8 (QNN's default).
    weight_type = quantization.QuantType.QInt8 if per_channel else quantization.QuantType.QUInt8
    wide = int16_tensors(src, int16_activations) if activation_bits == 8 and int16_activations else []
    overrides = {name: [{"quant_type": quantization.QuantType.QUInt16}] for name in wide}
    reader = onnx_export.CalibrationReader(calibration)
    config = qnn.get_qnn_qdq_config(str(src), reader, calibrate_method=methods[method],
                                    activation_type=activation_type, weight_type=weight_type,
                                    per_channel=per_channel, init_overrides=overrides or None)
    if method == "percentile":
        config.extra_options["CalibPercentile"] = percentile
    quantization.quantize(str(src), str(dst), config)
    info = {"variant": VARIANTS[activation_bits], "method": method, "images": len(calibration), "format": "QDQ",
            "activations": f"uint{activation_bits} asymmetric per-tensor",
            "weights": "int8 per-channel symmetric" if per_channel else "uint8 per-tensor asymmetric",
            "nodes_kept_float": [],
            "int16_activations": list(int16_activations) if wide else [], "int16_tensors": len(wide),
            "tool": "onnxruntime.quantization.quantize with execution_providers.qnn.get_qnn_qdq_config"}
    if method == "percentile":
        info["percentile"] = percentile
    return info


def placement(path: Path, soc: dict[str, Any], allow_fallback: bool) -> dict[str, Any]:
    """Where the QNN EP puts each node of ``path``: counted on a session with CPU fallback allowed and the node
    assignment recorded; then, with no node on the CPU, proven by a session with fallback disabled.

    Returns ``{"npu_nodes", "total_nodes", "npu_share", "cpu_fallback": ["OpType name", ...], ...}``; raises
    :class:`EdgefaceError` naming the CPU nodes unless ``allow_fallback``."""
    session = qnn_session(path, soc=soc, allow_fallback=True,
                          config={"session.record_ep_graph_assignment_info": "1"})
    placed = assignment(session)
    del session
    on_npu = len(placed.get(EP_NAME, []))
    cpu = [f"{op} {name}" for ep, nodes in placed.items() if ep != EP_NAME for op, name in nodes]
    total = on_npu + len(cpu)
    record: dict[str, Any] = {"npu_nodes": on_npu, "total_nodes": total,
                              "npu_share": round(on_npu / total, 4) if total else 0.0, "cpu_fallback": cpu,
                              "counted_by": "onnxruntime node assignment (session.record_ep_graph_assignment_info)"}
    if cpu and not allow_fallback:
        raise EdgefaceError(f"{len(cpu)} of {total} nodes would run on the CPU, not the NPU: "
                            f"{', '.join(cpu[:8])}{' ...' if len(cpu) > 8 else ''}; pass options "
                            "{'allow_fallback': True} to export it anyway (recorded in target_info.placement)")
    if not cpu:
        qnn_session(path, soc=soc, allow_fallback=False)  # raises if any node would need the CPU
        record["fallback_disabled_load"] = "passed: every node on the HTP (session.disable_cpu_ep_fallback=1)"
    return record


def compile_context(path: Path, out: Path, soc: dict[str, Any], allow_fallback: bool) -> dict[str, Any]:
    """The QNN context binary of the QDQ model ``path`` for ``soc``, embedded in the EPContext model ``out``;
    what the manifest records of it."""
    import onnx  # deferred: the converters (export extra)

    started = time.perf_counter()
    qnn_session(path, soc=soc, allow_fallback=allow_fallback,
                config={"ep.context_enable": "1", "ep.context_file_path": str(out), "ep.context_embed_mode": "1"})
    if not out.is_file():
        raise EdgefaceError(f"the QNN execution provider wrote no context model ({out.name})")
    proto = onnx.load(out)
    contexts = [n for n in proto.graph.node if n.op_type == "EPContext"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in contexts[0].attribute} if contexts else {}
    if len(contexts) != 1 or not attributes.get("ep_cache_context"):
        raise EdgefaceError(f"the context model holds {len(contexts)} EPContext nodes, expected one with the "
                            "embedded binary")

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return {"file": out.name, "soc": soc["name"], "soc_model": soc["soc_model"], "htp_arch": soc["htp_arch"],
            "embed_mode": int(attributes.get("embed_mode", 1)), "binary_bytes": len(attributes["ep_cache_context"]),
            "qnn_sdk": text(attributes.get("ep_sdk_version", "")), "other_nodes": len(proto.graph.node) - 1,
            "compile_seconds": round(time.perf_counter() - started, 1)}


def check_context(model: Path, context: Path, soc: dict[str, Any], allow_fallback: bool, image: np.ndarray
                  ) -> dict[str, Any]:
    """The context binary's outputs against the QDQ model's, both on the HTP, on one real pre-processed image."""
    outputs = []
    for path in (model, context):
        session = qnn_session(path, soc=soc, allow_fallback=allow_fallback)
        try:
            outputs.append(session.run(list(OUTPUTS), {"input": image}))
        except Exception as exc:  # onnxruntime's Fail / RuntimeException from the HTP backend
            raise EdgefaceError(f"the QNN execution provider could not run {path.name}: {first_line(exc)}") from None
        del session
    diff = {name: float(np.abs(a - b).max()) for name, a, b in zip(OUTPUTS, *outputs)}
    # The same compiled graph: any difference means the binary is not the model it claims to be.
    if max(diff.values()) > 1e-3:
        raise EdgefaceError(f"the QNN context binary's outputs differ from the QDQ model's on the HTP by "
                            f"{max(diff.values()):.3g}")
    return {"max_abs_diff_vs_model": diff, "image": "the first calibration image"}


def _percentile(value: Any, method: str) -> float:
    """The ``percentile`` option: only with method percentile, a number in (90, 100]."""
    if value is None:
        return DEFAULT_PERCENTILE
    if method != "percentile":
        raise EdgefaceError(f"option 'percentile' is for method 'percentile', not {method!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 90 < value <= 100:
        raise EdgefaceError(f"option 'percentile' {value!r}: give a number above 90 and at most 100 (default "
                            f"{DEFAULT_PERCENTILE})")
    return float(value)


def convert(model: torch.nn.Module, out_dir: Path, request: ExportRequest) -> Conversion:
    import onnx  # deferred: the converters (export extra)

    require("onnxruntime_qnn", SPEC.extra, "The qnn target (the QNN execution provider compiles and checks it)")
    options = request.options
    soc_name = options.get("soc_model", DEFAULT_SOC)
    soc = {"name": soc_name, "soc_model": SOCS[soc_name][0], "htp_arch": SOCS[soc_name][1]}
    bits = int(options.get("activation_bits", 8))
    allow_fallback = options.get("allow_fallback", False)  # a boolean: checked against the option's choices
    method = options.get("method", "minmax")
    percentile = _percentile(options.get("percentile"), method)
    wide = options.get("int16_activations", INT16_ACTIVATIONS)
    wide = (wide,) if isinstance(wide, str) else tuple(wide or ())
    if request.input_hw is None:  # the pipeline refuses --dynamic for a static-only target first
        raise EdgefaceError(f"the qnn target takes fixed sizes only: {SPEC.static_only}")
    with tempfile.TemporaryDirectory(prefix="edgeface-qnn-") as tmp:
        src, checks = float_model(model, request.input_hw, Path(tmp))
        try:
            calibration = quantize(src, out_dir / MODEL_FILE, request.calibration, activation_bits=bits,
                                   method=method, per_channel=options.get("per_channel", True),
                                   percentile=percentile, int16_activations=wide)
        except EdgefaceError:
            raise
        except Exception as exc:  # onnxruntime's quantiser: ValueError, RuntimeError, onnx errors
            raise EdgefaceError(f"onnxruntime could not quantise the model for QNN: {first_line(exc)}") from None
    calibration["source"] = request.calibration_source
    proto = onnx.load(out_dir / MODEL_FILE)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError
        raise EdgefaceError(f"the quantised QNN model is not valid ONNX: {first_line(exc)}") from None
    operators = sorted({n.op_type for n in proto.graph.node})
    where = placement(out_dir / MODEL_FILE, soc, allow_fallback)
    context = compile_context(out_dir / MODEL_FILE, out_dir / CONTEXT_FILE, soc, allow_fallback)
    if request.verify:
        context["check"] = check_context(out_dir / MODEL_FILE, out_dir / CONTEXT_FILE, soc, allow_fallback,
                                         request.calibration[0])
    notes = [f"{VARIANTS[bits]} QDQ model for the Hexagon NPU; {CONTEXT_FILE} is its QNN context binary for "
             f"{soc_name} (HTP v{soc['htp_arch']}): on another SoC run model.onnx (compiled on load) or re-export "
             "with --soc-model.",
             "Verified here on the x86-64 HTP simulator of onnxruntime-qnn (numerically the HTP; its latency is not "
             "the device's)."]
    if where["cpu_fallback"]:
        notes.append(f"{len(where['cpu_fallback'])} nodes run on the CPU (allow_fallback): see "
                     "target_info.placement.")
    return Conversion(
        files={"model": MODEL_FILE, "context": CONTEXT_FILE},
        calibration=calibration,
        converter={"exporter": "torch.onnx.export (TorchScript)", "opset": OPSET, "simplifier": "onnxsim",
                   "quantizer": "onnxruntime.quantization (QNN QDQ config)", "checks": checks,
                   "versions": library_versions(*SPEC.libraries)},
        notes=notes,
        extra={"backend": "HTP", "soc": soc, "variant": VARIANTS[bits], "placement": where, "context": context,
               "onnx_operators": operators, "allow_fallback": allow_fallback},
    )
