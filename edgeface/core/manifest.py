"""The bundle manifest (``manifest.json``): its dataclasses, its versioned JSON schema and the rules that tie its
fields together, and the manifest of a model as a target runs it. A runtime learns everything it needs (input
layout, colour order, mean, sizes, output names, anchors, decode rules) from the manifest; nothing is guessed from
tensor shapes. Reading bundles from disk and publishing them: :mod:`edgeface.core.bundle`.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.face import LANDMARK_NAMES
from edgeface.core.processing import INPUT_MULTIPLE, AnchorSpec

SCHEMA = "edgeface.bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# The raw outputs every runtime returns, by these names, in this order (a manifest maps them to its tensors).
OUTPUTS = ("loc", "conf", "landmarks")
# Values per prior of each output (its last dimension): box offsets, two class scores, five (x, y) landmarks.
OUTPUT_COLUMNS = {"loc": 4, "conf": 2, "landmarks": 10}
OUTPUT_MEANINGS = {
    "loc": "box offsets per prior (dx, dy, dw, dh) in the SSD coding with variance; decode with the anchors",
    "conf": "per prior [background, face] probabilities (softmax applied in the graph)",
    "landmarks": "per prior 5 landmark offsets (x, y) in LANDMARK order, coded like the box centre",
}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # float32 | float16 | int8 | uint8
    shape: list[int | str]  # ints, or names of dynamic dimensions
    layout: str = ""  # NCHW / NHWC for the input, "N,A,k" for outputs
    meaning: str = ""
    # Affine quantisation of an integer tensor: real = scale * (q - zero_point)
    quantization: dict[str, float] | None = None


@dataclass
class Manifest:
    """Everything about one exported model. ``to_dict`` is what ``manifest.json`` holds (documented in
    docs/bundle.md)."""

    target: str
    precision: str
    files: dict[str, str]  # role -> file name in the bundle ("model", ...)
    model: dict[str, Any]  # name, config (RetinaFaceConfig.to_dict), weights provenance
    input: TensorSpec
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]  # colour order, mean, std, where the mean is applied, resize policy, padding
    decode: dict[str, Any]  # anchors, variance, landmark order, what is in the graph, default thresholds
    dynamic: dict[str, list[int]] | None = None  # dimension name -> [min, opt, max]
    calibration: dict[str, Any] | None = None
    converter: dict[str, Any] = field(default_factory=dict)  # tool names and library versions
    parity: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    target_info: dict[str, Any] = field(default_factory=dict)  # target-specific facts (e.g. TensorRT build)
    notes: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)  # every file of the bundle but the manifest
    export_seconds: float | None = None
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """From a manifest validated by :func:`read_manifest`."""
        data = dict(data)
        data["input"] = TensorSpec(**data["input"])
        data["outputs"] = [TensorSpec(**o) for o in data["outputs"]]
        return cls(**data)

    @property
    def anchors(self):
        a = self.decode["anchors"]
        return AnchorSpec(tuple(tuple(s) for s in a["min_sizes"]), tuple(a["steps"]), tuple(a["variance"]))

    @property
    def mean_bgr(self) -> tuple[float, float, float]:
        """What the shared pre-processing subtracts (zeros when the model does it itself)."""
        if self.preprocessing.get("mean_in_graph"):
            return (0.0, 0.0, 0.0)
        return tuple(self.preprocessing["mean_bgr"])


def standard_decode(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "in_graph": False,
        "softmax_in_graph": True,
        "anchors": config["anchors"],
        "prior_order": "level (stride ascending), row, column, min size",
        "prior_format": "cx, cy, w, h normalised by the input width/height; grid ceil(H/step) x ceil(W/step), "
                        "centres at (j + 0.5) * step / W, (i + 0.5) * step / H",
        "box_decode": "cx = pcx + loc0 * v0 * pw; cy = pcy + loc1 * v0 * ph; w = pw * exp(loc2 * v1); "
                      "h = ph * exp(loc3 * v1); corners = centre -/+ size / 2; times input W, H; divided by scale",
        "landmark_decode": "x_k = pcx + ldm[2k] * v0 * pw; y_k = pcy + ldm[2k+1] * v0 * ph",
        "landmark_order": list(LANDMARK_NAMES),
        "score": "conf[:, 1]",
        "defaults": {"score_threshold": 0.5, "nms_iou": 0.4, "top_k": 5000, "keep_top_k": 750,
                     "nms_area": "pixel-inclusive (x2 - x1 + 1) * (y2 - y1 + 1)"},
    }



# A manifest is a few KB; anything far larger is not one (and would cost memory to parse).
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB
# The files of each target's bundle by role (``files`` in the manifest), with the suffix each must have: "model" is
# required, the others optional (a tensorrt engine is added on the device by `edgeface build-engine`). A manifest
# naming another kind of file, or a role its target does not have, is refused.
BUNDLE_FILES = {
    "onnx": {"model": ".onnx", "end2end": ".onnx"},  # the network; the same with decode + NMS (--end2end)
    "tensorrt": {"model": ".onnx", "engine": ".engine"},
    "tflite": {"model": ".tflite"},
    "coreml": {"model": ".mlpackage"},
    "openvino": {"model": ".xml", "weights": ".bin", "end2end": ".xml", "end2end_weights": ".bin"},  # OpenVINO IR
    "ncnn": {"model": ".param", "weights": ".bin"},
    "executorch": {"model": ".pte"},
    "qnn": {"model": ".onnx", "context": ".onnx"},  # QDQ ONNX; the ahead-of-time QNN context binary (EPContext)
    "rknn": {"model": ".rknn"},
}
MODEL_SUFFIX = {target: files["model"] for target, files in BUNDLE_FILES.items()}
# Optional part of a bundle: may be removed without making the bundle refuse to load.
OPTIONAL_PREFIX = "parity/"
# Element types that carry an affine quantisation (scale, zero_point), with the range of their values; float
# tensors never carry one.
INTEGER_DTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}
# The TensorRT builder flags of each precision, as the export writes them and build-engine sets them.
TENSORRT_BUILDER_FLAGS = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}


@functools.lru_cache(maxsize=1)
def _schema_validator():
    schema = json.loads((resources.files("edgeface.core") / "schemas" / f"manifest-v{SCHEMA_VERSION}.schema.json")
                        .read_text())
    return jsonschema.Draft202012Validator(schema)


def _field(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _NotFinite:
    """A JSON number beyond a 64-bit float (``1e400`` parses as infinity): kept as its text, so that the field
    holding it can be named."""

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> float | _NotFinite:
    value = float(text)
    return value if math.isfinite(value) else _NotFinite(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _not_finite(data: Any) -> tuple[list, str] | None:
    """The path and text of the first number in ``data`` that is not a finite float (walked without recursion:
    a manifest may be nested as deeply as the JSON parser allows)."""
    stack: list[tuple[list, Any]] = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NotFinite):
            return path, value.text
        if isinstance(value, dict):
            stack.extend((path + [k], v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((path + [i], v) for i, v in reversed(list(enumerate(value))))
    return None


def read_manifest(manifest_file: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` against its versioned JSON schema
    (``edgeface/core/schemas/manifest-v1.schema.json``) and the rules that tie its fields together.

    Raises :class:`EdgefaceError` naming the first offending field and what was expected.
    """
    where = f"{manifest_file}"
    if manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgefaceError(f"{where} is {manifest_file.stat().st_size} bytes, not an edgeface manifest (at most "
                            f"{MAX_MANIFEST_BYTES} bytes, 1 MiB); re-export the bundle")
    try:
        data = json.loads(manifest_file.read_bytes().decode("utf-8"), parse_float=_parse_float,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)[:120]
        raise EdgefaceError(f"{where} is not valid JSON ({reason}); re-export the bundle") from None
    huge = _not_finite(data)
    if huge is not None:
        path, text = huge
        raise EdgefaceError(f"{where}: field {_field(path)} is {text[:40]}, which is not a finite number (beyond "
                            "the range of a 64-bit float); re-export the bundle")
    return validate_manifest(data, where)


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """``data`` (a parsed ``manifest.json``) checked against the versioned JSON schema and the rules that tie its
    fields together; returned unchanged. ``where`` names it in errors.

    Raises :class:`EdgefaceError` naming the first offending field and what was expected.
    """
    if not isinstance(data, dict):
        raise EdgefaceError(f"{where} holds a JSON {type(data).__name__}, expected an object; re-export the bundle")
    if data.get("schema") != SCHEMA:
        raise EdgefaceError(f"{where} is not an edgeface bundle manifest (schema {_short(data.get('schema'))}, "
                            f"expected {SCHEMA!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise EdgefaceError(
            f"{where}: schema version {_short(data.get('schema_version'))} is not supported by this edgeface "
            f"(supports {SCHEMA_VERSION}); re-export the bundle or upgrade edgeface")
    error = jsonschema.exceptions.best_match(_schema_validator().iter_errors(data))
    if error is not None:
        if error.validator in ("pattern", "type", "const", "enum") and "description" in error.schema:
            expected = f"{_short(error.instance)}, expected {error.schema['description']}"
        else:
            expected = error.message if len(error.message) <= 160 else _expectation(error)
        raise EdgefaceError(f"{where}: field {_field(error.absolute_path)} is invalid: {expected}; "
                            "re-export the bundle")
    problem = _inconsistency(data)
    if problem:
        raise EdgefaceError(f"{where}: {problem}; re-export the bundle")
    return data


