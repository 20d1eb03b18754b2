"""QNN bundles (Snapdragon Hexagon NPU): the QDQ model made with the QNN EP's quantisation config runs entirely on the
HTP (simulated on x86-64 by onnxruntime-qnn's libQnnHtp.so) with CPU fallback disabled, its ahead-of-time context
binary reproduces it, the placement is recorded, parity passes through the shared pipeline, the runtime refuses a
manifest that does not describe its model, and a failed export writes nothing. Small inputs (320x320) and few
calibration images: the simulated HTP takes about a second per 320x320 image."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")
pytest.importorskip("onnxruntime_qnn", reason="the qnn target needs onnxruntime-qnn: pip install edgeface[qnn]")

import onnx  # noqa: E402
from edgeface.export import qnn  # noqa: E402
from edgeface.export.pipeline import export_bundle  # noqa: E402
from edgeface.runtimes import open_runtime  # noqa: E402
from edgeface.runtimes.qnn import QnnRuntime  # noqa: E402

from edgeface import Detector, EdgefaceError  # noqa: E402
from edgeface.cli import main  # noqa: E402
from edgeface.core.bundle import load_bundle  # noqa: E402

SIZE = (320, 320)
SMALL = (160, 160)  # for the tests that need a bundle but not its parity: a quarter of the simulated HTP's work
PRIORS = 2 * (40 * 40 + 20 * 20 + 10 * 10)
CALIB_N = 8
SM8650 = {"name": "SM8650", "soc_model": 57, "htp_arch": 75}


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory, calib_dir):
    """The default variant through the shared pipeline (conversion, placement, context binary, parity)."""
    return export_bundle("qnn", imgsz=SIZE, calib=calib_dir, calib_n=CALIB_N, progress=False,
                         out=tmp_path_factory.mktemp("bundles") / "w8a8")


def _face(detector, path):
    faces = detector.detect(path)
    assert len(faces) == 1
    return faces[0]


def _quantized_inputs(proto):
    """Names of the tensors produced by DequantizeLinear nodes (and graph inputs, for the first Q)."""
    return {out for n in proto.graph.node if n.op_type == "DequantizeLinear" for out in n.output}


def test_w8a8_bundle_contract(w8a8):
    m = w8a8.manifest
    assert m.target == "qnn" and m.precision == "int8"
    assert m.files == {"model": "model.onnx", "context": "model_ctx.onnx"}
    assert m.input.shape == [1, 3, *SIZE] and m.input.dtype == "float32"
    assert [(o.name, o.shape) for o in m.outputs] == [("loc", [1, PRIORS, 4]), ("conf", [1, PRIORS, 2]),
                                                      ("landmarks", [1, PRIORS, 10])]
    assert m.calibration["variant"] == "w8a8" and m.calibration["images"] == CALIB_N
    assert m.calibration["activations"].startswith("uint8") and m.calibration["nodes_kept_float"] == []
    # the recipe's 16-bit activations in MobileNet stage1, on the NPU like the rest
    assert m.calibration["int16_activations"] == list(qnn.INT16_ACTIVATIONS) and m.calibration["int16_tensors"] > 10
    info = m.target_info
    assert info["soc"] == SM8650 and info["variant"] == "w8a8" and info["backend"] == "HTP"
    place = info["placement"]
    assert place["cpu_fallback"] == [] and place["npu_share"] == 1.0
    assert place["npu_nodes"] == place["total_nodes"] > 100
    assert place["fallback_disabled_load"].startswith("passed")
    context = info["context"]
    assert context["file"] == "model_ctx.onnx" and context["soc_model"] == 57 and context["htp_arch"] == 75
    assert context["binary_bytes"] > 100_000 and context["qnn_sdk"]
    assert max(context["check"]["max_abs_diff_vs_model"].values()) <= 1e-3
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "qnn"
    assert m.converter["versions"]["onnxruntime-qnn"]


def test_no_float_islands(w8a8):
    """Every compute node reads dequantized tensors and writes a tensor that is quantized again: nothing of the
    graph is left for a float kernel (the ONNX target's INT8 recipe keeps heads and stage1 float; here they would
    fall back to the CPU)."""
    proto = onnx.load(w8a8.path / "model.onnx")
    dequantized = _quantized_inputs(proto)
    quantized = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "Add", "Concat", "Softmax", "Resize")]
    assert len([n for n in compute if n.op_type == "Conv"]) > 40
    for node in compute:
        data = node.input[:1] if node.op_type == "Resize" else node.input  # a Resize's scales are a constant
        assert all(i in dequantized for i in data if i), node.name
        assert node.output[0] in quantized, node.name
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    zero_points = {inits[n.input[2]].dtype for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {np.dtype(np.uint8), np.dtype(np.uint16)}  # 8-bit, stage1 16-bit
    context = onnx.load(w8a8.path / "model_ctx.onnx")
    assert [n.op_type for n in context.graph.node] == ["EPContext"]


def test_detector_runs_the_bundle_on_the_htp_and_its_context_binary(w8a8, astronaut_path):
    reference = _face(Detector(resize=f"fixed:{SIZE[0]}x{SIZE[1]}"), astronaut_path)
    htp = Detector(model=w8a8.path)
    assert htp.runtime.name == "qnn" and htp.runtime.describe()["cpu_fallback"] == "disabled"
    assert htp.runtime.describe()["providers"][0] == "QNNExecutionProvider"
    face = _face(htp, astronaut_path)
    assert face.box == pytest.approx(reference.box, abs=3.0)  # pixels, INT8
    context = Detector(model=w8a8.path, device="context")
    assert context.runtime.describe()["artifact"] == "model_ctx.onnx"
    same = _face(context, astronaut_path)
    assert same.box == pytest.approx(face.box, abs=1e-3) and same.score == pytest.approx(face.score, abs=1e-4)


def test_runtime_devices_and_options(w8a8):
    with pytest.raises(EdgefaceError, match=r"unknown device 'cuda' for the qnn runtime: use cpu, htp, context"):
        open_runtime("qnn", model=w8a8.path, device="cuda")
    with pytest.raises(EdgefaceError, match=r"providers is not an option of the qnn runtime"):
        open_runtime("qnn", model=w8a8.path, providers=["cpu"])
    runtime = open_runtime("qnn", model=w8a8.path, allow_fallback=True)
    assert runtime.describe()["cpu_fallback"] == "allowed"
    batch = np.zeros((2, 3, *SIZE), np.float32)  # the graph's batch is 1: rows run one after the other
    outputs = runtime.infer(batch)
    assert outputs["conf"].shape == (2, PRIORS, 2) and outputs["conf"].dtype == np.float32
    np.testing.assert_allclose(outputs["conf"].sum(-1), 1.0, atol=0.02)


def _lying_copy(bundle, tmp_path, edit):
    copy = shutil.copytree(bundle.path, tmp_path / "lying")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _bigger(manifest):  # a size the compiled graph was not made for, consistent everywhere else
    manifest["input"]["shape"] = [1, 3, 640, 640]
    manifest["preprocessing"]["resize"] = "fixed:640x640"
    for out in manifest["outputs"]:
        out["shape"][1] = 4 * PRIORS


@pytest.mark.parametrize("edit, message", [
    (_bigger, r"manifest field input has shape \[1, 3, 640, 640\], but the model's is \[1, 3, 320, 320\]"),
    (lambda m: m["input"].update(name="image"), r"manifest field input.name is 'image', but the model's inputs "
                                                r"are \['input'\]"),
])
def test_the_runtime_refuses_a_manifest_that_lies(w8a8, tmp_path, edit, message):
    with pytest.raises(EdgefaceError, match=message):
        open_runtime(model=_lying_copy(w8a8, tmp_path, edit))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["target_info"]["placement"].update(npu_share=0.5), r"npu_share 0.5, expected 1.0000"),
    (lambda m: m["target_info"]["placement"].update(npu_nodes=m["target_info"]["placement"]["total_nodes"] - 1,
                                                    npu_share=1 - 1 / m["target_info"]["placement"]["total_nodes"]),
     r"cpu_fallback names 0 nodes, but 1 are not on the NPU"),
    (lambda m: m["target_info"]["context"].update(soc="SM8550", soc_model=43, htp_arch=73),
     r"target_info.context was compiled for SM8550"),
    (lambda m: m["files"].pop("context"), r"target_info.context and files.context must be given together"),
])
def test_the_manifest_rules_refuse_a_placement_or_context_that_disagrees(w8a8, tmp_path, edit, message):
    with pytest.raises(EdgefaceError, match=message):
        load_bundle(_lying_copy(w8a8, tmp_path, edit))


def test_placement_names_the_nodes_off_the_npu(w8a8, tmp_path):
    """A node the HTP does not take (a float Det, no quantised form) appended to the QDQ model: refused by default,
    counted and named with allow_fallback."""
    proto = onnx.load(w8a8.path / "model.onnx")
    helper = onnx.helper
    proto.graph.node.append(helper.make_node("Reshape", ["loc", "det_shape"], ["loc_2x2"], name="to_square"))
    proto.graph.node.append(helper.make_node("Det", ["loc_2x2"], ["loc_det"], name="odd_one"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "det_shape"))
    proto.graph.output.append(helper.make_tensor_value_info("loc_det", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "with_det.onnx"
    onnx.save(proto, path)
    with pytest.raises(EdgefaceError, match=r"would run on the CPU, not the NPU: .*Det odd_one"):
        qnn.placement(path, SM8650, allow_fallback=False)
    record = qnn.placement(path, SM8650, allow_fallback=True)
    assert "Det odd_one" in record["cpu_fallback"] and record["npu_share"] < 1.0
    assert record["npu_nodes"] + len(record["cpu_fallback"]) == record["total_nodes"]
    assert "fallback_disabled_load" not in record


def test_w8a16_variant_for_another_soc(tmp_path, calib_dir, astronaut_path):
    """16-bit activations everywhere, compiled for a Snapdragon 8 Gen 2. Without the export's parity run (the
    simulated HTP is slow; the measured w8a16 figures are in the README): its context binary finds the face."""
    bundle = export_bundle("qnn", imgsz=SMALL, calib=calib_dir, calib_n=CALIB_N, progress=False, verify=False,
                           options={"activation_bits": 16, "soc_model": "SM8550"}, out=tmp_path / "w8a16")
    m = bundle.manifest
    assert m.calibration["variant"] == "w8a16" and m.calibration["activations"].startswith("uint16")
    assert m.calibration["int16_activations"] == []  # all of them are
    assert m.target_info["soc"] == {"name": "SM8550", "soc_model": 43, "htp_arch": 73}
    assert m.target_info["context"]["htp_arch"] == 73 and m.target_info["placement"]["npu_share"] == 1.0
    proto = onnx.load(bundle.path / "model.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    zero_points = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(zp.dtype == np.uint16 for zp in zero_points)
    reference = _face(Detector(resize=f"fixed:{SMALL[0]}x{SMALL[1]}"), astronaut_path)
    face = _face(Detector(model=bundle.path, device="context"), astronaut_path)
    assert face.box == pytest.approx(reference.box, abs=3.0)


def test_cli_run_and_compare(w8a8, astronaut_path, tmp_path, capsys):
    assert main(["run", "--model", str(w8a8.path), "--source", str(astronaut_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["faces"]) == 1 and "qnn/int8 (qnn)" in captured.err
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "a.jpg")
    assert main(["compare", "torch", str(w8a8.path), "--images", str(folder), "--json",
                 str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["detection_agreement"] == 1.0


def test_a_failed_export_writes_nothing(tmp_path, calib_dir, monkeypatch):
    with pytest.raises(EdgefaceError, match=r"--dynamic is not available for qnn: the Hexagon NPU"):
        export_bundle("qnn", dynamic=True, out=tmp_path / "a", progress=False)
    with pytest.raises(EdgefaceError, match=r"--soc-model 'SM0000' is not supported: give SM8450, "):
        export_bundle("qnn", imgsz=SIZE, options={"soc_model": "SM0000"}, out=tmp_path / "b", progress=False)
    with pytest.raises(EdgefaceError, match=r"--activation-bits 4 is not supported: give 8, 16"):
        export_bundle("qnn", imgsz=SIZE, options={"activation_bits": 4}, out=tmp_path / "c", progress=False)

    # the context compile fails after the QDQ model was written: nothing is published
    def no_context(path, out, soc, allow_fallback):
        out.write_bytes(b"half a context")
        raise EdgefaceError("the QNN execution provider could not open model.onnx: simulated failure")

    monkeypatch.setattr(qnn, "compile_context", no_context)
    with pytest.raises(EdgefaceError, match="simulated failure"):
        export_bundle("qnn", imgsz=SMALL, calib=calib_dir, calib_n=2, out=tmp_path / "d", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_missing_qnn_says_how_to_install(monkeypatch, w8a8):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import onnxruntime_qnn -> ImportError
    with pytest.raises(EdgefaceError, match=r"^Running QNN .*`pip install edgeface\[qnn-runtime\]`$"):
        QnnRuntime.open(w8a8)
