"""The bundle: a directory with model file(s) and ``manifest.json``, the one contract between export and every
runtime. A runtime learns everything it needs (input layout, colour order, mean, sizes, output names, anchors,
decode rules) from the manifest; nothing is guessed from tensor shapes.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema

from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.face import LANDMARK_NAMES
from edgeface.core.files import _umask, atomic_write, sha256_file
from edgeface.core.processing import INPUT_MULTIPLE, AnchorSpec

SCHEMA = "edgeface.bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# The raw outputs every runtime returns, by these names, in this order (a manifest maps them to its tensors).
OUTPUTS = ("loc", "conf", "landmarks")
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


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def model_bytes(self) -> int:
        """Size of the model file (or package directory, e.g. ``.mlpackage``): what a device has to ship."""
        path = self.file()
        return sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())

    def file(self, role: str = "model") -> Path:
        """The file of ``role`` (``model``, ``engine``): always inside the bundle (checked on load)."""
        try:
            return self.path / self.manifest.files[role]
        except KeyError:
            raise EdgefaceError(f"bundle {self.path} has no {role!r} file "
                                f"(has {sorted(self.manifest.files)})") from None


# A manifest is a few KB; anything far larger is not one (and would cost memory to parse).
MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB
# What each target's model file is; a manifest naming another kind of file is refused.
MODEL_SUFFIX = {"onnx": ".onnx", "tensorrt": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
# Files an operating system drops into folders by itself; they are not part of a bundle and are ignored.
OS_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}
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
        k = {"loc": 4, "conf": 2, "landmarks": 10}[out["name"]]
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
    model = m["files"]["model"]
    if not model.endswith(MODEL_SUFFIX[m["target"]]) or model.startswith(OPTIONAL_PREFIX):
        return (f"field files.model {model!r} is not the model file of a {m['target']} bundle "
                f"(*{MODEL_SUFFIX[m['target']]})")
    engine = m["files"].get("engine")
    if engine is not None and (m["target"] != "tensorrt" or not engine.endswith(".engine")
                               or engine.startswith(OPTIONAL_PREFIX)):
        return (f"field files.engine {engine!r}: only a tensorrt bundle has an engine file (*.engine, written by "
                "`edgeface build-engine BUNDLE`)")
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


def _inside(root: Path, relative: str, field: str) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` once symbolic links are followed."""
    path = root / relative
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise EdgefaceError(f"bundle {root}: field {field} {relative!r} points outside the bundle; re-export it")
    return path


def _bundle_files(root: Path) -> list[str]:
    """Every file in the bundle (relative, '/'-separated) but the manifest and OS litter; symbolic links that leave
    the bundle, and anything that is not a regular file (a FIFO would block the hashing), are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                _inside(root, relative, "(a symbolic link)")
            if name in filenames and relative != MANIFEST and name not in OS_LITTER:
                try:
                    regular = stat.S_ISREG(os.stat(path).st_mode)
                except OSError:  # a dangling symbolic link
                    regular = False
                if not regular:
                    raise EdgefaceError(f"bundle {root} holds {relative!r}, which is not a regular file; remove it "
                                        "or re-export the bundle")
                found.append(relative)
    return sorted(found)


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle: its manifest validated against the schema, every file it names resolved inside the bundle,
    the manifest's sha256 list covering the model and every file present, and (``verify``, the default) each
    file's sha256 checked. A publication interrupted by a crash is finished or rolled back first.

    Raises :class:`EdgefaceError` with the offending field or file.
    """
    path = Path(path)
    recover_publication(path)
    return _open_bundle(path, verify=verify)


