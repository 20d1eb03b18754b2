"""Bundles are not trusted: the manifest is validated against its versioned schema, every file resolves inside the
bundle and is hashed, and publishing a bundle never loses a user's files, even when killed."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgeface.export.pipeline import export_bundle

from edgeface.core.bundle import (
    check_output_folder,
    load_bundle,
    recover_publication,
    staged_bundle,
    staging_dir,
    write_manifest,
)
from edgeface.core.errors import EdgefaceError
from edgeface.core.manifest import read_manifest

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")

ASSET = Path(__file__).resolve().parents[1] / "edgeface" / "assets" / "astronaut.jpg"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_bundle("onnx", precision="fp32", imgsz=(320, 320), verify=False, progress=False,
                         out=tmp_path_factory.mktemp("trust") / "b").path


def _copy(bundle, tmp_path, mutate):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    text = mutate(copy, manifest)
    if isinstance(text, bytes):
        (copy / "manifest.json").write_bytes(text)
    else:
        (copy / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(manifest))
    return copy


def _set(path, value):
    def mutate(_, manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _rehash(folder, manifest, name):
    manifest["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()


def _number(path, literal):
    """The number at ``path`` written as ``literal`` in the JSON text (1e400, Infinity: json.dumps writes neither)."""
    def mutate(folder, manifest):
        _set(path, 987654.321)(folder, manifest)
        text = json.dumps(manifest)
        assert text.count("987654.321") == 1
        return text.replace("987654.321", literal)
    return mutate


def _dynamic(height=(32, 640, 2048), width=(32, 640, 2048)):
    """The static fixture's manifest made a dynamic-size one (with the given height / width ranges)."""
    def mutate(_, manifest):
        manifest["input"]["shape"] = [1, 3, "height", "width"]
        manifest["preprocessing"]["resize"] = "original"
        manifest["dynamic"] = {"height": list(height), "width": list(width)}
        for out in manifest["outputs"]:
            out["shape"][1] = "priors"
    return mutate


