"""Core ML (iOS) bundles: fp16 with an image input, fp32 with a tensor input, fp32 with an image input (exported with
--no-verify), int8 weights with enumerated sizes.

Core ML predicts on macOS only: elsewhere these tests check the bundle, the package's spec and precision, the
package's MIL program interpreted against PyTorch, and that the coreml runtime refuses with a clear message; on
macOS they also check the pipeline's parity through Core ML itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("coremltools", reason="Core ML export needs the coreml extra: pip install edgeface[coreml]")

import coremltools as ct  # noqa: E402
from edgeface.export import coreml as coreml_export  # noqa: E402
from edgeface.export.pipeline import export_bundle  # noqa: E402
from edgeface.runtimes import open_runtime  # noqa: E402

from edgeface import EdgefaceError  # noqa: E402

SIZE = (320, 320)
PRIORS = 2 * (40 * 40 + 20 * 20 + 10 * 10)
MACOS = sys.platform == "darwin"
LINUX_REASON = (f"Core ML prediction needs macOS: coremltools {ct.__version__} raises "
                "'Model prediction is only supported on macOS version 10.13 or later.' elsewhere")
on_macos = pytest.mark.skipif(not MACOS, reason="Core ML prediction runs on macOS only")
not_macos = pytest.mark.skipif(MACOS, reason="checks the behaviour where Core ML cannot predict")


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("coreml")


@pytest.fixture(scope="module")
def fp16(out_root):
    return export_bundle("coreml", precision="fp16", out=out_root / "fp16", imgsz=SIZE, progress=False)


@pytest.fixture(scope="module")
def fp32_tensor(out_root):
    return export_bundle("coreml", precision="fp32", out=out_root / "fp32", imgsz=SIZE,
                         options={"coreml_input": "tensor"}, progress=False)


def _export_without_shared_data(out, **kwargs):
    """As on a machine without the shared WIDER FACE images (EDGEFACE_SHARED names no folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFACE_SHARED", str(out.parent / "no-shared-data"))
        return export_bundle("coreml", out=out, imgsz=SIZE, progress=False, **kwargs)


@pytest.fixture(scope="module")
def fp32_image(out_root):
    return _export_without_shared_data(out_root / "fp32-image", precision="fp32", verify=False)


@pytest.fixture(scope="module")
def int8(out_root):
    # Weights-only INT8: no calibration images, so no calib argument and no shared data needed.
    return _export_without_shared_data(out_root / "int8", precision="int8",
                                       options={"enumerated_sizes": [(256, 320), (384, 320)]})


def _package_bytes(bundle) -> int:
    return sum(f.stat().st_size for f in (bundle.path / "model.mlpackage").rglob("*") if f.is_file())


def _outputs(manifest):
    return [(o.name, o.dtype, o.shape) for o in manifest.outputs]


def test_fp16_image_bundle(fp16):
    m = fp16.manifest
    assert (fp16.path / "model.mlpackage" / "Manifest.json").is_file() and (fp16.path / "manifest.json").is_file()
    assert m.target == "coreml" and m.precision == "fp16" and m.files == {"model": "model.mlpackage"}
    assert any(name.startswith("model.mlpackage/Data/com.apple.CoreML/weights/") for name in m.sha256)
    assert m.preprocessing["mean_in_graph"] is True and fp16_mean_zero(fp16)
    assert m.input.name == "input" and m.input.shape == [1, 3, *SIZE] and m.input.layout == "NCHW"
    assert _outputs(m) == [("loc", "float32", [1, PRIORS, 4]), ("conf", "float32", [1, PRIORS, 2]),
                           ("landmarks", "float32", [1, PRIORS, 10])]
    info = m.target_info
    assert info["input_type"] == "image" and info["color_layout"] == "BGR" and info["scale"] == 1.0
    assert info["bias"] == [-104.0, -117.0, -123.0] and info["pad_value_bgr"] == [104.0, 117.0, 123.0]
    assert info["pixel_range"] == "0-255" and info["input_size"] == list(SIZE) and "CVPixelBuffer" in info["app"]
    assert info["outputs"] == {"loc": [1, PRIORS, 4], "conf": [1, PRIORS, 2], "landmarks": [1, PRIORS, 10]}
    assert info["minimum_deployment_target"] == "iOS16" and info["compute_precision"] == "fp16"
    checks = info["spec_checks"]
    assert checks["passed"] and checks["model_type"] == "mlProgram" and checks["specification_version"] >= 7
    assert checks["input"]["type"] == "imageType" and checks["input"]["color_space"] == "BGR"
    assert (checks["input"]["height"], checks["input"]["width"]) == SIZE
    assert checks["input"]["bias_in_program"] == [-104.0, -117.0, -123.0]
    assert checks["outputs"]["conf"] == {"dtype": "FLOAT32", "shape": [1, PRIORS, 2]}
    assert set(checks["mil"]["conv_output_dtypes"]) == {"fp16"} and set(checks["mil"]["conv_weights"]) == {"fp16"}
    assert m.calibration is None
    assert m.converter["versions"]["coremltools"] == ct.__version__ and m.converter["versions"]["torch"]
    assert max(m.converter["checks"]["export"]["max_abs_diff_vs_pytorch"].values()) < 1e-4


def fp16_mean_zero(bundle) -> bool:
    """The shared pre-processing subtracts nothing: the model has the mean as its image bias."""
    return bundle.manifest.mean_bgr == (0.0, 0.0, 0.0)


def test_fp16_program_reproduces_pytorch(fp16):
    check = fp16.manifest.target_info["program_check"]
    assert check["status"] == "passed" and check["detection_agreement"] >= 0.97 and check["reference_faces"] >= 1
    assert check["landmark_error"] <= 0.01
    assert check["output_shapes"]["320x320"] == {"loc": [1, PRIORS, 4], "conf": [1, PRIORS, 2],
                                                  "landmarks": [1, PRIORS, 10]}
    assert check["max_abs_diff_random_pixels"]["320x320"]["conf"] < 5e-3  # FP16 rounding, nothing worse


def test_fp32_tensor_bundle(fp32_tensor):
    m = fp32_tensor.manifest
    info = m.target_info
    assert m.preprocessing["mean_in_graph"] is False and m.mean_bgr == (104.0, 117.0, 123.0)
    assert info["input_type"] == "tensor" and info["shape"] == [1, 3, *SIZE] and info["dtype"] == "float32"
    checks = info["spec_checks"]
    assert checks["input"]["type"] == "multiArrayType" and checks["input"]["dtype"] == "FLOAT32"
    assert checks["input"]["shape"] == [1, 3, *SIZE]
    assert set(checks["mil"]["conv_output_dtypes"]) == {"fp32"} and set(checks["mil"]["conv_weights"]) == {"fp32"}
    assert [checks["outputs"][n]["shape"] for n in ("loc", "conf", "landmarks")] == [
        [1, PRIORS, 4], [1, PRIORS, 2], [1, PRIORS, 10]]
    # FP32 all through: the interpreted program is PyTorch to float rounding
    check = info["program_check"]
    assert check["status"] == "passed" and check["detection_agreement"] == 1.0
    assert max(check["max_abs_diff_random_pixels"]["320x320"].values()) < 1e-3


@pytest.mark.parametrize("bundle", ["fp32_tensor", "fp32_image"])
def test_program_gets_mean_coloured_letterbox_padding(bundle, request, astronaut_path):
    """What the shared pre-processing makes for the manifest, letterboxed, through the interpreted FP32 program
    gives PyTorch's outputs on the standard input: the padding reaches the model as the mean colour (zero after
    the mean). Black padding (-mean after it) would not. Also checks the interpreter itself (which the program
    check relies on)."""
    import torch
    from edgeface.export.coreml_mil import MILProgramRuntime

    from edgeface.core.images import load_image
    from edgeface.core.processing import ResizePolicy, preprocess
    from edgeface.models import get_model

    bundle = request.getfixturevalue(bundle)
    runtime = MILProgramRuntime(bundle.manifest, bundle.file())
    image, policy = load_image(astronaut_path)[:300], ResizePolicy.parse("320x320")  # wide: padded at the bottom
    standard, _ = preprocess([image], policy=policy, mean_bgr=(104.0, 117.0, 123.0))
    with torch.no_grad():
        outputs = get_model("retinaface_mnet025", weights="default")(torch.from_numpy(standard))
    want = {name: t.numpy() for name, t in zip(("loc", "conf", "landmarks"), outputs)}
    error = {}
    for pad_bgr in (runtime.pad_bgr, (0.0, 0.0, 0.0)):
        batch, _ = preprocess([image], policy=policy, mean_bgr=runtime.mean_bgr, pad_bgr=pad_bgr, layout="NCHW")
        got = runtime.infer(batch)
        assert all(got[n].dtype == np.float32 and got[n].shape == want[n].shape for n in want)
        error[pad_bgr] = max(float(np.abs(got[n] - want[n]).max()) for n in want)
    assert error[runtime.pad_bgr] < 1e-4 and error[(0.0, 0.0, 0.0)] > 0.1


def test_no_verify_skips_the_program_check(fp32_image):
    info = fp32_image.manifest.target_info
    assert info["input_type"] == "image" and info["spec_checks"]["passed"]
    assert info["program_check"] == {"status": "skipped", "reason": "--no-verify"}
    assert fp32_image.manifest.parity == {"status": "skipped", "reason": "--no-verify"}


def test_int8_weights_shrink_the_package(int8, fp16):
    m = int8.manifest
    assert m.calibration["method"] == "weights-only" and m.calibration["images"] == 0 and not m.calibration["source"]
    assert m.calibration["tool"] == "coremltools.optimize.coreml.linear_quantize_weights"
    mil = m.target_info["spec_checks"]["mil"]
    assert mil["quantized_data_dtypes"] == ["int8"] and mil["ops"].get("constexpr_affine_dequantize", 0) > 0
    assert set(mil["conv_output_dtypes"]) == {"fp16"}  # weights only: compute stays FP16
    assert mil["conv_weight_elements"]["int8"] > 0.9 * sum(mil["conv_weight_elements"].values())
    assert _package_bytes(int8) < 0.65 * _package_bytes(fp16)
    check = m.target_info["program_check"]
    # no shared data was found: the export's parity set, the photograph and its mirrored, halved and tiled copies
    assert check["status"] == "passed" and check["images"] == 4


def test_int8_enumerated_sizes(int8):
    info = int8.manifest.target_info
    assert info["enumerated_sizes"] == [[320, 320], [256, 320], [384, 320]]
    assert sorted(info["spec_checks"]["input"]["enumerated_sizes"]) == [[256, 320], [320, 320], [384, 320]]
    shapes = info["program_check"]["output_shapes"]
    assert shapes["256x320"]["loc"] == [1, 2 * (32 * 40 + 16 * 20 + 8 * 10), 4]
    assert shapes["384x320"]["landmarks"] == [1, 2 * (48 * 40 + 24 * 20 + 12 * 10), 10]
    assert int8.manifest.input.shape == [1, 3, *SIZE]  # the bundle (parity, resize) describes the default size


@not_macos
def test_parity_skipped_with_the_macos_reason(fp16, fp32_tensor, int8):
    for bundle in (fp16, fp32_tensor, int8):
        assert bundle.manifest.parity == {"status": "skipped", "reason": LINUX_REASON}


@not_macos
def test_coreml_runtime_refuses_off_apple(fp16):
    with pytest.raises(EdgefaceError, match=r"Apple platforms only \(macOS / iOS\).*onnx.*tflite"):
        open_runtime("coreml", model=fp16.path)


@on_macos
def test_parity_passes_on_macos(fp16, fp32_tensor, int8):  # pragma: no cover - macOS only
    for bundle in (fp16, fp32_tensor, int8):
        assert bundle.manifest.parity["status"] == "passed" and bundle.manifest.parity["runtime"] == "coreml"
    with open_runtime("coreml", model=fp16.path) as runtime:
        out = runtime.infer(np.zeros((2, 3, *SIZE), np.float32))
    assert {k: v.shape for k, v in out.items()} == {"loc": (2, PRIORS, 4), "conf": (2, PRIORS, 2),
                                                    "landmarks": (2, PRIORS, 10)}


def test_outputs_are_renamed_when_converted_under_other_names(fp16, tmp_path):
    spec = ct.models.MLModel(str(fp16.file()), skip_model_load=True).get_spec()
    for old, new in (("loc", "var_1"), ("conf", "var_2"), ("landmarks", "var_3")):
        ct.utils.rename_feature(spec, old, new, rename_inputs=False)
    weights = fp16.file() / "Data" / "com.apple.CoreML" / "weights"
    fixed, renamed = coreml_export._rename_outputs(ct, ct.models.MLModel(spec, weights_dir=str(weights),
                                                                         skip_model_load=True))
    assert renamed == {"var_1": "loc", "var_2": "conf", "var_3": "landmarks"}
    fixed.save(str(tmp_path / "renamed.mlpackage"))
    checks = _check(tmp_path / "renamed.mlpackage", precision="fp16")
    assert checks["passed"] and list(checks["outputs"]) == ["loc", "conf", "landmarks"]


def _check(path, **overrides):
    from edgeface.models import get_model

    config = get_model("retinaface_mnet025").config
    kwargs = dict(kind="image", sizes=[SIZE], precision="fp16", anchors=config.anchors, mean_bgr=config.mean_bgr,
                  deployment_target="iOS16") | overrides
    return coreml_export.check_package(path, **kwargs)


def test_spec_check_catches_mismatches(fp16, int8):
    with pytest.raises(EdgefaceError, match="compute in .*fp16.* expected only fp32"):
        _check(fp16.file(), precision="fp32")
    with pytest.raises(EdgefaceError, match="no int8-quantised convolution weights"):
        _check(fp16.file(), precision="int8")
    with pytest.raises(EdgefaceError, match="compressed weights in a fp16 model"):
        _check(int8.file(), sizes=[SIZE, (256, 320), (384, 320)])
    with pytest.raises(EdgefaceError, match="expected a BGR image of 640x640"):
        _check(fp16.file(), sizes=[(640, 640)])
    with pytest.raises(EdgefaceError, match=r"expected float32 \[1, 3, 320, 320\]"):
        _check(fp16.file(), kind="tensor")


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(EdgefaceError, match="coreml_input"):
        export_bundle("coreml", out=tmp_path / "a", imgsz=SIZE, options={"coreml_input": "pixels"}, progress=False)
    with pytest.raises(EdgefaceError, match="multiple of 32"):
        export_bundle("coreml", out=tmp_path / "b", imgsz=SIZE, options={"enumerated_sizes": [(300, 300)]},
                      progress=False)
    with pytest.raises(EdgefaceError, match="coreml_target"):
        export_bundle("coreml", out=tmp_path / "c", imgsz=SIZE, options={"coreml_target": "iOS15"}, progress=False)
    with pytest.raises(EdgefaceError, match="fixed input size"):
        export_bundle("ios", out=tmp_path / "d", dynamic=True, progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_coremltools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(EdgefaceError, match=r"pip install edgeface\[coreml\]"):
        coreml_export._coremltools()