def _open_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """:func:`load_bundle` without the recovery of an interrupted publication."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        what = "no such folder" if not path.exists() else f"no {MANIFEST}"
        raise EdgefaceError(f"{path} is not an edgeface bundle ({what}); create one with `edgeface export`")
    data = read_manifest(manifest_file)
    for role, relative in data["files"].items():
        file = _inside(path, relative, f"files.{role}")
        if not file.exists():
            raise EdgefaceError(f"bundle {path} is incomplete: {relative} (files.{role}) is missing; re-export it")
        if file.is_dir() != (relative.endswith(".mlpackage")):
            kind = "a folder" if file.is_dir() else "a file"
            raise EdgefaceError(f"bundle {path}: files.{role} {relative!r} is {kind}, which the {role} of a "
                                f"{data['target']} bundle is not; re-export it")
    hashes = data["sha256"]
    present = _bundle_files(path)
    unlisted = [f for f in present if f not in hashes]
    if unlisted:
        raise EdgefaceError(f"bundle {path} holds {unlisted[0]!r}, which its manifest does not list (sha256); a "
                            "bundle is only what its manifest hashes: remove the file or re-export the bundle")
    for role, relative in data["files"].items():
        covered = [relative] if relative in hashes else [k for k in hashes if k.startswith(relative + "/")]
        if not covered:
            raise EdgefaceError(f"bundle {path}: files.{role} {relative!r} has no sha256 in the manifest; "
                                "re-export the bundle")
    for relative, expected in hashes.items():
        file = _inside(path, relative, "sha256")
        if relative not in present:
            if relative.startswith(OPTIONAL_PREFIX) and not file.exists():
                continue  # the parity evidence is optional
            raise EdgefaceError(f"bundle {path} is incomplete: {relative} is missing; re-export it")
        if verify and sha256_file(file) != expected:
            raise EdgefaceError(f"bundle {path}: {relative} does not match the sha256 in its manifest "
                                "(modified or damaged); re-export it")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:  # a field the schema allows but this version's dataclass does not know
        raise EdgefaceError(f"{manifest_file} is not an edgeface manifest of this version ({exc})") from None
    return Bundle(path, manifest)


def hash_files(directory: Path) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in _bundle_files(directory)}


def write_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.sha256 = hash_files(directory)
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(text))


# Publishing a bundle at NAME, under a lock on the parent folder: the finished staging folder is renamed to
# .NAME.new, the previous bundle (if any) to .NAME.old, .NAME.new to NAME, and .NAME.old to a trash name
# (.NAME.trash-PID-xxxx), which is then deleted. A crash at any point leaves a state recover_publication()
# finishes (a complete bundle in .NAME.new) or rolls back (a bundle in .NAME.old and nothing at NAME); folders
# are only ever deleted under a staging or trash name, which recovery never publishes, so a crash in the middle of
# a deletion cannot leave a half-deleted folder under a name recovery trusts. Staging and trash folders of
# processes that are no longer running are removed.
def _sibling(final: Path, what: str) -> Path:
    return final.with_name(f".{final.name}.{what}")


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.staging-"


def _trash_prefix(final: Path) -> str:
    return f".{final.name}.trash-"


def _to_trash(folder: Path, final: Path) -> Path:
    """Rename ``folder`` to a fresh trash name beside ``final`` (to be deleted by the caller, or by the recovery
    of a later run if this process dies first)."""
    trash = final.with_name(f"{_trash_prefix(final)}{os.getpid()}-{secrets.token_hex(4)}")
    folder.rename(trash)
    return trash


# flock() on a file system without it (some network and FUSE file systems): publication goes on unlocked.
_NO_LOCKS = {getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP", "ENOLCK") if hasattr(errno, name)}


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise publication and recovery in one folder between processes: flock where the system and the file
    system have it; elsewhere (Windows, a file system without locks, a folder that cannot be opened for reading)
    the block runs without the lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders
        fcntl = None
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except PermissionError:
            fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            fd = None
            if exc.errno not in _NO_LOCKS:
                raise
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _warn(message: str) -> None:
    print(f"edgeface: warning: {message}", file=sys.stderr)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return first_line(exc)


def recover_publication(final: str | os.PathLike, *, strict: bool = False) -> None:
    """Finish or roll back a publication of ``final`` that a crash interrupted, and remove the staging and trash
    folders of processes that are no longer running. Costs one listing of the parent folder when there is
    nothing to do.

    Nothing but a previous edgeface bundle at ``final`` is ever replaced, and ``.NAME.new`` / ``.NAME.old`` are
    only published, restored or deleted when they hold what a publication puts there (see
    :func:`_not_replaceable`); what is left alone is said in one line. A failure (an unreadable or read-only
    folder) never raises a traceback: with ``strict`` it raises :class:`EdgefaceError` in one line, else it is
    reported as a warning on stderr and loading goes on with what is there.
    """
    final = Path(os.path.abspath(final))
    try:
        left = _recover(final)
    except (OSError, ValueError, EdgefaceError) as exc:
        message = f"could not finish or roll back an interrupted publication of {final} ({_reason(exc)})"
        if strict:
            raise EdgefaceError(f"{message}; fix the folder's permissions or choose another --out") from None
        _warn(message)
        return
    if left:
        _warn("; ".join(left))


def _recover(final: Path) -> list[str]:
    """The recovery itself; returns what it left alone and why."""
    parent = final.parent
    if not parent.is_dir():
        return []
    new, old = _sibling(final, "new"), _sibling(final, "old")
    prefixes = (_staging_prefix(final), _trash_prefix(final))
    with os.scandir(parent) as entries:
        stale = [(parent / e.name, prefix) for e in entries for prefix in prefixes if e.name.startswith(prefix)]
    if not (os.path.lexists(new) or os.path.lexists(old) or stale):
        return []
    left: list[str] = []
    trash: list[Path] = []
    kept: set[Path] = set()
    with _folder_lock(parent):
        if os.path.lexists(new) and _incomplete(new) is None:  # complete: it was being published
            problem = _not_replaceable(final) if os.path.lexists(final) else None
            if problem is None:
                if os.path.lexists(final):
                    trash.append(_to_trash(final, final))
                new.rename(final)
            else:
                left.append(f"{final} is not an edgeface bundle ({_clip(problem)}), so the bundle whose "
                            f"publication was interrupted stays in {new.name}")
                kept.add(new)
        elif not os.path.lexists(final) and os.path.lexists(old) and _incomplete(old, empty_ok=True) is None:
            old.rename(final)  # roll back to the previous bundle
        # What is left of the publication goes only once a whole bundle is at NAME; beside anything else it stays.
        settled = os.path.lexists(final) and _incomplete(final) is None
        for leftover in (new, old):
            if not os.path.lexists(leftover) or leftover in kept:
                continue
            problem = _not_replaceable(leftover) if settled else _incomplete(leftover, empty_ok=True)
            if settled and problem is None:
                trash.append(_to_trash(leftover, final))
            elif settled:
                left.append(f"{leftover} is left as it is: it is not an edgeface bundle ({_clip(problem)})")
            else:
                left.append(f"{leftover} is left as it is: there is no complete edgeface bundle at {final} to "
                            f"replace it with" + (f", and it is none either ({_clip(problem)})" if problem else ""))
        for folder, prefix in stale:  # staging and trash of processes no longer running
            owner = re.fullmatch(r"(\d+)-[0-9a-z_]+", folder.name[len(prefix):])
            if owner and not _alive(int(owner.group(1))):  # (another name, e.g. another bundle's, is not ours)
                trash.append(folder)
    for folder in trash:
        shutil.rmtree(folder, ignore_errors=True)
    return left


def _incomplete(folder: Path, *, empty_ok: bool = False) -> str | None:
    """Why ``folder`` is not a complete, intact edgeface bundle (None when it is one: what a publication puts in
    ``.NAME.new`` or moves to ``.NAME.old``); ``empty_ok``: an empty folder counts as one (a publication may have
    replaced an empty folder)."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder"
    try:
        if empty_ok and not [e for e in os.listdir(folder) if e not in OS_LITTER]:
            return None
        _open_bundle(folder)
    except EdgefaceError as exc:
        return str(exc)
    except OSError as exc:
        return f"it cannot be read: {_reason(exc)}"
    return None


