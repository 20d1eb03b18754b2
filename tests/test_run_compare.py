"""`edgeface run` (image, folder, video, camera) and `edgeface compare`, and the same real-image battery on every
runtime that runs here."""

import json

import cv2
import numpy as np
import pytest
from edgeface.export.pipeline import export_bundle

from edgeface import Detector, EdgefaceError
from edgeface.cli import main
from edgeface.evaluation.accuracy import default_image_dir

pytest.importorskip("onnxsim", reason="needs the onnx extra: pip install edgeface[onnx]")


@pytest.fixture(scope="module")
def images(tmp_path_factory, astronaut_path):
    """Real photographs: the shared WIDER images when present, else crops of the bundled one."""
    if default_image_dir():
        return default_image_dir()
    folder = tmp_path_factory.mktemp("images")
    image = cv2.imread(str(astronaut_path))
    for i, (y, x) in enumerate([(0, 0), (40, 60), (100, 20)]):
        cv2.imwrite(str(folder / f"{i}.jpg"), image[y:y + 400, x:x + 380])
    return folder


@pytest.fixture(scope="module")
def video(tmp_path_factory, astronaut_path):
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    image = cv2.imread(str(astronaut_path))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 512))
    for shift in range(6):
        writer.write(np.roll(image, 4 * shift, axis=1))
    writer.release()
    return path


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, images):
    return export_bundle("onnx", imgsz=(320, 320), calib=images, out=tmp_path_factory.mktemp("b") / "onnx",
                         progress=False).path


def test_run_video_writes_frames_and_json_lines(video, tmp_path, capsys):
    assert main(["run", "--source", str(video), "--save", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["frame"] for r in lines] == [f"clip_{i:06d}" for i in range(1, 7)]
    assert all(len(r["faces"]) == 1 and set(r["ms"]) == {"decode", "pre", "infer", "post"} for r in lines)
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == [f"clip_{i:06d}.jpg" for i in range(1, 7)]


def test_run_reports_fps_and_stage_times(video, capsys):
    main(["run", "--source", str(video)])
    err = capsys.readouterr().err
    assert "end of stream after 6 frame(s), 6 face(s)" in err
    assert "fps, decode" in err and "pre" in err and "infer" in err and "post" in err


def test_run_bundle_on_a_folder(onnx_bundle, images, tmp_path, capsys):
    assert main(["run", "--model", str(onnx_bundle), "--source", str(images), "--save", str(tmp_path)]) == 0
    assert "onnx/fp32 (onnxruntime)" in capsys.readouterr().err
    assert len(list(tmp_path.rglob("*.jpg"))) > 0


def test_run_stops_cleanly_on_ctrl_c(video, monkeypatch, capsys):
    import edgeface.inference.stream

    real = edgeface.inference.stream.frames

    def interrupted(source):
        for index, item in enumerate(real(source)):
            if index == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(edgeface.inference.stream, "frames", interrupted)
    assert main(["run", "--source", str(video)]) == 130
    assert "interrupted after 2 frame(s)" in capsys.readouterr().err


@pytest.mark.parametrize("source, message", [("camera:9", "could not open camera 9"),
                                             ("no/such.mp4", "no such image, folder or video")])
def test_run_bad_sources(source, message, capsys):
    assert main(["run", "--source", source]) == 2
    assert message in capsys.readouterr().err


def test_compare_torch_and_a_bundle(onnx_bundle, images, tmp_path, capsys):
    assert main(["compare", "torch", str(onnx_bundle), "--images", str(images), "--limit", "5",
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 5 and report["detection_agreement"] == 1.0 and report["landmark_error"] < 1e-4
    assert "torch/fp32 (torch) vs retinaface_mnet025 onnx/fp32 (onnxruntime)" in capsys.readouterr().out


def _battery(runtime, model, images, device="cpu", conf_tolerance=1e-3):
    """The checks every backend must pass against the torch reference on real images."""
    from edgeface.core.images import list_images, load_image
    from edgeface.core.parity import compare

    candidate = Detector(runtime=runtime, model=model, threads=2, device=device, score_threshold=0.3)
    reference = Detector(resize=candidate.resize, score_threshold=0.3)
    report = compare(reference, candidate, [load_image(p) for p in list_images(images)[:6]]).check("fp32")
    assert report.passed, report.summary()
    assert report.max_abs_diff["conf"] < conf_tolerance
    assert candidate.runtime.describe()["runtime"] == runtime
    return candidate


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "tflite"])
def test_every_local_runtime_passes_the_battery(runtime, onnx_bundle, images, tmp_path, astronaut_path):
    model = None
    if runtime == "onnxruntime":
        model = onnx_bundle
    elif runtime == "tflite":
        pytest.importorskip("litert_torch", reason="needs the tflite extra: pip install edgeface[tflite]")
        model = export_bundle("tflite", imgsz=(320, 320), calib=images, out=tmp_path / "t", progress=False).path
    candidate = _battery(runtime, model, images)
    faces = candidate.detect(astronaut_path)
    assert len([f for f in faces if f.score > 0.5]) == 1


def test_torch_on_cuda_passes_the_battery(images, astronaut_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no NVIDIA GPU visible to PyTorch on this machine")
    # cuDNN may use TF32 convolutions on CUDA: scores differ from the CPU in the 4th decimal, detections do not.
    candidate = _battery("torch", None, images, device="cuda", conf_tolerance=1e-2)
    assert candidate.runtime.describe()["device"].startswith("cuda")


def test_runtimes_that_do_not_run_the_bundle_say_which_do(onnx_bundle):
    from edgeface.runtimes import open_runtime

    for runtime in ("coreml", "tensorrt", "tflite"):
        with pytest.raises(EdgefaceError, match="is an onnx bundle; runtimes that run it: onnxruntime$"):
            open_runtime(runtime, model=onnx_bundle)


def test_detections_made_elsewhere_are_compared_from_detect_json(astronaut_path, tmp_path, capsys):
    """What the arm64 check does with the JSON lines of two machines."""
    import shutil

    from edgeface.core.parity import compare_detections, read_detections

    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(astronaut_path, images / "a.jpg")
    (images / "b.jpg").write_bytes(b"not an image")
    assert main(["detect", str(images), "--json", "--threshold", "0.3"]) == 2  # b.jpg fails: its record has error
    lines = tmp_path / "x86.jsonl"
    lines.write_text(capsys.readouterr().out)
    found = read_detections(lines)
    assert sorted(found) == ["a.jpg"] and len(found["a.jpg"]) >= 1
    same = compare_detections([(found["a.jpg"], found["a.jpg"])])
    assert same.detection_agreement == 1.0 and same.landmark_error == 0.0 and same.extra_faces == 0
    moved = found["a.jpg"].__class__(found["a.jpg"].boxes + 30, found["a.jpg"].scores, found["a.jpg"].landmarks)
    assert compare_detections([(found["a.jpg"], moved)]).detection_agreement < 1.0
    lines.write_text(lines.read_text() + '{"image": "c.jpg", "faces": [{"box": [1, 2]}]}\n')
    with pytest.raises(EdgefaceError, match=r"x86.jsonl:3: field faces\[0\].box"):
        read_detections(lines)