MANIFEST_LIES = {
    # case: (mutation, what the one-line error must name)
    "sha256 null": (_set(["sha256"], None), "field sha256"),
    "sha256 list": (_set(["sha256"], []), "field sha256"),
    "sha256 empty": (_set(["sha256"], {}), "field sha256"),
    "json list": (lambda d, m: "[1, 2]", "JSON list"),
    "json string": (lambda d, m: '"manifest"', "JSON str"),
    "json null": (lambda d, m: "null", "JSON NoneType"),
    "nested 100000 deep": (lambda d, m: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "not utf-8": (lambda d, m: b'{"schema": "\xff"}', "not valid JSON"),
    "shape not a list": (_set(["input", "shape"], "1x3x320x320"), "field input.shape"),
    "batch -1": (_set(["input", "shape", 0], -1), "field input.shape[0]"),
    "layout XYZ": (_set(["input", "layout"], "XYZ"), "field input.layout"),
    "NHWC on an NCHW model": (_set(["input", "layout"], "NHWC"), "field input.shape"),
    "mean of two values": (_set(["preprocessing", "mean_bgr"], [104, 117]), "field preprocessing.mean_bgr"),
    "mean a string": (_set(["preprocessing", "mean_bgr"], "104,117,123"), "field preprocessing.mean_bgr"),
    "anchor step 0": (_set(["decode", "anchors", "steps"], [8, 0, 32]), "field decode.anchors.steps[1]"),
    "variance strings": (_set(["decode", "anchors", "variance"], ["0.1", "0.2"]), "field decode.anchors.variance"),
    "output renamed": (_set(["outputs", 1, "name"], "scores"), "field outputs[1].name"),
    "target unknown": (_set(["target"], "hailo"), "field target"),
    "model empty": (_set(["files", "model"], ""), "field files.model"),
    "model null": (_set(["files", "model"], None), "field files.model"),
    "model ../../etc/passwd": (_set(["files", "model"], "../../etc/passwd"), "field files.model"),
    "model absolute": (_set(["files", "model"], "/etc/passwd"), "field files.model"),
    "model is a parity image": (_set(["files", "model"], "parity/00.jpg"), "field files.model"),
    "mean_in_graph on ONNX": (_set(["preprocessing", "mean_in_graph"], True), "field preprocessing.mean_in_graph"),
    "resize disagrees with shape": (_set(["preprocessing", "resize"], "fixed:640x640"), "preprocessing.resize"),
    "int8 input without scales": (_set(["input", "dtype"], "int8"), "input.quantization"),
    "schema version 2": (_set(["schema_version"], 2), "schema version 2"),
    "unknown field": (_set(["surprise"], 1), "surprise"),
    "sha256 key outside": (lambda d, m: m["sha256"].update({"../b/model.onnx": "0" * 64}), "field sha256"),
    # numbers beyond a 64-bit float parse as infinity: refused naming the field, wherever they are
    "1e400 in the variance": (_number(["decode", "anchors", "variance", 0], "1e400"),
                              "field decode.anchors.variance[0] is 1e400, which is not a finite number"),
    "-1e400 in the mean": (_number(["preprocessing", "mean_bgr", 2], "-1e400"), "field preprocessing.mean_bgr[2]"),
    "1e400 in the model config": (_number(["model", "config", "mean_bgr", 0], "1e400"),
                                  "field model.config.mean_bgr[0] is 1e400"),
    "1e400 in export_seconds": (_number(["export_seconds"], "1e400"), "field export_seconds is 1e400"),
    "Infinity": (_number(["preprocessing", "mean_bgr", 0], "Infinity"), "Infinity is not a number JSON allows"),
    # quantisation belongs to integer tensors only, with a zero point the type can hold
    "quantization on a float32 input": (_set(["input", "quantization"], {"scale": 0.5, "zero_point": 0}),
                                        "field input.quantization"),
    "quantization on a float32 output": (_set(["outputs", 2, "quantization"], {"scale": 0.5, "zero_point": 3}),
                                         "field outputs[2].quantization"),
    "int8 zero point 300": (lambda d, m: m["input"].update(dtype="int8", quantization={"scale": 1.0,
                                                                                      "zero_point": 300}),
                            "field input.quantization.zero_point 300 is outside the int8 range"),
    # shapes: names where the layout puts them, sizes the model takes, outputs of the input's batch and priors
    "height and width names swapped": (_set(["input", "shape"], [1, 3, "width", "height"]), "field input.shape[2]"),
    "fixed size not a multiple of 32": (lambda d, m: (m["input"].update(shape=[1, 3, 330, 320]),
                                                      m["preprocessing"].update(resize="fixed:330x320")),
                                        "a multiple of 32"),
    "output priors wrong": (_set(["outputs", 0, "shape", 1], 4199), "field outputs[0].shape[1] is 4199, expected 4200"),
    "output batch differs from the input's": (_set(["outputs", 1, "shape", 0], 2), "field outputs[1].shape[0]"),
    "output priors named on a static model": (_set(["outputs", 1, "shape", 1], "priors"), "field outputs[1].shape[1]"),
    # dynamic ranges: exactly for the named dimensions, min <= opt <= max, positive
    "batch range on a static batch": (_set(["dynamic"], {"batch": [1, 1, 8]}), "field dynamic.batch"),
    "height range min > max": (_dynamic(height=(2048, 640, 32)), "field dynamic.height [2048, 640, 32]"),
    "width range opt > max": (_dynamic(width=(32, 4096, 2048)), "field dynamic.width"),
    "height range of 0": (_dynamic(height=(0, 640, 2048)), "field dynamic.height[0]"),
    "named height without a range": (lambda d, m: (_dynamic()(d, m), m["dynamic"].pop("height")),
                                     "dynamic has no height range"),
    # files and target_info: roles and keys are edgeface's own
    "engine on an onnx bundle": (_set(["files", "engine"], "model.engine"), "field files.engine"),
    "unknown file role": (_set(["files", "weights"], "model.onnx"), "field files"),
    "target_info key on an onnx bundle": (_set(["target_info", "output_tensors"], {}), "field target_info"),
}


@pytest.mark.parametrize("case", list(MANIFEST_LIES))
def test_malformed_or_lying_manifest_is_refused_naming_the_field(bundle, tmp_path, case):
    mutate, expected = MANIFEST_LIES[case]
    copy = _copy(bundle, tmp_path, mutate)
    with pytest.raises(EdgefaceError, match="manifest.json") as error:
        load_bundle(copy)
    message = str(error.value)
    assert expected in message and "\n" not in message


def _flip_and_forget(folder, manifest):
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    del manifest["sha256"]["model.onnx"]


def _model_dir(folder, manifest):
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").mkdir()


def _link_outside(folder, manifest):
    outside = folder.parent / "elsewhere.onnx"
    shutil.copy(folder / "model.onnx", outside)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside)