def _not_replaceable(folder: Path) -> str | None:
    """Why ``folder`` is not one edgeface may replace (None when it may).

    edgeface replaces only what it wrote there itself and nobody has changed since, so that replacing it never
    loses anything of the user's:

    - an empty folder (OS litter such as ``.DS_Store`` aside), or
    - an edgeface bundle: a real folder (not a symbolic link) whose ``manifest.json`` is a valid manifest of this
      schema version (:func:`read_manifest`) and in which every other file (OS litter aside) is a regular file
      listed in the manifest's ``sha256`` with a matching hash. Listed files may be missing (deleting parts of a
      bundle loses nothing of the user's), but a file the manifest does not list, a listed file whose bytes
      changed, a symbolic link out of the folder or a special file make the folder the user's.

    A bundle of another schema version or with an invalid manifest is therefore not replaced either: the user
    removes it (edgeface cannot tell it from a folder that only looks like one).
    """
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is not a folder"
    try:
        if not [e for e in os.listdir(folder) if e not in OS_LITTER]:
            return None
        if not (folder / MANIFEST).is_file():
            return f"it has no {MANIFEST}"
        hashes = read_manifest(folder / MANIFEST)["sha256"]
        for relative in _bundle_files(folder):
            if relative not in hashes:
                return f"it holds {relative!r}, which its manifest does not list"
            if sha256_file(folder / relative) != hashes[relative]:
                return f"{relative!r} was changed since export (its sha256 differs from the manifest's)"
    except EdgefaceError as exc:
        return str(exc)
    except OSError as exc:
        return f"it cannot be read: {_reason(exc)}"
    return None


