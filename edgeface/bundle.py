"""The bundle: a directory with model file(s) and ``manifest.json``, the one contract between export and every
runtime. A runtime learns everything it needs (input layout, colour order, mean, sizes, output names, anchors,
decode rules) from the manifest; nothing is guessed from tensor shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeface.errors import EdgefaceError
from edgeface.face import LANDMARK_NAMES
from edgeface.weights import sha256_file

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
        if data.get("schema") != SCHEMA:
            raise EdgefaceError(f"not an edgeface bundle manifest (schema {data.get('schema')!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise EdgefaceError(
                f"bundle manifest schema version {data.get('schema_version')} is not supported by this edgeface "
                f"(supports {SCHEMA_VERSION}); re-export the bundle or upgrade edgeface"
            )
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
        try:
            return self.path / self.manifest.files[role]
        except KeyError:
            raise EdgefaceError(f"bundle {self.path} has no {role!r} file (has {sorted(self.manifest.files)})") from None


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's sha256 against it."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise EdgefaceError(f"{path} is not an edgeface bundle (no {MANIFEST}); create one with `edgeface export`")
    try:
        manifest = Manifest.from_dict(json.loads(manifest_file.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise EdgefaceError(f"{manifest_file} is damaged or not an edgeface manifest ({exc})") from None
    if verify:
        for name, expected in manifest.sha256.items():
            file = path / name
            if not file.is_file():
                raise EdgefaceError(f"bundle {path} is incomplete: {name} is missing")
            if sha256_file(file) != expected:
                raise EdgefaceError(f"bundle {path}: {name} does not match the sha256 in its manifest "
                                    "(modified or damaged); re-export it")
    return Bundle(path, manifest)


def hash_files(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: Manifest) -> None:
    manifest.sha256 = hash_files(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory beside ``final`` that replaces it only if the block succeeds: a failed export leaves
    no half-written bundle and an earlier bundle at ``final`` untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
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