def _expectation(error) -> str:
    keyword, value = error.validator, error.validator_value
    return f"{_short(error.instance)} fails {keyword!r} {_short(value)}"


def _inconsistency(m: dict[str, Any]) -> str | None:
    """The rules a schema cannot state: fields that must agree with each other."""
    return (_output_problem(m) or _quantization_problem(m) or _shape_problem(m) or _dynamic_problem(m)
            or _decode_problem(m) or _files_problem(m) or _target_info_problem(m))


def _output_problem(m: dict[str, Any]) -> str | None:
    names = [o["name"] for o in m["outputs"]]
    if sorted(names) != sorted(OUTPUT_MEANINGS):
        return f"field outputs names {names}, expected loc, conf and landmarks once each"
    for index, out in enumerate(m["outputs"]):
        k = OUTPUT_COLUMNS[out["name"]]
        if out["shape"][2] != k:
            return f"field outputs[{index}].shape[2] is {_short(out['shape'][2])}, expected {k} for {out['name']}"
    return None


def _quantization_problem(m: dict[str, Any]) -> str | None:
    """Integer tensors need their scale and zero point, with the zero point a value of the type (that float
    tensors carry none is in the schema)."""
    for index, spec in enumerate([m["input"], *m["outputs"]]):
        field = "input" if index == 0 else f"outputs[{index - 1}]"
        quantization, dtype = spec.get("quantization"), spec["dtype"]
        if dtype in INTEGER_DTYPES and not quantization:
            return f"field {field}.quantization is missing, expected scale and zero_point for a {dtype} tensor"
        if quantization and dtype in INTEGER_DTYPES:
            low, high = INTEGER_DTYPES[dtype]
            if not low <= quantization["zero_point"] <= high:
                return (f"field {field}.quantization.zero_point {quantization['zero_point']} is outside the {dtype} "
                        f"range {low}..{high}")
    return None