def _is_previous_bundle(folder: Path) -> bool:
    """Whether edgeface may replace ``folder``: empty, or an unchanged edgeface bundle (see
    :func:`_not_replaceable`)."""
    return _not_replaceable(folder) is None


def check_output_folder(final: str | os.PathLike) -> Path:
    """The absolute bundle path for ``--out``, refused (EdgefaceError) unless it is new, empty or a previous
    edgeface bundle (see :func:`_not_replaceable`): edgeface never replaces a user's files."""
    final = Path(os.path.abspath(final))
    if final.parent == final:
        raise EdgefaceError(f"--out {final}: a bundle needs a folder of its own, not the file system root")
    cwd = Path.cwd().resolve()
    if final.resolve() == cwd or final.resolve() in cwd.parents:
        raise EdgefaceError(f"--out {final} is the current folder (or holds it); give a new folder, e.g. "
                            f"--out bundles/{final.name or 'model'}")
    limit = _name_max(final.parent) - 32  # room for the staging suffix
    if len(os.fsencode(final.name)) > limit:
        raise EdgefaceError(f"--out {final.name[:40]}...: the folder name is longer than this file system allows "
                            f"for a bundle ({limit} bytes); choose a shorter name")
    if final.is_symlink():
        raise EdgefaceError(f"--out {final} is a symbolic link; give the real folder (edgeface will not replace "
                            "what a link points to)")
    if final.exists() and not final.is_dir():
        raise EdgefaceError(f"--out {final} is an existing file, not an edgeface bundle; it was left untouched: "
                            "choose another --out")
    if final.is_dir():
        problem = _not_replaceable(final)
        if problem is not None:
            raise EdgefaceError(f"--out {final} is an existing folder that is not an edgeface bundle edgeface may "
                                f"replace ({_clip(problem)}); it was left untouched: choose a new folder")
    return final


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.exists() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _clear_siblings(final: Path) -> list[Path]:
    """Move ``.NAME.new`` / ``.NAME.old`` left by an earlier publication to trash names, or refuse (EdgefaceError)
    when one of them is not an edgeface bundle (it is then someone's folder, and stays)."""
    trash = []
    for sibling in (_sibling(final, "new"), _sibling(final, "old")):
        if not os.path.lexists(sibling):
            continue
        problem = _not_replaceable(sibling)
        if problem is not None:
            raise EdgefaceError(f"{sibling} is in the way of publishing {final.name} and is not an edgeface bundle "
                                f"({_clip(problem)}); move it away and run again")
        trash.append(_to_trash(sibling, final))
    return trash


def _manifest_digest(folder: Path) -> str | None:
    try:
        return sha256_file(folder / MANIFEST)
    except OSError:
        return None


