"""OpenVINO bundles: IR from the simplified ONNX model (FP32, FP16 weights, INT8 by NNCF), the OpenVINO runtime on
the CPU, parity through the shared pipeline, the astronaut's face through the Detector, a manifest that lies and
a device that is not there refused in one line, and no telemetry."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

# As edgeface does before it imports OpenVINO (runtimes/openvino.py): no telemetry from the tests either.
sys.modules.setdefault("openvino_telemetry", None)
pytest.importorskip("openvino", reason="OpenVINO export needs openvino and nncf: pip install edgeface[openvino]")
pytest.importorskip("nncf", reason="OpenVINO INT8 export needs nncf: pip install edgeface[openvino]")
pytest.importorskip("onnxsim", reason="OpenVINO export goes through ONNX: pip install edgeface[openvino]")

from edgeface.export import openvino as openvino_export  # noqa: E402
from edgeface.export.base import ExportRequest  # noqa: E402
from edgeface.export.pipeline import export_bundle  # noqa: E402
from edgeface.runtimes import open_runtime  # noqa: E402

from edgeface import Detector, EdgefaceError  # noqa: E402
from edgeface.cli import main  # noqa: E402
from edgeface.core.files import sha256_file  # noqa: E402

SIZE = (320, 320)
PRIORS = 2 * (40 * 40 + 20 * 20 + 10 * 10)
CALIB_N = 8


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, calib_dir):
    """Bundles exported on first use through the shared pipeline (conversion, manifest, parity), by name."""
    variants = {"fp32": dict(precision="fp32", imgsz=SIZE), "fp16-dynamic": dict(precision="fp16", dynamic=True),
                "int8": dict(precision="int8", imgsz=SIZE, calib_n=CALIB_N)}
    made = {}

    def get(name):
        if name not in made:
            made[name] = export_bundle("openvino", calib=calib_dir, progress=False,
                                       out=tmp_path_factory.mktemp("bundles") / name, **variants[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def torch_face(astronaut_path):
    faces = Detector(resize="fixed:320x320").detect(astronaut_path)
    assert len(faces) == 1
    return faces[0]


def _ir_ops(path: Path) -> set[str]:
    import openvino as ov

    return {op.get_type_name() for op in ov.Core().read_model(str(path / "model.xml")).get_ops()}


def test_fp32_bundle_contract(bundles):
    bundle = bundles("fp32")
    m = bundle.manifest
    assert m.target == "openvino" and m.precision == "fp32"
    assert m.files == {"model": "model.xml", "weights": "model.bin"}
    assert (bundle.path / "model.xml").is_file() and (bundle.path / "model.bin").stat().st_size > 1.5e6
    assert set(m.sha256) >= {"model.xml", "model.bin", "parity/reference.json"}
    assert m.input.name == "input" and m.input.shape == [1, 3, 320, 320] and m.input.layout == "NCHW"
    assert [(o.name, o.shape, o.dtype) for o in m.outputs] == [
        ("loc", [1, PRIORS, 4], "float32"), ("conf", [1, PRIORS, 2], "float32"),
        ("landmarks", [1, PRIORS, 10], "float32")]
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "openvino"
    assert m.parity["detection_agreement"] >= 0.99 and m.parity["max_abs_diff"]["conf"] < 1e-4
    assert m.converter["checks"]["openvino_vs_onnx_max_abs_diff"] < 1e-3
    assert m.converter["versions"]["openvino"] and m.converter["versions"]["nncf"]
    assert m.target_info["ir"]["compressed_to_fp16"] is False
    assert {"Convolution", "GroupConvolution", "Softmax"} <= set(m.target_info["ir"]["operators"])
    # the IR keeps the ONNX names: outputs are bound by name, never by position or shape
    import openvino as ov

    model = ov.Core().read_model(str(bundle.path / "model.xml"))
    assert [sorted(p.get_names()) for p in model.inputs] == [["input"]]
    assert {n for p in model.outputs for n in p.get_names()} == {"loc", "conf", "landmarks"}


def test_runtime_through_the_detector(bundles, astronaut_path, torch_face):
    detector = Detector(model=bundles("fp32").path)  # the default runtime of the target, with its self-check
    assert detector.runtime.name == "openvino"
    face = detector.detect(astronaut_path)[0]
    assert face.box == pytest.approx(torch_face.box, abs=0.05)
    assert face.score == pytest.approx(torch_face.score, abs=1e-5)
    info = detector.runtime.describe()
    assert info["execution_devices"] == ["CPU"] and "f32" in str(info["inference_precision_hint"]).lower()


def test_threads_and_concurrent_calls(bundles):
    runtime = open_runtime("openvino", model=bundles("fp32").path, threads=1)
    assert runtime.describe()["inference_num_threads"] == 1
    batches = [np.random.default_rng(i).normal(0, 50, (1, 3, 320, 320)).astype(np.float32) for i in range(4)]
    expected = [runtime.infer(b) for b in batches]
    got = [None] * 4

    def work(i):
        for _ in range(3):
            got[i] = runtime.infer(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, have in zip(expected, got):
        assert all(np.array_equal(want[k], have[k]) for k in ("loc", "conf", "landmarks"))
    runtime.close()


def test_fp16_dynamic_runs_at_any_size(bundles, astronaut_path):
    bundle = bundles("fp16-dynamic")
    m = bundle.manifest
    assert m.input.shape == ["batch", 3, "height", "width"] and m.preprocessing["resize"] == "original"
    assert m.dynamic["height"] == [32, 640, 2048] and m.target_info["ir"]["compressed_to_fp16"] is True
    assert m.parity["status"] == "passed"
    assert (bundle.path / "model.bin").stat().st_size < 0.6 * 1.75e6  # FP16 weights: half of FP32's
    for policy in ("original", "fixed:256x384"):
        want = Detector(resize=policy).detect(astronaut_path)
        got = Detector(model=bundle.path, resize=policy).detect(astronaut_path)
        assert len(got) == len(want) == 1 and got[0].box == pytest.approx(want[0].box, abs=0.5)
    import cv2

    image = cv2.imread(str(astronaut_path))
    assert [len(f) for f in Detector(model=bundle.path).detect([image, image[:300, :350]])] == [1, 1]


def test_int8_is_quantised_by_nncf_with_the_recipe(bundles):
    bundle = bundles("int8")
    m = bundle.manifest
    calibration = m.calibration
    assert calibration["tool"] == "nncf.quantize" and calibration["images"] == CALIB_N
    assert calibration["preset"] == "mixed" and calibration["keep_float"] == ["heads", "/body/stage1/"]
    kept = calibration["nodes_kept_float"]
    # the nine head convolutions and stage1's, nothing else
    assert sum("Head." in n for n in kept) == 9 and all("Head." in n or n.startswith("/body/stage1/") for n in kept)
    assert calibration["quantizable_nodes"] > len(kept)
    assert "FakeQuantize" in _ir_ops(bundle.path)
    assert m.parity["status"] == "passed"
    assert (bundle.path / "model.bin").stat().st_size < 0.6 * 1.75e6  # int8 weights


def test_a_bad_recipe_fails_and_writes_nothing(tmp_path, calib_dir):
    with pytest.raises(EdgefaceError, match=r"keep_float '/bodyy/' names no node of the model"):
        export_bundle("openvino", precision="int8", imgsz=SIZE, calib=calib_dir, calib_n=2, progress=False,
                      options={"keep_float": ["heads", "/bodyy/"]}, out=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EdgefaceError, match=r"option 'preset' 'fast' is not supported: give mixed, performance"):
        export_bundle("openvino", precision="int8", options={"preset": "fast"}, out=tmp_path / "c", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_accuracy_control_needs_ground_truth_and_a_number(monkeypatch):
    monkeypatch.setattr(openvino_export, "default_image_dir", lambda: None)
    request = ExportRequest(target="openvino", precision="int8", input_hw=SIZE, options={"max_drop": "1.0"})
    with pytest.raises(EdgefaceError, match=r"--max-drop validates on WIDER FACE images with ground truth"):
        openvino_export._quantize_with_accuracy_control(None, None, None, None, request, 1.0, {})
    for bad in ("one", -1, True):
        with pytest.raises(EdgefaceError, match=r"--max-drop .*: give the largest AP drop to accept, in AP points"):
            openvino_export._max_drop(bad)
    assert openvino_export._max_drop("1.5") == 1.5


def _lying_copy(bundle, tmp_path, edit):
    copy = Path(shutil.copytree(bundle.path, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["input"].update(name="image"), r"manifest field input.name is 'image', but the model's inputs "
                                                r"are \['input'\]"),
    (lambda m: m["outputs"][1].update(dtype="float16"), r"manifest field outputs\[1\] has dtype 'float16', but the "
                                                       r"model's is 'float32'"),
], ids=["input-name", "output-dtype"])
def test_the_runtime_refuses_a_manifest_that_lies(bundles, tmp_path, edit, message):
    copy = _lying_copy(bundles("fp32"), tmp_path, edit)
    with pytest.raises(EdgefaceError, match=message):
        open_runtime("openvino", model=copy)


def test_a_swapped_model_file_is_refused(bundles, tmp_path):
    """Another IR under the manifest (hashes rewritten): refused before it runs, by the model's own shapes."""
    copy = _lying_copy(bundles("fp32"), tmp_path, lambda m: None)
    for name in ("model.xml", "model.bin"):
        shutil.copy(bundles("fp16-dynamic").path / name, copy / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sha256"].update({n: sha256_file(copy / n) for n in ("model.xml", "model.bin")})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match=r"manifest field input has shape \[1, 3, 320, 320\], but the model's is"):
        open_runtime("openvino", model=copy)
    (copy / "model.xml").write_bytes(b"\x00not xml")
    manifest["sha256"]["model.xml"] = sha256_file(copy / "model.xml")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match=r"is not an OpenVINO IR \(XML\) file"):
        open_runtime("openvino", model=copy)