def _input_dims(m: dict[str, Any]) -> dict[str, int | str]:
    """The input's batch, channels, height and width, read where ``layout`` puts them."""
    shape, layout = m["input"]["shape"], m["input"]["layout"]
    n, c, h, w = shape if layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
    return {"batch": n, "channels": c, "height": h, "width": w}


def _shape_problem(m: dict[str, Any]) -> str | None:
    """Channels, dimension names and the resize policy where the layout puts them; outputs of the input's batch
    with one row per prior."""

    shape, layout = m["input"]["shape"], m["input"]["layout"]
    dims = _input_dims(m)
    if dims["channels"] != 3:
        return (f"field input.shape {shape} has {_short(dims['channels'])} channels where layout {layout} puts them, "
                "expected 3")
    for dim in ("batch", "height", "width"):
        if isinstance(dims[dim], str) and dims[dim] != dim:
            index = {"NCHW": {"batch": 0, "height": 2, "width": 3}, "NHWC": {"batch": 0, "height": 1, "width": 2}}
            return (f"field input.shape[{index[layout][dim]}] is {dims[dim]!r} where layout {layout} puts the {dim}, "
                    f"expected an integer or {dim!r}")
    h, w = dims["height"], dims["width"]
    resize = m["preprocessing"]["resize"]
    if resize.startswith("fixed:"):
        fixed = [int(v) for v in resize[6:].split("x")]
        if [h, w] != fixed:
            return f"field preprocessing.resize {resize!r} does not match input.shape {shape} ({layout})"
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
            return (f"field preprocessing.resize {resize!r}: a fixed input size is a multiple of {INPUT_MULTIPLE} on "
                    "both sides (the largest anchor step)")
    elif isinstance(h, int) or isinstance(w, int):
        return f"field preprocessing.resize 'original' needs dynamic height and width, but input.shape is {shape}"
    a = m["decode"]["anchors"]
    static = isinstance(h, int) and isinstance(w, int)
    if static and len(a["steps"]) == len(a["min_sizes"]):
        priors: int | str = AnchorSpec(tuple(tuple(s) for s in a["min_sizes"]), tuple(a["steps"]),
                                       tuple(a["variance"])).num_priors((h, w))
    else:
        priors = "priors" if not static else None
    for index, out in enumerate(m["outputs"]):
        if out["shape"][0] != dims["batch"]:
            return (f"field outputs[{index}].shape[0] is {_short(out['shape'][0])}, expected the input's batch "
                    f"{_short(dims['batch'])}")
        if priors is not None and out["shape"][1] != priors:
            what = (f"{priors} (the priors of a {h}x{w} input)" if isinstance(priors, int)
                    else "'priors' (the input size is dynamic)")
            return f"field outputs[{index}].shape[1] is {_short(out['shape'][1])}, expected {what}"
    return None