@contextmanager
def staging_dir(final: str | os.PathLike, *, before_publish: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it only if the block succeeds: a failed or killed export
    leaves no half-written bundle and an earlier bundle at ``final`` untouched. ``final`` must pass
    :func:`check_output_folder` (new, empty or a previous bundle), when the block starts and again when it is
    published. ``before_publish`` runs under the folder lock just before the renames and may refuse (raise)."""
    final = check_output_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_publication(final, strict=True)
    trash: list[Path] = []
    try:
        with _folder_lock(final.parent):  # leftovers in the way are refused now rather than after the work
            trash += _clear_siblings(final)
    finally:
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)
    trash = []
    tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; a bundle is as readable as any new folder
    try:
        yield tmp
        with _folder_lock(final.parent):
            check_output_folder(final)  # something may have appeared there during the export
            if before_publish is not None:
                before_publish()
            trash += _clear_siblings(final)
            trash += _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> list[Path]:
    """The renames that put the finished staging folder ``tmp`` at ``final`` (under the folder lock); returns the
    previous bundle under a trash name, for the caller to delete. A rename that fails puts everything back."""
    new, old = _sibling(final, "new"), _sibling(final, "old")
    tmp.rename(new)
    moved_old = False
    try:
        if os.path.lexists(final):
            final.rename(old)
            moved_old = True
        new.rename(final)
    except OSError:
        with suppress(OSError):  # not published: the previous bundle back, the new one discarded with the staging
            if moved_old and not os.path.lexists(final):
                old.rename(final)
            new.rename(tmp)
        raise
    if not moved_old:
        return []
    try:
        return [_to_trash(old, final)]
    except OSError:  # published all the same; the next recovery removes .NAME.old beside the complete bundle
        return []


@contextmanager
def update_bundle(path: str | os.PathLike) -> Iterator[Bundle]:
    """Change a published bundle without ever leaving it half-changed (``edgeface build-engine`` adds its engine
    this way): the block gets a staged copy of the bundle (checked like any bundle on load); when the block
    succeeds, the copy, with whatever the block wrote there and its manifest rewritten by the block
    (:func:`write_manifest`), replaces the bundle by the same renames as an export's publication. When the block
    fails, or the process is killed, the bundle stays as it was. If the bundle itself changed while the block ran,
    nothing is published (EdgefaceError)."""
    final = Path(os.path.abspath(path))
    load_bundle(final)  # a clear refusal of what is not a bundle, before anything is staged
    started: dict[str, str | None] = {}

    def unchanged() -> None:
        if _manifest_digest(final) != started["digest"]:
            raise EdgefaceError(f"bundle {final} was changed by someone else while it was being updated; nothing "
                                "was written: run again")

    with staging_dir(final, before_publish=unchanged) as tmp:
        shutil.copyfile(final / MANIFEST, tmp / MANIFEST)
        started["digest"] = sha256_file(tmp / MANIFEST)
        for relative in read_manifest(tmp / MANIFEST)["sha256"]:
            source = _inside(final, relative, "sha256")
            if not source.is_file():
                continue  # the optional parity evidence may be gone
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        yield _open_bundle(tmp)  # the copy is what its manifest lists, hashes checked


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
) -> Manifest:
    """:func:`manifest_for_model` from the model's configuration (a
    :class:`~edgeface.core.model_config.RetinaFaceConfig`) and weights provenance alone, without the network: what
    a device install writes for the default ONNX model (:mod:`edgeface.inference.default_bundle`)."""
    config = model_config.to_dict()
    if input_hw is not None:
        h, w = input_hw
        priors: int | str = model_config.anchors.num_priors((h, w))
        resize = f"fixed:{h}x{w}"
    else:
        h, w, priors, resize = "height", "width", "priors", "original"
    n: int | str = "batch" if dynamic and "batch" in dynamic else batch
    shape = [n, 3, h, w] if layout == "NCHW" else [n, h, w, 3]
    outputs = [TensorSpec(name, "float32", [n, priors, k], "N,A,k", OUTPUT_MEANINGS[name])
               for name, k in (("loc", 4), ("conf", 2), ("landmarks", 10))]
    return Manifest(
        target=target,
        precision=precision,
        files=files,
        model={"name": config["name"], "config": config, "weights": weights_info},
        input=TensorSpec("input", input_dtype, shape, layout, "BGR image minus mean, zero-padded bottom/right"),
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
    )
