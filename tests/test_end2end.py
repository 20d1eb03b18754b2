"""End-to-end ONNX models (`export --target onnx --end2end`): decode, threshold, top-k and NMS in the graph give
the host pipeline's faces, by name, with no host post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgeface.export.pipeline import export_bundle  # noqa: E402

from edgeface import Detector  # noqa: E402
from edgeface.cli import build_parser, main  # noqa: E402
from edgeface.core.bundle import load_bundle  # noqa: E402
from edgeface.core.errors import EdgefaceError  # noqa: E402
from edgeface.core.images import list_images, load_image  # noqa: E402
from edgeface.core.parity import compare  # noqa: E402
from edgeface.core.processing import ResizePolicy, preprocess  # noqa: E402

SIZE = (320, 320)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, calib_dir):
    """FP32 and INT8 end-to-end ONNX bundles of the default weights at 320 x 320."""
    root = tmp_path_factory.mktemp("end2end")
    return {precision: export_bundle("onnx", precision=precision, imgsz=SIZE, out=root / precision, progress=False,
                                     calib=calib_dir, calib_n=4, options={"end2end": True})
            for precision in ("fp32", "int8")}


@pytest.fixture(scope="module")
def images(astronaut_path, calib_dir):
    """The bundled photograph, 10 WIDER val images (crops of the photograph without ../shared), a blank frame (no
    prior above any threshold: the graph's empty paths)."""
    return [load_image(p) for p in [astronaut_path, *list_images(calib_dir)[::60][:10]]] + [
        np.zeros((240, 320, 3), np.uint8)]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_end2end_model_gives_the_host_pipelines_faces(bundles, images, precision):
    bundle = bundles[precision]
    manifest = bundle.manifest
    assert manifest.files["end2end"] == "model_end2end.onnx"
    described = manifest.target_info["end2end"]
    check = described["check"]
    assert check["status"] == "passed" and check["faces"] > 0 and check["max_abs_diff_px"] < 0.01
    # at the protocol's threshold (0.02: hundreds of faces, NMS busy) and the default one
    for threshold in (0.02, 0.5):
        host = Detector(model=bundle.path, score_threshold=threshold)
        graph = Detector(model=bundle.path, score_threshold=threshold, end2end=True)
        total = 0
        for image in images:
            want, got = host.detect_arrays([image])[0], graph.detect_arrays([image])[0]
            assert len(got) == len(want)
            np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)
            np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-2)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            total += len(want)
        assert total > len(images) and len(graph.detect_arrays([images[-1]])[0]) == 0
        report = compare(host, graph, images)
        assert report.detection_agreement == 1.0 and report.extra_faces == 0 and report.landmark_error < 1e-4


def test_an_app_reads_the_end2end_model_through_the_manifest_alone(bundles, astronaut_path):
    """What a mobile app does: the manifest's input description and target_info.end2end, plain onnxruntime."""
    bundle = bundles["fp32"]
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    described = manifest["target_info"]["end2end"]
    session = ort.InferenceSession(str(bundle.path / manifest["files"]["end2end"]))
    assert sorted(i.name for i in session.get_inputs()) == sorted(described["inputs"])
    assert [o.name for o in session.get_outputs()] == list(described["outputs"])
    image = load_image(astronaut_path)
    h, w = described["input_hw"]
    batch, (letterbox,) = preprocess([image], policy=ResizePolicy("fixed", (h, w)),
                                     mean_bgr=tuple(manifest["preprocessing"]["mean_bgr"]))
    feeds = {"input": batch, **{name: np.array(spec["default"], np.float32)
                                for name, spec in described["inputs"].items() if name != "input"}}
    boxes, scores, landmarks, count = session.run(None, feeds)
    assert int(count[0]) == len(scores) == len(boxes) == len(landmarks) >= 1
    faces = Detector(model=bundle.path).detect(image)
    assert len(faces) == len(scores)
    np.testing.assert_allclose(boxes / letterbox.scale, [f.box for f in faces], atol=0.5)


