"""Reliability gaps found in review (issue 9), each with the failing input made here and the right value asserted:
calibration read one image at a time (and unreadable files skipped in one line), devices validated per runtime,
a Detector that fails after opening its runtime closes it, a malformed parity/reference.json refused in one line
naming the field, bench reports of the wrong shape refused in one line, and the fuzz battery never clearing a
folder it did not make."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
from edgeface.runtimes import get_runtime_class, list_runtimes, open_runtime

from edgeface import Detector, EdgefaceError
from edgeface.core.bundle import load_bundle, write_manifest
from edgeface.core.errors import first_line
from edgeface.core.images import load_image
from edgeface.core.processing import ResizePolicy, preprocess

SIZE = (96, 96)  # the smallest multiple of 32 at which the FP32 model finds the astronaut (score 0.97)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ------------------------------------------------------------------------------------ 1. calibration, one at a time
def _calibration_folder(folder: Path, astronaut_path: Path) -> tuple[list[Path], list[Path]]:
    """Good photographs and broken files in sorted (list_images) order: (good, bad)."""
    import cv2

    folder.mkdir()
    photo = cv2.imread(str(astronaut_path))
    good = [folder / "a-photo.jpg", folder / "c-mirrored.png", folder / "e-small.jpg"]
    shutil.copy(astronaut_path, good[0])
    cv2.imwrite(str(good[1]), photo[:, ::-1])
    cv2.imwrite(str(good[2]), cv2.resize(photo, None, fx=0.5, fy=0.5))
    bad = [folder / "b-empty.jpg", folder / "d-text.jpg", folder / "f-truncated.png", folder / "g-io-error.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image\n")
    bad[2].write_bytes(good[1].read_bytes()[:60])
    shutil.copy(astronaut_path, bad[3])  # a good file whose read fails with an OSError (a disk error, below)
    return good, bad


def test_calibration_reads_one_image_at_a_time_and_skips_unreadable_files(tmp_path, astronaut_path, monkeypatch):
    from edgeface.export import pipeline

    from edgeface.core.images import list_images
    from edgeface.models import get_model

    good, bad = _calibration_folder(tmp_path / "calib", astronaut_path)
    model = get_model("retinaface_mnet025", weights=None)  # preprocessing needs only its mean
    policy = ResizePolicy("fixed", (64, 64))
    # The tensors the quantiser got before the change: every image decoded, then each pre-processed, in order.
    expected = [preprocess([load_image(p)], policy=policy, mean_bgr=model.config.mean_bgr)[0] for p in good]

    alive: list[weakref.ref] = []

    def load(path):
        if Path(path) == bad[3]:
            raise OSError(5, "Input/output error\nsecond line of a C library's report")
        gc.collect()
        held = sum(ref() is not None for ref in alive)
        assert held == 0, f"{held} decoded calibration image(s) still in memory while reading {path}"
        image = load_image(path)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(pipeline, "load_image", load)
    lines: list[str] = []
    tensors, with_faces = pipeline.calibration_tensors(model, list_images(tmp_path / "calib"), policy, lines.append)
    assert len(tensors) == 3 and all(t.shape == (1, 3, 64, 64) and t.dtype == np.float32 for t in tensors)
    assert all(np.array_equal(t, e) for t, e in zip(tensors, expected))  # same images, order and preprocessing
    assert with_faces == 0  # not counted unless asked
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    for line, path in zip(lines, bad):
        assert line.startswith("skipping") and str(path) in line, (line, path)
    assert lines[3] == f"skipping calibration image {bad[3]}: [Errno 5] Input/output error"  # its first line


def test_calibration_folder_with_no_readable_image_is_one_clear_error(tmp_path, astronaut_path):
    from edgeface.export.pipeline import export_bundle

    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "empty.jpg").write_bytes(b"")
    (calib / "text.png").write_text("hello")
    with pytest.raises(EdgefaceError) as info:
        export_bundle("onnx", precision="int8", imgsz=SIZE, calib=calib, verify=False, progress=False,
                      out=tmp_path / "out")
    message = _one_line(info)
    assert message.startswith("none of the 2 calibration images under") and str(calib) in message
    assert not (tmp_path / "out").exists()


def test_int8_export_skips_a_broken_calibration_file_with_one_line(tmp_path, astronaut_path, capsys):
    from edgeface.export.pipeline import export_bundle

    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(astronaut_path, calib / "a.jpg")
    (calib / "b.jpg").write_bytes(astronaut_path.read_bytes()[:300])  # truncated
    bundle = export_bundle("onnx", precision="int8", imgsz=SIZE, calib=calib, verify=False, out=tmp_path / "out")
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and str(calib / "b.jpg") in skipped[0] and "Traceback" not in err
    assert "calibrating on 1 images" in err
    assert bundle.manifest.calibration["images"] == 1 and bundle.manifest.calibration["images_with_faces"] == 1


# ------------------------------------------------------------------------------------------ 2. devices per runtime
def test_every_runtime_declares_its_devices_and_takes_the_default():
    for name in list_runtimes():
        cls = get_runtime_class(name)
        assert "cpu" in cls.devices, name  # every command's default (--device cpu)
        cls.check_device("cpu")
        cls.check_device(None)
        with pytest.raises(EdgefaceError) as info:
            cls.check_device("banana")
        assert _one_line(info) == (f"unknown device 'banana' for the {name} runtime: use "
                                   f"{', '.join(cls.devices)}")


@pytest.mark.parametrize("device", ["ane", "ANE", "gpu", "ne", "cpu_and_ne", "cpu_only", "cpu_and_gpu", "all",
                                    "CPU_AND_NE", "cpu"])
def test_core_ml_compute_units_pass_the_device_check(device):
    from edgeface.runtimes.coreml import COMPUTE_UNITS

    # open_runtime checks the device first; the next refusal is the missing bundle, not the device
    with pytest.raises(EdgefaceError) as info:
        open_runtime("coreml", device=device)
    assert "needs a bundle" in _one_line(info)
    assert device.lower() in COMPUTE_UNITS


@pytest.mark.parametrize("runtime, device, named", [
    ("coreml", "cuda", "cpu, all, cpu_only, cpu_and_gpu, cpu_and_ne, gpu, ne, ane"),
    ("tflite", "cuda", "use cpu"),
    ("tflite", "ane", "use cpu"),
    ("torch", "ane", "use cpu, cuda, cuda:N"),
    ("torch", "cuda:x", "use cpu, cuda, cuda:N"),
    ("onnxruntime", "ane", "use cpu, cuda, cuda:N, tensorrt, coreml, xnnpack"),
    ("tensorrt", "cuda:1", "use cpu, cuda, cuda:0"),
])
def test_a_device_a_runtime_does_not_take_is_refused_naming_its_devices(runtime, device, named, tmp_path):
    with pytest.raises(EdgefaceError) as info:
        open_runtime(runtime, model=tmp_path / "not-read", device=device)  # refused before the bundle is read
    message = _one_line(info)
    assert message.startswith(f"unknown device {device!r} for the {runtime} runtime") and named in message


def test_devices_each_runtime_takes_are_accepted():
    for runtime, device in (("torch", "cuda:3"), ("onnxruntime", "xnnpack"), ("onnxruntime", "cuda:1"),
                            ("tensorrt", "cuda"), ("tflite", "cpu")):
        get_runtime_class(runtime).check_device(device)
    with pytest.raises(EdgefaceError, match="unknown device 'ane' for the torch runtime"):
        Detector(device="ane")  # the default runtime (torch) has no Core ML units


# -------------------------------------------------------------------------- 3. and 4. a bundle and its reference
@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from edgeface.export.pipeline import export_bundle

    return export_bundle("onnx", precision="fp32", imgsz=SIZE, verify=False, progress=False,
                         out=tmp_path_factory.mktemp("bundle") / "onnx").path


@pytest.fixture
def copy(bundle_dir, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


@pytest.fixture
def opened(monkeypatch):
    """The runtimes Detector opens, to see whether they were closed."""
    import edgeface.inference.detector as detector_module

    runtimes = []
    real = detector_module.open_runtime

    def spy(*args, **kwargs):
        runtimes.append(real(*args, **kwargs))
        return runtimes[-1]

    monkeypatch.setattr(detector_module, "open_runtime", spy)
    return runtimes


def _rewrite_reference(bundle: Path, change, *, rehash: bool = True) -> None:
    file = bundle / "parity" / "reference.json"
    data = json.loads(file.read_text())
    new = change(data)
    file.write_text(new if isinstance(new, str) else json.dumps(data if new is None else new))
    if rehash:
        write_manifest(bundle, load_bundle(bundle, verify=False).manifest)


def test_a_detector_that_fails_its_fixed_size_check_closes_its_runtime(copy, opened):
    with pytest.raises(EdgefaceError, match="fixed input size"):
        Detector(model=copy, resize="fixed:128x128")
    (runtime,) = opened
    assert runtime.session is None  # closed: its onnxruntime session released


def test_a_detector_that_fails_its_self_check_closes_its_runtime(copy, opened):
    far_away = {"box": [0.0, 0.0, 6.0, 6.0], "score": 0.99,
                "landmarks": {n: [1.0, 1.0] for n in LANDMARKS}}

    def swap(data):
        data["images"][0]["faces"] = [far_away]

    _rewrite_reference(copy, swap)
    with pytest.raises(EdgefaceError, match="does not reproduce its own reference"):
        Detector(model=copy)
    _rewrite_reference(copy, lambda data: {**data, "images": [{"image": "00.jpg"}]})
    with pytest.raises(EdgefaceError, match="faces"):
        Detector(model=copy)
    assert len(opened) == 2 and all(runtime.session is None for runtime in opened)


def test_a_runtime_passed_in_stays_open_and_a_good_bundle_keeps_its_runtime(copy, opened):
    runtime = open_runtime(model=copy)
    with pytest.raises(EdgefaceError, match="fixed input size"):
        Detector(runtime=runtime, model=copy, resize="fixed:128x128")
    assert runtime.session is not None  # the caller's, not closed behind its back
    detector = Detector(model=copy)
    assert detector.runtime.session is not None and detector.detect(np.zeros((64, 64, 3), np.uint8)) == []
    detector.close()
    runtime.close()


LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
FACE = {"box": [10.0, 10.0, 30.0, 34.0], "score": 0.9, "landmarks": {n: [15.0, 20.0] for n in LANDMARKS}}


def _face(**change):
    face = json.loads(json.dumps(FACE))
    for key, value in change.items():
        if key in LANDMARKS:
            face["landmarks"][key] = value
        elif value is _DROP:
            face.pop(key)
        else:
            face[key] = value
    return face


_DROP = object()
MALFORMED = {
    "top-level-list": (lambda d: [d], "(top level)"),
    "top-level-null": (lambda d: "null", "(top level)"),
    "nested-deep": (lambda d: "[" * 100000 + "]" * 100000, "nested too deeply"),
    "not-json": (lambda d: "{'images': ", "cannot be read as JSON"),
    "resize-missing": (lambda d: d.pop("resize") and d, "field resize"),
    "resize-number": (lambda d: {**d, "resize": 640}, "field resize"),
    "resize-unknown": (lambda d: {**d, "resize": "huge"}, "field resize"),
    "images-missing": (lambda d: d.pop("images") and d, "field images"),
    "images-object": (lambda d: {**d, "images": {"0": 1}}, "field images"),
    "images-empty": (lambda d: {**d, "images": []}, "field images"),
    "record-string": (lambda d: {**d, "images": ["00.jpg"]}, "field images[0]"),
    "image-missing": (lambda d: {**d, "images": [{"faces": []}]}, "field images[0].image"),
    "image-number": (lambda d: {**d, "images": [{"image": 7, "faces": []}]}, "field images[0].image"),
    "image-nul": (lambda d: {**d, "images": [{"image": "00.jpg\x00x", "faces": []}]}, "field images[0].image"),
    "image-absolute": (lambda d: {**d, "images": [{"image": "/etc/passwd", "faces": []}]},
                       "images[0].image '/etc/passwd' points outside the bundle"),
    "image-dotdot": (lambda d: {**d, "images": [{"image": "../../../../etc/hostname", "faces": []}]},
                     "points outside the bundle"),
    "faces-missing": (lambda d: {**d, "images": [{"image": "00.jpg"}]}, "field images[0].faces"),
    "faces-object": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": {}}]}, "field images[0].faces"),
    "face-number": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [3]}]}, "field images[0].faces[0]"),
    "box-missing": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=_DROP)]}]},
                    "field images[0].faces[0].box"),
    "box-three": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=[1, 2, 3])]}]},
                  "field images[0].faces[0].box"),
    "box-strings": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=["1", 2, 3, 4])]}]},
                    "field images[0].faces[0].box"),
    "box-empty-area": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=[5, 5, 5, 9])]}]},
                       "field images[0].faces[0].box"),
    "box-huge": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=[1, 2, 3, 10 ** 400])]}]},
                 "field images[0].faces[0].box"),
    "box-nan": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(box=[1, 2, float("nan"), 9])]}]},
                "field images[0].faces[0].box"),
    "score-string": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [FACE, _face(score="high")]}]},
                     "field images[0].faces[1].score"),
    "score-bool": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(score=True)]}]},
                   "field images[0].faces[0].score"),
    "landmarks-list": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(landmarks=[1, 2])]}]},
                       "field images[0].faces[0].landmarks"),
    "nose-missing": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(nose=None)]}]},
                     "field images[0].faces[0].landmarks.nose"),
    "nose-three": (lambda d: {**d, "images": [{"image": "00.jpg", "faces": [_face(nose=[1, 2, 3])]}]},
                   "field images[0].faces[0].landmarks.nose"),
}


@pytest.fixture(scope="module")
def candidate(bundle_dir):
    detector = Detector(model=bundle_dir, self_check=False)
    yield detector
    detector.close()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_reference_is_one_line_naming_the_file_and_field(name, copy, candidate):
    from edgeface.core.parity import compare_to_reference

    change, field = MALFORMED[name]
    _rewrite_reference(copy, change, rehash=False)
    with pytest.raises(EdgefaceError) as info:
        compare_to_reference(candidate, copy)
    message = _one_line(info)
    assert "parity/reference.json" in message and field in message, message


def test_a_reference_image_linked_out_of_the_bundle_is_refused(copy, candidate, tmp_path, astronaut_path):
    from edgeface.core.parity import compare_to_reference

    outside = tmp_path / "outside.jpg"
    shutil.copy(astronaut_path, outside)
    (copy / "parity" / "link.jpg").symlink_to(outside)
    _rewrite_reference(copy, lambda d: {**d, "images": [{"image": "link.jpg", "faces": []}]}, rehash=False)
    with pytest.raises(EdgefaceError, match=r"images\[0\].image 'parity/link.jpg' points outside the bundle"):
        compare_to_reference(candidate, copy)


def test_a_well_formed_reference_still_compares(copy, candidate):
    from edgeface.core.parity import compare_to_reference, read_reference

    policy, records = read_reference(copy)
    assert str(policy) == "fixed:96x96" and [p.name for p, _ in records] == ["00.jpg"]
    report = compare_to_reference(candidate, copy).check("fp32")
    assert report.passed and report.images == 1 and report.reference_faces == report.matched_faces == 1


# ------------------------------------------------------------------------------------- 5. bench reports, wrong shape
def _report(**change):
    from edgeface.benchmarks.bench import report

    record = report([{"name": "onnx-int8", "status": "ok", "target": "onnx", "precision": "int8",
                      "runtime": {"runtime": "onnxruntime"}, "size_bytes": 640_000,
                      "latency": [{"size": "vga", "image": [480, 640], "input": [480, 640],
                                   "total_ms": {"p50": 20.0, "p90": 21.0, "p99": 22.0}, "infer_ms": {"p50": 19.0},
                                   "fps": 50.0}],
                      "accuracy": {"num_images": 3, "ap": {"easy": 0.9, "medium": 0.8, "hard": 0.7},
                                   "delta_ap": {"easy": -0.001, "medium": 0.0, "hard": None},
                                   "pr_curves": {"easy": [[1.0, 0.1], [0.9, 0.2]]}}},
                     {"name": "coreml-fp16", "target": "coreml", "precision": "fp16", "status": "exported",
                      "reason": "Core ML runs on Apple platforms only"}],
                    device={"hostname": "pi", "board": None, "cores": 4, "cpu": "Cortex-A76", "os": "Linux",
                            "gpu": None, "libraries": {"edgeface": "0.1.0", "tensorrt": None}},
                    settings={"threads": 1, "cpus": [0], "warmup": 1, "iters": 3, "sizes": ["vga"], "limit": 3,
                              "baseline": None})
    for path, value in change.items():
        *parents, last = path.split("__")
        target = record
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is _DROP:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return record


BAD_REPORTS = {
    "list": ("[]", "holds a list [], not a JSON object"),
    "list-of-report": (json.dumps([_report()]), "not a JSON object"),
    "string": ('"bench"', "holds a string \"bench\", not a JSON object"),
    "null": ("null", "holds null, not a JSON object"),
    "number": ("3", "holds a whole number 3, not a JSON object"),
    "empty": ("", "is empty"),
    "blank": ("\n  \n", "is empty"),
    "not-json": ("{'schema':", "is not valid JSON"),
    "nested": ("[" * 100000 + "]" * 100000, "nested too deeply"),
    "markdown": ("| device | board |\n|---|---|\n", "is a bench table (Markdown)"),
    "device-list": (_report(device=[]), "field device is a list [], expected an object"),
    "device-missing": (_report(device=_DROP), "field device is missing"),
    "results-object": (_report(results={}), "field results is an object {}, expected a list"),
    "results-missing": (_report(results=_DROP), "field results is missing"),
    "result-number": (_report(results=[5]), "field results[0] is a whole number 5, expected an object"),
    "result-name-missing": (_report(results__0__name=_DROP), "field results[0].name is missing"),
    "size-bytes-string": (_report(results__0__size_bytes="640k"), "field results[0].size_bytes is a string"),
    "size-bytes-bool": (_report(results__0__size_bytes=True), "field results[0].size_bytes is the boolean true"),
    "latency-object": (_report(results__0__latency={}), "field results[0].latency is an object"),
    "p50-string": (_report(results__0__latency__0__total_ms__p50="20"),
                   "field results[0].latency[0].total_ms.p50 is a string \"20\", expected a number"),
    "total-ms-missing": (_report(results__0__latency__0__total_ms=_DROP),
                         "field results[0].latency[0].total_ms is missing"),
    "delta-string": (_report(results__0__accuracy__delta_ap__easy="-0.1"),
                     "field results[0].accuracy.delta_ap.easy is a string"),
    "ap-list": (_report(results__0__accuracy__ap=[0.9]), "field results[0].accuracy.ap is a list"),
    "settings-list": (_report(settings=[1]), "field settings is a list"),
    "cpus-strings": (_report(settings__cpus=["0"]), "field settings.cpus[0] is a string"),
    "schema-list": (_report(schema=["edgeface.bench"]), "not an edgeface bench report"),
    "p50-infinity": (_report(results__0__latency__0__total_ms__p50=float("inf")),
                     "field results[0].latency[0].total_ms.p50 is a number Infinity, expected a finite number"),
    "size-bytes-huge": (_report(results__0__size_bytes=10 ** 400),
                        "field results[0].size_bytes is a whole number 1000000000000000000000000000000000000..., "
                        "expected a finite number"),
}


@pytest.mark.parametrize("name", list(BAD_REPORTS))
def test_a_report_of_the_wrong_shape_is_one_line_naming_file_and_field(name, tmp_path):
    from edgeface.benchmarks.report import load_report

    content, expected = BAD_REPORTS[name]
    path = tmp_path / f"{name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(EdgefaceError) as info:
        load_report(path)
    message = _one_line(info)
    assert str(path) in message and expected in message, message


def test_a_csv_table_a_folder_or_binary_data_given_as_a_report(tmp_path):
    from edgeface.benchmarks.report import load_report, rows, write_tables

    _, table_csv = write_tables(rows(_report()), tmp_path / "bench.md")
    binary = tmp_path / "photo.json"
    binary.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
    for path, expected in ((table_csv, "is a bench table (CSV), not a bench report"),
                           (tmp_path, "cannot read bench report"), (binary, "cannot read bench report"),
                           (tmp_path / "missing.json", "cannot read bench report")):
        with pytest.raises(EdgefaceError) as info:
            load_report(path)
        message = _one_line(info)
        assert str(path) in message and expected in message, message


def test_reports_as_bench_writes_them_still_load_and_merge(tmp_path, capsys):
    from edgeface.benchmarks.report import load_report, rows

    from edgeface.cli import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report()))
    record = load_report(good)
    assert [r["artifact"] for r in rows(record)] == ["onnx-int8", "coreml-fp16"]
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    out = tmp_path / "lab" / "lab.md"
    assert main(["report", "merge", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeface: error: bench report ") and str(bad) in err[0]
    assert not out.parent.exists()  # nothing half-merged
    assert main(["report", "merge", str(good), "--out", str(out)]) == 0
    assert "| pi |  | onnx-int8 |" in out.read_text()


# --------------------------------------------------------------------------------- 6. one first-line helper
def test_first_line_is_the_one_helper_and_skips_blank_lines():
    assert first_line(ValueError("\n  \nboom  \nmore")) == "boom"
    assert first_line(KeyError()) == "KeyError"


def test_the_fuzz_worker_records_the_first_line_of_an_exception():
    from edgeface.benchmarks import fuzz

    def fail(exc):
        raise exc

    namespace = {"fail": fail, "E": EdgefaceError}
    case = fuzz.Case("x", "cli", call="fail(ValueError('\\nboom\\ntraceback text'))")
    assert fuzz._run_api(case, namespace, [], Detector, EdgefaceError) == {"api": "exception",
                                                                           "message": "ValueError: boom"}
    case = fuzz.Case("y", "cli", call="fail(E('first\\nsecond'))")
    assert fuzz._run_api(case, namespace, [], Detector, EdgefaceError) == {"api": "edgeface_error",
                                                                           "message": "first"}
    case = fuzz.Case("z", "cli", call="fail(AssertionError())")
    assert fuzz._run_api(case, namespace, [], Detector, EdgefaceError)["message"] == "AssertionError"


# ------------------------------------------------------------------------------ 7. the fuzz battery's --out
def _user_folder(folder: Path) -> dict[str, bytes]:
    (folder / "cases").mkdir(parents=True)  # names the battery uses for its own subfolders
    (folder / "work").mkdir()
    files = {"notes.txt": b"my notes\n", "cases/mine.txt": b"keep me\n", "work/thesis.md": b"# one\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_fuzz_refuses_an_out_folder_holding_other_files(tmp_path, capsys):
    from edgeface.benchmarks import fuzz

    folder = tmp_path / "mine"
    files = _user_folder(folder)
    with pytest.raises(fuzz.OutputRefused) as info:
        fuzz.run_battery(folder, seconds=5, quick=True, log=lambda message: None)
    assert "is a folder that is not a fuzz output (it holds notes.txt" in _one_line(info)
    assert fuzz.main(["--out", str(folder), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fuzz: error: --out ")
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(files)
    assert all((folder / name).read_bytes() == data for name, data in files.items())
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(fuzz.OutputRefused, match="exists and is not a folder"):
        fuzz.claim_output(regular)
    assert regular.read_text() == "x"


def test_fuzz_takes_a_new_an_empty_or_its_own_previous_folder(tmp_path):
    from edgeface.benchmarks import fuzz

    new = fuzz.claim_output(tmp_path / "new" / "fuzz")
    assert (new / fuzz.MARKER).is_file()
    (new / "cases").mkdir()
    (new / "results.json").write_text("{}")
    assert fuzz.claim_output(new) == new  # marked: a previous run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (fuzz.claim_output(empty) / fuzz.MARKER).is_file()
    legacy = tmp_path / "legacy"  # a run from before the marker: only the battery's own entries and its results
    (legacy / "cases").mkdir(parents=True)
    (legacy / "results.json").write_text(json.dumps({"counts": {}, "results": []}))
    assert (fuzz.claim_output(legacy) / fuzz.MARKER).is_file()
    imitation = tmp_path / "imitation"  # the battery's names, but not its results
    (imitation / "work").mkdir(parents=True)
    (imitation / "results.json").write_text("[1, 2]")
    with pytest.raises(fuzz.OutputRefused):
        fuzz.claim_output(imitation)


def test_fuzz_docstring_names_no_development_paths():
    from edgeface.benchmarks import fuzz

    assert "/tmp" not in fuzz.__doc__ and "flock" not in fuzz.__doc__
    assert "--seconds" in fuzz.__doc__ and "--memory-gb" in fuzz.__doc__  # bounded, and it says how