def _dynamic_problem(m: dict[str, Any]) -> str | None:
    """``dynamic`` gives a [min, opt, max] range for exactly the input dimensions that are named, not numbers."""
    dims = _input_dims(m)
    dynamic = m.get("dynamic") or {}
    for dim in ("batch", "height", "width"):
        named = isinstance(dims[dim], str)
        if named and dim not in dynamic:
            return f"field input.shape gives the {dim} as {dims[dim]!r}, but dynamic has no {dim} range"
        if not named and dim in dynamic:
            return (f"field dynamic.{dim} is a range, but input.shape fixes the {dim} at {dims[dim]}: give "
                    f"{dim!r} in input.shape or remove dynamic.{dim}")
    for dim, (low, opt, high) in dynamic.items():
        if not low <= opt <= high:
            return f"field dynamic.{dim} {[low, opt, high]} is not [min, opt, max] with min <= opt <= max"
    return None


def _decode_problem(m: dict[str, Any]) -> str | None:
    anchors = m["decode"]["anchors"]
    if len(anchors["steps"]) != len(anchors["min_sizes"]):
        return (f"field decode.anchors.steps has {len(anchors['steps'])} levels but min_sizes has "
                f"{len(anchors['min_sizes'])}")
    image_input = m["target"] == "coreml" and m.get("target_info", {}).get("input_type") == "image"
    if m["preprocessing"]["mean_in_graph"] != image_input:
        if image_input:
            return ("field preprocessing.mean_in_graph is false, but target_info.input_type is 'image': a Core ML "
                    "image input subtracts the mean in the model")
        return (f"field preprocessing.mean_in_graph is true, but only Core ML image inputs (target coreml, "
                f"target_info.input_type 'image') subtract the mean in the model; the model of this {m['target']} "
                "bundle takes the mean-subtracted input")
    return None