FILE_LIES = {
    "flipped byte, hash entry deleted": (_flip_and_forget, "does not list"),
    "extra file": (lambda d, m: (d / "model.engine").write_bytes(b"\0" * 16), "'model.engine'"),
    "model file a directory": (_model_dir, "is a folder"),
    "symlink outside the bundle": (_link_outside, "points outside the bundle"),
    "flipped byte": (lambda d, m: _flip_and_forget(d, {"sha256": dict(m["sha256"])}), "does not match the sha256"),
}


def test_a_valid_dynamic_manifest_is_accepted(bundle, tmp_path):
    """The rules above refuse lies, not the manifests export writes (dynamic ranges included)."""
    copy = _copy(bundle, tmp_path, _dynamic())
    assert load_bundle(copy).manifest.dynamic == {"height": [32, 640, 2048], "width": [32, 640, 2048]}


def test_a_manifest_that_breaks_its_own_rules_is_never_written(bundle, tmp_path):
    """write_manifest and staged_bundle (what an export verifies before writing) validate as a load does: a
    converter bug that describes the outputs wrongly fails the export instead of publishing a bundle that then
    refuses to load."""
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    before = (copy / "manifest.json").read_bytes()
    manifest = load_bundle(copy).manifest
    assert staged_bundle(copy, manifest).manifest == manifest  # what export writes passes
    manifest.outputs[0].shape[2] = 5
    for write in (write_manifest, staged_bundle):
        with pytest.raises(EdgefaceError, match="outputs"):
            write(copy, manifest)
    manifest.outputs[0].shape[2] = 4
    manifest.notes.append(float("nan"))
    with pytest.raises(EdgefaceError, match="JSON cannot store"):
        write_manifest(copy, manifest)
    assert (copy / "manifest.json").read_bytes() == before


def test_a_large_static_model_is_accepted(bundle, tmp_path):
    """A 1280x1280 model has 67200 priors: more than any input side, still a valid output shape."""
    def mutate(_, m):
        m["input"]["shape"] = [1, 3, 1280, 1280]
        m["preprocessing"]["resize"] = "fixed:1280x1280"
        for out in m["outputs"]:
            out["shape"][1] = 67200
    copy = _copy(bundle, tmp_path, mutate)
    assert read_manifest(copy / "manifest.json")["outputs"][0]["shape"] == [1, 67200, 4]


# --- target_info of each target, checked against the input and outputs it describes -----------------------------

def _tflite_tensor(index, name, shape, position, dtype="float32", quantization=None):
    return {"index": index, "name": name, "dtype": dtype, "shape": shape, "quantization": quantization,
            "position": position, "signature_key": name}


def _as_target(m, target):
    """The ONNX fixture's manifest (320x320) turned into the manifest of another target, with target_info as that
    target's exporter writes it."""
    m["target"] = target
    if target == "tflite":
        m["files"]["model"] = "model.tflite"
        m["input"].update(layout="NHWC", shape=[1, 320, 320, 3])
        m["target_info"] = {
            "input_tensor": _tflite_tensor(0, "input", [1, 320, 320, 3], 0),
            "output_tensors": {o["name"]: _tflite_tensor(100 + i, o["name"], o["shape"], i)
                               for i, o in enumerate(m["outputs"])},
            "signature": "serving_default", "output_check": {"status": "passed"}, "runtime": "LiteRT"}
    elif target == "coreml":
        m["files"]["model"] = "model.mlpackage"
        m["preprocessing"]["mean_in_graph"] = True
        m["target_info"] = {"input_type": "image", "input_name": "input", "input_size": [320, 320], "batch": 1,
                            "color_layout": "BGR", "bias": [-104.0, -117.0, -123.0], "scale": 1.0,
                            "pad_value_bgr": [104.0, 117.0, 123.0], "enumerated_sizes": [[320, 320], [256, 320]],
                            "outputs": {o["name"]: o["shape"] for o in m["outputs"]}, "output_dtype": "float32",
                            "model_type": "mlprogram", "compute_precision": "fp16", "spec_checks": {}}
    elif target == "tensorrt":
        shape = [1, 3, 320, 320]
        m["target_info"] = {"verify_runtime": "onnxruntime", "onnx_operators": ["Conv"],
                            "build": {"precision": m["precision"], "builder_flags": [], "workspace_mb": 1024,
                                      "profile": {"min": shape, "opt": shape, "max": shape}}}
    return m


def _target(target, *changes):
    """A mutation: the manifest as ``target`` writes it, then ``changes`` (path, value) applied."""
    def mutate(d, m):
        _as_target(m, target)
        for path, value in changes:
            _set(path, value)(d, m)
    return mutate