def test_a_device_that_is_not_here_is_named(bundles):
    import openvino as ov

    available = ov.Core().available_devices
    if "NPU" in available:
        pytest.skip("this machine has an NPU")
    with pytest.raises(EdgefaceError, match=r"OpenVINO device NPU is not available here \(available: .*CPU"):
        open_runtime("openvino", model=bundles("fp32").path, device="npu")
    with pytest.raises(EdgefaceError, match=r"unknown device 'tpu' for the openvino runtime: use cpu, gpu, gpu:N, "
                       r"npu"):
        open_runtime("openvino", model=bundles("fp32").path, device="tpu")


def test_cli_run_and_compare(bundles, astronaut_path, capsys):
    bundle = bundles("fp32").path
    assert main(["run", "--model", str(bundle), "--source", str(astronaut_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and len(lines[0]["faces"]) == 1
    folder = astronaut_path.parent
    assert main(["compare", str(bundles("int8").path), f"{bundle}@openvino", "--images", str(folder),
                 "--limit", "1"]) == 0


def test_no_telemetry_at_run_time(bundles, tmp_path):
    """With openvino-telemetry installed, `import openvino` alone would post to Google Analytics (a DNS query and
    ~/intel/openvino_ga_cid): the runtime imports OpenVINO with the telemetry package blocked."""
    script = f"""
import sys
from edgeface.runtimes import open_runtime
import numpy as np
rt = open_runtime("openvino", model={str(bundles("fp32").path)!r})
rt.infer(np.zeros((1, 3, 320, 320), np.float32))
print(sys.modules.get("openvino_telemetry", "absent"))
"""
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # the telemetry package itself stays quiet in CI: test the ordinary case
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None"
    assert not (tmp_path / "intel").exists()