def _files_problem(m: dict[str, Any]) -> str | None:
    roles = BUNDLE_FILES[m["target"]]
    for role, relative in m["files"].items():
        suffix = roles.get(role)
        if suffix is None:
            owners = sorted(t for t, files in BUNDLE_FILES.items() if role in files)
            return f"field files.{role}: a {m['target']} bundle has no {role} file (only {', '.join(owners)} bundles)"
        if not relative.endswith(suffix) or relative.startswith(OPTIONAL_PREFIX):
            return f"field files.{role} {relative!r} is not the {role} file of a {m['target']} bundle (*{suffix})"
    if ("end2end" in m["files"]) != ("end2end" in (m.get("target_info") or {})):
        return "fields files.end2end and target_info.end2end must come together (the end-to-end model and its I/O)"
    if "end2end_weights" in roles and ("end2end" in m["files"]) != ("end2end_weights" in m["files"]):
        return "fields files.end2end and files.end2end_weights must come together (the end-to-end IR and its weights)"
    if "end2end" in m["files"] and m["target_info"]["end2end"]["input_hw"] != m["input"]["shape"][2:4]:
        return (f"field target_info.end2end.input_hw {m['target_info']['end2end']['input_hw']} is not the input's "
                f"size {m['input']['shape'][2:4]}")
    return None


def _target_info_problem(m: dict[str, Any]) -> str | None:
    """What ``target_info`` states about the model against the input and outputs it describes."""
    info = m.get("target_info") or {}
    if m["target"] == "tflite":
        return _tflite_problem(m, info)
    if m["target"] == "coreml":
        return _coreml_problem(m, info)
    if m["target"] == "tensorrt":
        return _tensorrt_problem(m, info)
    if m["target"] == "executorch":
        return _executorch_problem(m, info)
    if m["target"] == "qnn":
        return _qnn_problem(m, info)
    if m["target"] == "rknn":
        return _rknn_problem(m, info)
    return None


def _rknn_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The runtime feeds float32 NHWC and reads the outputs in ``output_order``; the NPU share is what the operator
    counts say, every operator off the NPU named."""
    if m["input"]["layout"] != "NHWC" or m["input"]["dtype"] != "float32":
        return (f"field input is {m['input']['dtype']} {m['input']['layout']}, but an rknn bundle's runtime feeds "
                "float32 NHWC")
    if sorted(info["output_order"]) != sorted(OUTPUTS):
        return f"field target_info.output_order {info['output_order']}, expected loc, conf and landmarks once each"
    return _placement_problem(info["placement"])


def _placement_problem(place: dict[str, Any]) -> str | None:
    """An NPU target's ``target_info.placement``: the share is what the counts say, and every node (operator) off
    the NPU is named in ``cpu_fallback``."""
    if place["npu_nodes"] > place["total_nodes"]:
        return f"field target_info.placement.npu_nodes {place['npu_nodes']} exceeds total_nodes {place['total_nodes']}"
    share = place["npu_nodes"] / place["total_nodes"]
    if abs(place["npu_share"] - share) > 1e-3:
        return f"field target_info.placement.npu_share {place['npu_share']}, expected {share:.4f} (npu / total nodes)"
    if len(place["cpu_fallback"]) != place["total_nodes"] - place["npu_nodes"]:
        return (f"field target_info.placement.cpu_fallback names {len(place['cpu_fallback'])} nodes, but "
                f"{place['total_nodes'] - place['npu_nodes']} are not on the NPU")
    return None


def _qnn_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The NPU share is what the node counts say, every node off the NPU is named, and a context file is the one
    target_info.context describes, compiled for target_info.soc."""
    problem = _placement_problem(info["placement"])
    if problem:
        return problem
    context = info.get("context")
    if ("context" in m["files"]) != (context is not None):
        return "field target_info.context and files.context must be given together (the QNN context binary)"
    if context is not None:
        if context["file"] != m["files"]["context"]:
            return f"field target_info.context.file {context['file']!r} is not files.context {m['files']['context']!r}"
        soc = info["soc"]
        if [context["soc"], context["soc_model"], context["htp_arch"]] != [soc["name"], soc["soc_model"],
                                                                           soc["htp_arch"]]:
            return (f"field target_info.context was compiled for {context['soc']} (soc_model {context['soc_model']}, "
                    f"v{context['htp_arch']}), not target_info.soc {soc}")
    return None


