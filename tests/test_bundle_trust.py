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

import pytest

from edgeface.bundle import check_output_folder, load_bundle, recover_publication, staging_dir
from edgeface.errors import EdgefaceError
from edgeface.export.pipeline import export_bundle

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")


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
