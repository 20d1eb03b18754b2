"""The bundle: a directory with model file(s) and ``manifest.json``, the one contract between export and every
runtime. A runtime learns everything it needs (input layout, colour order, mean, sizes, output names, anchors,
decode rules) from the manifest; nothing is guessed from tensor shapes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema

from edgeface.errors import EdgefaceError
from edgeface.face import LANDMARK_NAMES
from edgeface.files import atomic_write, sha256_file

SCHEMA = "edgeface.bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

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
        from edgeface.processing import AnchorSpec

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
            raise EdgefaceError(f"bundle {self.path} has no {role!r} file (has {sorted(self.manifest.files)})") from None


# A manifest is a few KB; anything far larger is not one (and would cost memory to parse).
MAX_MANIFEST_BYTES = 1 << 20
# What each target's model file is; a manifest naming another kind of file is refused.
MODEL_SUFFIX = {"onnx": ".onnx", "tensorrt": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}
# Files an operating system drops into folders by itself; they are not part of a bundle and are ignored.
OS_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}
# Optional part of a bundle: may be removed without making the bundle refuse to load.
OPTIONAL_PREFIX = "parity/"


@functools.lru_cache(maxsize=1)
def _schema_validator():
    schema = json.loads((resources.files("edgeface") / "schemas" / f"manifest-v{SCHEMA_VERSION}.schema.json")
                        .read_text())
    return jsonschema.Draft202012Validator(schema)


def _field(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_manifest(manifest_file: Path) -> dict[str, Any]:
    """Parse and validate ``manifest.json`` against its versioned JSON schema
    (``edgeface/schemas/manifest-v1.schema.json``) and the rules that tie its fields together.

    Raises :class:`EdgefaceError` naming the first offending field and what was expected.
    """
    where = f"{manifest_file}"
    if manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgefaceError(f"{where} is {manifest_file.stat().st_size} bytes, not an edgeface manifest (at most "
                            f"{MAX_MANIFEST_BYTES}); re-export the bundle")
    try:
        data = json.loads(manifest_file.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
        raise EdgefaceError(f"{where} is not valid JSON ({reason}); re-export the bundle") from None
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
        if error.validator == "pattern" and "description" in error.schema:
            expected = f"{_short(error.instance)}, expected {error.schema['description']}"
        else:
            expected = error.message if len(error.message) <= 160 else _expectation(error)
        raise EdgefaceError(f"{where}: field {_field(error.absolute_path)} is invalid: {expected}; "
                            "re-export the bundle")
    problem = _inconsistency(data)
    if problem:
        raise EdgefaceError(f"{where}: {problem}; re-export the bundle")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _expectation(error) -> str:
    keyword, value = error.validator, error.validator_value
    return f"{_short(error.instance)} fails {keyword!r} {_short(value)}"


def _inconsistency(m: dict[str, Any]) -> str | None:
    """The rules a schema cannot state: fields that must agree with each other."""
    names = [o["name"] for o in m["outputs"]]
    if sorted(names) != sorted(OUTPUT_MEANINGS):
        return f"field outputs names {names}, expected loc, conf and landmarks once each"
    for index, out in enumerate(m["outputs"]):
        k = {"loc": 4, "conf": 2, "landmarks": 10}[out["name"]]
        if out["shape"][2] != k:
            return f"field outputs[{index}].shape[2] is {_short(out['shape'][2])}, expected {k} for {out['name']}"
    for index, spec in enumerate([m["input"], *m["outputs"]]):
        if spec["dtype"] in ("int8", "uint8") and not spec.get("quantization"):
            field = "input" if index == 0 else f"outputs[{index - 1}]"
            return f"field {field}.quantization is missing, expected scale and zero_point for a {spec['dtype']} tensor"
    shape, layout = m["input"]["shape"], m["input"]["layout"]
    channels, (h, w) = (shape[1], shape[2:4]) if layout == "NCHW" else (shape[3], shape[1:3])
    if channels != 3:
        return f"field input.shape {shape} has {_short(channels)} channels where layout {layout} puts them, expected 3"
    resize = m["preprocessing"]["resize"]
    if resize.startswith("fixed:"):
        fixed = [int(v) for v in resize[6:].split("x")]
        if [h, w] != fixed:
            return f"field preprocessing.resize {resize!r} does not match input.shape {shape} ({layout})"
    elif isinstance(h, int) or isinstance(w, int) or not {"height", "width"} <= set(m.get("dynamic") or {}):
        return f"field preprocessing.resize 'original' needs dynamic height and width, but input.shape is {shape}"
    if isinstance(shape[0], str) and "batch" not in (m.get("dynamic") or {}):
        return f"field input.shape[0] is {shape[0]!r} but dynamic has no batch range"
    for dim, (low, opt, high) in (m.get("dynamic") or {}).items():
        if not low <= opt <= high:
            return f"field dynamic.{dim} {[low, opt, high]} is not [min, opt, max] with min <= opt <= max"
    anchors = m["decode"]["anchors"]
    if len(anchors["steps"]) != len(anchors["min_sizes"]):
        return (f"field decode.anchors.steps has {len(anchors['steps'])} levels but min_sizes has "
                f"{len(anchors['min_sizes'])}")
    if m["preprocessing"]["mean_in_graph"] and m["target"] != "coreml":
        return (f"field preprocessing.mean_in_graph is true, but only Core ML image inputs subtract the mean in the "
                f"model; the model of a {m['target']} bundle takes the mean-subtracted input")
    model = m["files"]["model"]
    if not model.endswith(MODEL_SUFFIX[m["target"]]) or model.startswith(OPTIONAL_PREFIX):
        return (f"field files.model {model!r} is not the model file of a {m['target']} bundle "
                f"(*{MODEL_SUFFIX[m['target']]})")
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
    the bundle are refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                _inside(root, relative, "(a symbolic link)")
            if name in filenames and relative != MANIFEST and name not in OS_LITTER:
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


# Publishing a bundle: the finished staging folder is renamed to .NAME.new, the previous bundle to .NAME.old,
# .NAME.new to NAME, and .NAME.old is removed. A crash at any point leaves a state recover_publication() finishes
# (a complete .NAME.new) or rolls back (.NAME.old and no NAME); staging folders of dead exports are removed.
def _sibling(final: Path, what: str) -> Path:
    return final.with_name(f".{final.name}.{what}")


def _staging_prefix(final: Path) -> str:
    return f".{final.name}.staging-"


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise publication and recovery in one folder (between processes; flock where the system has it)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks on folders
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def recover_publication(final: Path) -> None:
    """Finish or roll back a publication of ``final`` that a crash interrupted, and remove the staging folders of
    exports that are no longer running. Does nothing (and costs two stat calls) when there is nothing to do."""
    final = Path(os.path.abspath(final))
    new, old = _sibling(final, "new"), _sibling(final, "old")
    prefix = _staging_prefix(final)
    if not final.parent.is_dir():
        return
    stale = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    if not (os.path.lexists(new) or os.path.lexists(old) or stale):
        return
    try:
        with _folder_lock(final.parent):
            if (new / MANIFEST).is_file():  # complete, was being published
                if os.path.lexists(final):
                    shutil.rmtree(old, ignore_errors=True)
                    final.rename(old)
                new.rename(final)
            elif not os.path.lexists(final) and old.is_dir():  # roll back to the previous bundle
                old.rename(final)
            for leftover in (new, old):
                if os.path.lexists(leftover) and os.path.lexists(final):
                    shutil.rmtree(leftover, ignore_errors=True)
            for folder in stale:
                pid = folder.name[len(prefix):].split("-")[0]
                if not pid.isdigit() or not _alive(int(pid)):
                    shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass  # a read-only location: loading goes on with what is there


def _is_previous_bundle(folder: Path) -> bool:
    """A folder edgeface may replace: empty, or an edgeface bundle holding nothing its manifest does not list."""
    entries = [e for e in folder.iterdir() if e.name not in OS_LITTER]
    if not entries:
        return True
    try:
        data = read_manifest(folder / MANIFEST)
    except (EdgefaceError, OSError):
        return False
    listed = set(data.get("sha256", {}))
    return all(f in listed for f in _bundle_files(folder))


def check_output_folder(final: str | os.PathLike) -> Path:
    """The absolute bundle path for ``--out``, refused (EdgefaceError) unless it is new, empty or a previous
    edgeface bundle: edgeface never replaces a user's files."""
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
    if final.is_dir() and not _is_previous_bundle(final):
        raise EdgefaceError(f"--out {final} is an existing folder that is not an edgeface bundle (or holds files "
                            "a bundle does not); it was left untouched: choose a new folder")
    return final


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.exists() else folder.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


@contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``final`` that replaces it only if the block succeeds: a failed or killed export
    leaves no half-written bundle and an earlier bundle at ``final`` untouched. ``final`` must pass
    :func:`check_output_folder` (new, empty or a previous bundle)."""
    final = check_output_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_publication(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(final)}{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a bundle is as readable as any new folder
    try:
        yield tmp
        with _folder_lock(final.parent):
            check_output_folder(final)  # something may have appeared there during the export
            new, old = _sibling(final, "new"), _sibling(final, "old")
            for leftover in (new, old):
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.rename(new)
            if os.path.lexists(final):
                final.rename(old)
            new.rename(final)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest_for_model(
    model,
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
    """The manifest of ``model`` (a RetinaFace) as ``target`` runs it: static ``input_hw`` or ``dynamic`` ranges."""
    config = model.config.to_dict()
    if input_hw is not None:
        h, w = input_hw
        priors: int | str = model.config.anchors.num_priors((h, w))
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
        model={"name": config["name"], "config": config, "weights": getattr(model, "weights_info", None)},
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