def _executorch_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    """A .pte's outputs are positional: each position bound once, and the program's stated tensors (its largest
    shapes, for a dynamic program) agreeing with the input and outputs the manifest describes."""
    positions = info["output_positions"]
    if sorted(positions.values()) != [0, 1, 2]:
        return f"field target_info.output_positions {positions}, expected positions 0, 1 and 2 once each"
    meta = info.get("method_meta")
    if not meta:
        return None
    dims, dynamic = _input_dims(m), m.get("dynamic") or {}
    largest = {d: dynamic[d][2] if isinstance(dims[d], str) and d in dynamic else dims[d]
               for d in ("batch", "height", "width")}
    expected = [largest["batch"], 3, largest["height"], largest["width"]]
    inputs = meta["inputs"]
    if len(inputs) != 1 or inputs[0]["sizes"] != expected:
        return (f"field target_info.method_meta.inputs {_short(inputs)} differs from input.shape {m['input']['shape']} "
                f"(largest {expected})")
    outputs = meta["outputs"]
    if len(outputs) != 3:
        return f"field target_info.method_meta.outputs has {len(outputs)} tensors, expected 3"
    for out in m["outputs"]:
        stated = outputs[positions[out["name"]]]["sizes"]
        if len(stated) != 3 or stated[2] != out["shape"][2] or (isinstance(out["shape"][1], int)
                                                                and stated[1] != out["shape"][1]):
            return (f"field target_info.method_meta.outputs[{positions[out['name']]}] {stated} is not output "
                    f"{out['name']!r} {out['shape']} (target_info.output_positions.{out['name']})")
    return None


def _tflite_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    tensors = [("input_tensor", m["input"], info["input_tensor"])]
    tensors += [(f"output_tensors.{o['name']}", o, info["output_tensors"][o["name"]]) for o in m["outputs"]]
    for where, spec, tensor in tensors:
        for key in ("dtype", "shape", "quantization"):
            if tensor.get(key) != spec.get(key):
                of = "input" if where == "input_tensor" else f"output {spec['name']!r}"
                return (f"field target_info.{where}.{key} {_short(tensor.get(key))} differs from the {of}'s "
                        f"{key} {_short(spec.get(key))}")
    if info["input_tensor"]["position"] != 0:
        return f"field target_info.input_tensor.position is {info['input_tensor']['position']}, expected 0"
    outputs = info["output_tensors"].values()
    if sorted(t["position"] for t in outputs) != [0, 1, 2]:
        return ("field target_info.output_tensors positions are "
                f"{[t['position'] for t in outputs]}, expected 0, 1 and 2 once each")
    if len({t["index"] for t in outputs} | {info["input_tensor"]["index"]}) != 4:
        return "field target_info.output_tensors: two tensors share one index"
    return None


def _coreml_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    dims = _input_dims(m)
    size = [dims["height"], dims["width"]]
    if info["input_size"] != size:
        return f"field target_info.input_size {info['input_size']} differs from input.shape's height, width {size}"
    if "enumerated_sizes" in info and size not in info["enumerated_sizes"]:
        return f"field target_info.enumerated_sizes {info['enumerated_sizes']} lacks the input size {size}"
    if info["input_type"] == "image":
        bias = [-v for v in m["preprocessing"]["mean_bgr"]]
        if "bias" in info and any(abs(a - b) > 1e-6 for a, b in zip(info["bias"], bias)):
            return (f"field target_info.bias {info['bias']} is not minus preprocessing.mean_bgr "
                    f"{m['preprocessing']['mean_bgr']}: the model and the pre-processing would disagree on the mean")
    elif "shape" in info and info["shape"] != m["input"]["shape"]:
        return f"field target_info.shape {info['shape']} differs from input.shape {m['input']['shape']}"
    for out in m["outputs"]:
        declared = info.get("outputs", {}).get(out["name"])
        if declared is not None and declared != out["shape"]:
            return f"field target_info.outputs.{out['name']} {declared} differs from its output's shape {out['shape']}"
    return None