def _read(bundle, tmp_path, mutate):
    folder = tmp_path / "m"
    folder.mkdir()
    manifest = json.loads((bundle / "manifest.json").read_text())
    mutate(folder, manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return read_manifest(folder / "manifest.json")


@pytest.mark.parametrize("target", ["tflite", "coreml", "tensorrt"])
def test_target_info_as_each_exporter_writes_it_is_accepted(bundle, tmp_path, target):
    assert _read(bundle, tmp_path, _target(target))["target"] == target


TARGET_INFO_LIES = {
    "tflite: no output mapping": (_target("tflite", (["target_info", "output_tensors"], None)),
                                  "field target_info.output_tensors"),
    "tflite: mapping lacks conf": (lambda d, m: (_as_target(m, "tflite"),
                                                 m["target_info"]["output_tensors"].pop("conf")),
                                   "field target_info.output_tensors"),
    "tflite: unknown tensor key": (_target("tflite", (["target_info", "input_tensor", "scale"], 1.0)),
                                   "field target_info.input_tensor"),
    "tflite: two outputs at position 0": (_target("tflite", (["target_info", "output_tensors", "conf", "position"], 0)),
                                          "positions are [0, 0, 2]"),
    "tflite: input tensor shape differs": (_target("tflite", (["target_info", "input_tensor", "shape"],
                                                              [1, 640, 640, 3])),
                                           "field target_info.input_tensor.shape"),
    "tflite: output dtype differs": (_target("tflite", (["target_info", "output_tensors", "loc", "dtype"], "int8"),
                                             (["target_info", "output_tensors", "loc", "quantization"],
                                              {"scale": 0.1, "zero_point": 0})),
                                     "field target_info.output_tensors.loc.dtype"),
    "tflite: quantization on a float tensor": (_target("tflite", (["target_info", "input_tensor", "quantization"],
                                                                  {"scale": 0.1, "zero_point": 0})),
                                               "field target_info.input_tensor.quantization"),
    "coreml: image input without mean_in_graph": (_target("coreml", (["preprocessing", "mean_in_graph"], False)),
                                                  "field preprocessing.mean_in_graph is false"),
    "coreml: tensor input with mean_in_graph": (_target("coreml", (["target_info", "input_type"], "tensor")),
                                                "field preprocessing.mean_in_graph is true"),
    "coreml: input size differs": (_target("coreml", (["target_info", "input_size"], [640, 640])),
                                   "field target_info.input_size"),
    "coreml: bias is not the mean": (_target("coreml", (["target_info", "bias"], [-1.0, -2.0, -3.0])),
                                     "field target_info.bias"),
    "coreml: unknown input type": (_target("coreml", (["target_info", "input_type"], "video")),
                                   "field target_info.input_type"),
    "tensorrt: profile differs from the input": (
        _target("tensorrt", (["target_info", "build", "profile", "max"], [8, 3, 320, 320])),
        "field target_info.build.profile.max"),
    "tensorrt: builder flags of another precision": (
        _target("tensorrt", (["target_info", "build", "builder_flags"], ["INT8"])),
        "field target_info.build.builder_flags"),
    "tensorrt: unknown builder flag": (_target("tensorrt", (["target_info", "build", "builder_flags"], ["__class__"])),
                                       "field target_info.build.builder_flags[0]"),
    "tensorrt: build precision differs": (_target("tensorrt", (["target_info", "build", "precision"], "int8")),
                                          "field target_info.build.precision"),
    "tensorrt: no build settings": (lambda d, m: (_as_target(m, "tensorrt"), m["target_info"].pop("build")),
                                    "field target_info"),
    "tensorrt: engine file without engine facts": (_target("tensorrt", (["files", "engine"], "model.engine")),
                                                   "field target_info.engine is missing"),
    "tensorrt: zero workspace": (_target("tensorrt", (["target_info", "build", "workspace_mb"], 0)),
                                 "field target_info.build.workspace_mb"),
}


@pytest.mark.parametrize("case", list(TARGET_INFO_LIES))
def test_target_info_lies_are_refused_naming_the_field(bundle, tmp_path, case):
    mutate, expected = TARGET_INFO_LIES[case]
    with pytest.raises(EdgefaceError) as error:
        _read(bundle, tmp_path, mutate)
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_sha256_file_lives_in_files_only():
    import edgeface.core.files
    import edgeface.models.weights

    assert not hasattr(edgeface.models.weights, "sha256_file")
    assert edgeface.core.files.sha256_file(ASSET) == hashlib.sha256(ASSET.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(FILE_LIES))
def test_bundle_files_are_checked_against_the_manifest(bundle, tmp_path, case):
    mutate, expected = FILE_LIES[case]
    copy = _copy(bundle, tmp_path, mutate)
    with pytest.raises(EdgefaceError, match=expected):
        load_bundle(copy)


def test_parity_evidence_is_optional_and_ships_no_dataset_image(bundle, tmp_path):
    listed = json.loads((bundle / "manifest.json").read_text())["sha256"]
    assert sorted(listed) == ["model.onnx", "parity/00.jpg", "parity/reference.json"]  # the public-domain photo only
    copy = _copy(bundle, tmp_path, lambda d, m: shutil.rmtree(d / "parity"))
    assert load_bundle(copy).manifest.target == "onnx"


def test_bundle_and_manifest_respect_the_umask(bundle):
    mask = os.umask(0)
    os.umask(mask)
    assert (bundle.stat().st_mode & 0o777) == 0o777 & ~mask
    assert (bundle / "manifest.json").stat().st_mode & 0o044 == 0o044 & ~mask


# --- publication: nothing but a previous bundle is ever replaced --------------------------------------------------

def test_out_refuses_a_folder_of_user_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(EdgefaceError, match="not an edgeface bundle"):
        with staging_dir(folder):
            pass
    assert (folder / "holiday.jpg").read_bytes() == b"mine"


def test_out_refuses_a_regular_file_the_current_folder_and_the_root(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(EdgefaceError, match="existing file"):
        check_output_folder(notes)
    assert notes.read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    for current in (".", "..", str(tmp_path)):
        with pytest.raises(EdgefaceError, match="current folder"):
            check_output_folder(current)
    with pytest.raises(EdgefaceError, match="root"):
        check_output_folder("/")
    with pytest.raises(EdgefaceError, match="longer than this file system allows"):
        check_output_folder(tmp_path / ("x" * 300))


def test_a_previous_bundle_with_a_users_file_inside_is_not_replaced(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "my-notes.txt").write_text("mine")
    with pytest.raises(EdgefaceError, match="not an edgeface bundle"):
        check_output_folder(copy)
    shutil.rmtree(copy / "parity")  # a bundle without its optional part is still a bundle
    (copy / "my-notes.txt").unlink()
    assert check_output_folder(copy) == copy


def test_failed_block_keeps_the_previous_bundle(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with pytest.raises(RuntimeError):
        with staging_dir(copy) as staging:
            (staging / "half-written").write_text("x")
            raise RuntimeError("conversion failed")
    assert load_bundle(copy).manifest.target == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_kill_between_the_renames_is_rolled_back_or_finished_on_load(bundle, tmp_path):
    # killed after the old bundle was moved aside and before the new one took its name: the old one comes back
    shutil.copytree(bundle, tmp_path / ".b.old")
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # killed with the finished bundle staged as .b.new: publication is finished
    shutil.copytree(bundle, tmp_path / ".b.new")
    (tmp_path / ".b.new" / "parity" / "reference.json").unlink()  # tell the two apart
    manifest = json.loads((tmp_path / ".b.new" / "manifest.json").read_text())
    del manifest["sha256"]["parity/reference.json"]
    (tmp_path / ".b.new" / "manifest.json").write_text(json.dumps(manifest))
    load_bundle(tmp_path / "b")
    assert not (tmp_path / "b" / "parity" / "reference.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_staging_of_a_killed_export_is_removed_by_the_next_run(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale = tmp_path / f".b.staging-{child.pid}-abc123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial")
    live = tmp_path / f".b.staging-{os.getpid()}-def456"  # an export still running keeps its staging
    live.mkdir()
    recover_publication(tmp_path / "b")
    assert stale.exists()
    child.send_signal(signal.SIGKILL)
    child.wait()
    recover_publication(tmp_path / "b")
    assert not stale.exists() and live.exists()


def test_sigkilled_export_leaves_nothing_behind_after_the_next_run(tmp_path):
    """A real export killed mid-way, then run again: no staging folder is left and the bundle loads."""
    command = [sys.executable, "-m", "edgeface.cli", "export", "--target", "onnx", "--imgsz", "320x320",
               "--no-verify", "--out", str(tmp_path / "b")]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".b.staging-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and child.poll() is None, "the export never staged"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert any(p.name.startswith(".b.staging-") for p in tmp_path.iterdir())
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert load_bundle(tmp_path / "b").manifest.target == "onnx"