def test_end2end_refusals(bundles, tmp_path, capsys):
    assert main(["export", "--target", "onnx", "--dynamic", "--end2end", "--out", str(tmp_path / "b1")]) == 2
    assert "--end2end needs a static input size" in capsys.readouterr().err
    assert main(["export", "--target", "tflite", "--end2end", "--out", str(tmp_path / "b2")]) == 2
    assert "--end2end is not an option of the tflite target (targets that take it: onnx, openvino)" in \
        capsys.readouterr().err
    plain = export_bundle("onnx", imgsz=SIZE, out=tmp_path / "plain", progress=False)
    with pytest.raises(EdgefaceError, match="has no end-to-end model: export it with `edgeface export --target onnx "
                                            "--imgsz 320x320 --end2end`") as info:  # the bundle's own size
        Detector(model=plain.path, end2end=True)
    suggested = str(info.value).split("`")[1].split()
    assert build_parser().parse_args(suggested[1:]).imgsz == [(320, 320)]
    assert main(["detect", str(tmp_path), "--end2end"]) == 2
    assert "--end2end runs a bundle's end-to-end model: give --model BUNDLE" in capsys.readouterr().err
    with pytest.raises(EdgefaceError, match="keeps top_k 5000 and keep_top_k 750 fixed"):
        Detector(model=bundles["fp32"].path, end2end=True, keep_top_k=10)
    with pytest.raises(EdgefaceError, match="end2end is not an option of the torch runtime"):
        Detector(runtime="torch", end2end=True)
    opened = Detector(model=bundles["fp32"].path).runtime  # without end2end
    with pytest.raises(EdgefaceError, match="a runtime opened without it"):
        Detector(runtime=opened, end2end=True)
    assert main(["bench", "--all", "--end2end"]) == 2
    assert "bench --all exports and runs the standard bundles" in capsys.readouterr().err
    assert not any((tmp_path / f"b{i}").exists() for i in (1, 2))


def test_a_manifest_whose_end2end_parts_disagree_is_refused(bundles, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundles["fp32"].path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["target_info"]["end2end"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match="files.end2end and target_info.end2end must come together"):
        load_bundle(copy)


def test_openvino_end2end_gives_the_host_pipelines_faces(tmp_path, images):
    """The same appended graph converted to OpenVINO IR (its NMS op), FP32 and FP16, run by the openvino runtime."""
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install edgeface[openvino]")
    for precision in ("fp32", "fp16"):
        bundle = export_bundle("openvino", precision=precision, imgsz=SIZE, out=tmp_path / precision,
                               progress=False, options={"end2end": True})
        files = bundle.manifest.files
        assert (files["end2end"], files["end2end_weights"]) == ("model_end2end.xml", "model_end2end.bin")
        check = bundle.manifest.target_info["end2end"]["check"]
        assert check["status"] == "passed" and check["faces"] > 0 and check["against"].startswith("OpenVINO")
        for threshold in (0.02, 0.5):
            host = Detector(model=bundle.path, score_threshold=threshold)
            graph = Detector(model=bundle.path, score_threshold=threshold, end2end=True)
            assert graph.runtime.name == "openvino" and graph.runtime.end2end
            report = compare(host, graph, images)
            assert report.detection_agreement == 1.0 and report.extra_faces == 0, report.summary()
            assert report.landmark_error < 1e-3, report.summary()
            assert len(graph.detect_arrays([images[-1]])[0]) == 0  # the blank frame: no face, no error
            host.close()
            graph.close()
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    del manifest["files"]["end2end_weights"]
    (bundle.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match="files.end2end and files.end2end_weights must come together"):
        load_bundle(bundle.path)


def test_openvino_int8_end2end_is_refused_before_any_work(tmp_path, capsys):
    pytest.importorskip("openvino", reason="needs the openvino extra: pip install edgeface[openvino]")
    out = tmp_path / "int8"
    # before calibration: the calibration folder is not even read
    assert main(["export", "--target", "openvino", "--precision", "int8", "--imgsz", "320x320", "--end2end",
                 "--calib", str(tmp_path / "no-such-folder"), "--out", str(out)]) == 2
    assert "--end2end with the openvino target is for fp32 and fp16" in capsys.readouterr().err
    assert main(["export", "--target", "openvino", "--dynamic", "--end2end", "--out", str(out)]) == 2
    assert "--end2end needs a static input size" in capsys.readouterr().err
    assert not out.exists()
