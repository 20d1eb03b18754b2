"""The runtime registry and the torch reference runtime."""

import numpy as np
import pytest
from edgeface.runtimes import RUNTIMES, get_runtime_class, list_runtimes, open_runtime

from edgeface import Detector, EdgefaceError
from edgeface.core.processing import dequantize, quantize


def test_registry_names_every_backend():
    names = list_runtimes()  # one per RUNTIMES line (the contract battery: tests/test_registry_contract.py)
    assert len(names) == len(RUNTIMES) and all(get_runtime_class(n).name == n for n in names)
    assert "torch" in names and get_runtime_class("torch").name == "torch"
    with pytest.raises(EdgefaceError, match="did you mean 'tflite'"):
        get_runtime_class("tflit")


def test_bundle_runtimes_need_a_bundle():
    with pytest.raises(EdgefaceError, match="needs a bundle"):
        open_runtime("onnxruntime")


def test_torch_runtime_states_its_input_spec():
    runtime = open_runtime("torch", weights="default")
    assert runtime.layout == "NCHW" and runtime.mean_bgr == (104.0, 117.0, 123.0)
    assert str(runtime.resize) == "original"
    out = runtime.infer(np.zeros((2, 3, 64, 96), np.float32))
    assert {k: v.shape for k, v in out.items()} == {"loc": (2, 252, 4), "conf": (2, 252, 2),
                                                    "landmarks": (2, 252, 10)}
    assert runtime.describe()["runtime"] == "torch"


def test_cuda_request_without_gpu_is_explained():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(EdgefaceError, match="no CUDA GPU"):
        Detector(device="cuda")


def test_quantize_round_trip():
    q = {"scale": 0.5, "zero_point": -3}
    x = np.array([-100.0, -1.0, 0.0, 2.2, 100.0], np.float32)
    codes = quantize(x, q, "int8")
    assert codes.dtype == np.int8 and codes.tolist() == [-128, -5, -3, 1, 127]
    np.testing.assert_allclose(dequantize(codes, q), [-62.5, -1.0, 0.0, 2.0, 65.0])