def _tensorrt_problem(m: dict[str, Any], info: dict[str, Any]) -> str | None:
    build = info["build"]
    if build["precision"] != m["precision"]:
        return f"field target_info.build.precision {build['precision']!r} differs from precision {m['precision']!r}"
    flags = TENSORRT_BUILDER_FLAGS[m["precision"]]
    if build["builder_flags"] != flags:
        return f"field target_info.build.builder_flags {build['builder_flags']}, expected {flags} for {m['precision']}"
    dims, dynamic, layout = _input_dims(m), m.get("dynamic") or {}, m["input"]["layout"]
    for i, key in enumerate(("min", "opt", "max")):
        value = {d: dynamic[d][i] if isinstance(dims[d], str) else dims[d] for d in ("batch", "height", "width")}
        expected = ([value["batch"], 3, value["height"], value["width"]] if layout == "NCHW"
                    else [value["batch"], value["height"], value["width"], 3])
        if build["profile"][key] != expected:
            return (f"field target_info.build.profile.{key} {build['profile'][key]}, expected {expected} (input.shape "
                    f"{m['input']['shape']} with the {key} of each dynamic range)")
    if "engine" in m["files"] and "engine" not in info:
        return ("field target_info.engine is missing, but files names an engine (written by "
                "`edgeface build-engine BUNDLE`)")
    return None



def manifest_for_model(model, **options: Any) -> Manifest:
    """The manifest of ``model`` (a RetinaFace) as a target runs it: :func:`manifest_for_config` with the model's
    configuration and weights provenance; ``options`` are that function's keyword arguments."""
    return manifest_for_config(model.config, getattr(model, "weights_info", None), **options)


def manifest_for_config(
    model_config,
    weights_info: dict[str, Any] | None,
    *,
    target: str,
    precision: str,
    files: dict[str, str],
    layout: str = "NCHW",
    input_hw: tuple[int, int] | None = None,
    dynamic: dict[str, list[int]] | None = None,
    batch: int = 1,
    mean_in_graph: bool = False,
    input_dtype: str = "float32",
    input_quantization: dict[str, float] | None = None,
    output_dtypes: dict[str, str] | None = None,
    output_quantization: dict[str, dict[str, float] | None] | None = None,
    **fields: Any,
) -> Manifest:
    """:func:`manifest_for_model` from the model's configuration (a
    :class:`~edgeface.core.model_config.RetinaFaceConfig`) and weights provenance alone, without the network: what
    a device install writes for the default ONNX model (:mod:`edgeface.inference.default_bundle`).

    The input is ``layout`` (NCHW / NHWC) of ``input_dtype``, at ``input_hw`` (None: any size, ``dynamic``
    naming the free dimensions); outputs are float32 unless ``output_dtypes`` says otherwise; an integer tensor
    carries its affine quantisation (``input_quantization``, ``output_quantization`` by output name: real =
    scale * (q - zero_point)). ``fields`` are further :class:`Manifest` fields (calibration, converter,
    target_info, notes, parity, accuracy)."""
    config = model_config.to_dict()
    if input_hw is not None:
        h, w = input_hw
        priors: int | str = model_config.anchors.num_priors((h, w))
        resize = f"fixed:{h}x{w}"
    else:
        h, w, priors, resize = "height", "width", "priors", "original"
    n: int | str = "batch" if dynamic and "batch" in dynamic else batch
    shape = [n, 3, h, w] if layout == "NCHW" else [n, h, w, 3]
    dtypes, quantization = output_dtypes or {}, output_quantization or {}
    outputs = [TensorSpec(name, dtypes.get(name, "float32"), [n, priors, k], "N,A,k", OUTPUT_MEANINGS[name],
                          quantization.get(name)) for name, k in OUTPUT_COLUMNS.items()]
    return Manifest(
        target=target,
        precision=precision,
        files=files,
        model={"name": config["name"], "config": config, "weights": weights_info},
        input=TensorSpec("input", input_dtype, shape, layout, "BGR image minus mean, zero-padded bottom/right",
                         input_quantization),
        outputs=outputs,
        preprocessing={
            "color_order": "BGR",
            "mean_bgr": config["mean_bgr"],
            "std": [1.0, 1.0, 1.0],
            "mean_in_graph": mean_in_graph,
            "pixel_range": "0-255 (no scaling to 0-1)",
            "resize": resize,
            "resize_rule": "scale = min(H_in / h, W_in / w) for a fixed size (1 for 'original'); bilinear; "
                           "pad bottom/right with zeros after mean subtraction; detections / scale = pixels",
        },
        decode=standard_decode(config),
        dynamic=dynamic,
        **fields,
    )
