"""`edgeface build-engine` publishes like an export: the engine is built into a staged copy of the bundle and the
copy replaces the bundle only when engine, timing cache and manifest are complete (and the engine passed its
check). A failure or a kill leaves the bundle as it was and no engine file anywhere. TensorRT is not installable
here: the staging and publication run with a fake engine build; the refusals run for real."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys

import pytest
from edgeface.export.pipeline import export_bundle
from edgeface.export.tensorrt import ENGINE_FILE, TIMING_CACHE, Engine, build_engine, install_engine

from edgeface.core.bundle import load_bundle, write_manifest
from edgeface.core.errors import EdgefaceError

pytest.importorskip("onnxsim", reason="ONNX export needs the onnx extra: pip install edgeface[onnx]")

FACTS = {"tensorrt": "10.0 (fake)", "built_seconds": 0.1, "device": None}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    return {"tensorrt": export_bundle("jetson", imgsz=(320, 320), verify=False, progress=False,
                                      out=folder / "trt").path,
            "onnx": export_bundle("onnx", imgsz=(320, 320), verify=False, progress=False, out=folder / "onnx").path}


@pytest.fixture
def trt_bundle(exported, tmp_path):
    shutil.copytree(exported["tensorrt"], tmp_path / "b")
    return tmp_path / "b"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_build(staged):
    assert staged.manifest.target == "tensorrt" and staged.file().is_file()  # built from the staged copy's ONNX
    return Engine(data=b"ENGINE" * 100, timing_cache=b"CACHE", info=dict(FACTS))


def _no_engine_anywhere(root):
    return not [p for p in root.rglob("*") if ENGINE_FILE in p.name]


def test_the_engine_is_published_with_the_manifest_listing_it(trt_bundle):
    path = install_engine(trt_bundle, _fake_build, check=lambda staged: {"status": "passed"})
    assert path == trt_bundle / ENGINE_FILE and path.read_bytes() == b"ENGINE" * 100
    bundle = load_bundle(trt_bundle)  # every hash checked, engine keys valid against the schema
    assert bundle.manifest.files["engine"] == ENGINE_FILE
    assert bundle.file("engine").read_bytes() == b"ENGINE" * 100
    assert (trt_bundle / TIMING_CACHE).read_bytes() == b"CACHE"
    assert {ENGINE_FILE, TIMING_CACHE} <= set(bundle.manifest.sha256)
    assert bundle.manifest.target_info["engine"] == {**FACTS, "parity": {"status": "passed"}}
    assert sorted(p.name for p in trt_bundle.parent.iterdir()) == ["b"]  # no staging, new, old or trash left


def test_a_rebuild_replaces_the_engine(trt_bundle):
    install_engine(trt_bundle, _fake_build)
    install_engine(trt_bundle, lambda staged: Engine(b"SECOND", None, dict(FACTS)))
    assert load_bundle(trt_bundle).file("engine").read_bytes() == b"SECOND"
    assert (trt_bundle / TIMING_CACHE).read_bytes() == b"CACHE"  # kept from the first build


@pytest.mark.parametrize("stage", ["build", "half-written engine", "engine check"])
def test_a_failure_leaves_the_bundle_untouched_and_no_engine(trt_bundle, stage):
    before = _snapshot(trt_bundle)

    def build(staged):
        if stage == "build":
            raise EdgefaceError("TensorRT failed to build the engine")
        if stage == "half-written engine":
            (staged.path / ENGINE_FILE).write_bytes(b"ENG")
            raise EdgefaceError("out of memory while serialising")
        return _fake_build(staged)

    def check(staged):
        assert (staged.path / ENGINE_FILE).is_file()  # checked in the staged copy, before publication
        assert staged.manifest.files["engine"] == ENGINE_FILE
        raise EdgefaceError("the engine does not reproduce the bundle's reference detections")

    with pytest.raises(EdgefaceError):
        install_engine(trt_bundle, build, check=check)
    assert _snapshot(trt_bundle) == before
    assert _no_engine_anywhere(trt_bundle.parent)
    assert sorted(p.name for p in trt_bundle.parent.iterdir()) == ["b"]


def test_a_bundle_changed_during_the_build_is_not_overwritten(trt_bundle):
    def build(staged):
        theirs = load_bundle(trt_bundle).manifest
        theirs.notes.append("changed by someone else")
        write_manifest(trt_bundle, theirs)
        return _fake_build(staged)

    with pytest.raises(EdgefaceError, match="changed by someone else while it was being updated"):
        install_engine(trt_bundle, build)
    assert load_bundle(trt_bundle).manifest.notes[-1] == "changed by someone else"
    assert _no_engine_anywhere(trt_bundle.parent)


KILLED_BUILD = """
import sys, time
from edgeface.export.tensorrt import ENGINE_FILE, install_engine

def build(staged):
    (staged.path / ENGINE_FILE).write_bytes(b"half an engine")
    print("building", flush=True)
    time.sleep(60)

install_engine(sys.argv[1], build)
"""


def test_a_killed_build_leaves_the_bundle_untouched(trt_bundle):
    before = _snapshot(trt_bundle)
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(trt_bundle)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "building"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _snapshot(trt_bundle) == before
    leftovers = [p.name for p in trt_bundle.parent.iterdir() if p.name != "b"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".b.staging-{child.pid}-")
    load_bundle(trt_bundle)  # the next run removes the dead build's staging
    assert sorted(p.name for p in trt_bundle.parent.iterdir()) == ["b"]
    assert _snapshot(trt_bundle) == before


# --- refusals before anything is staged --------------------------------------------------------------------------

def test_build_engine_refuses_a_bundle_of_another_target(exported, tmp_path):
    shutil.copytree(exported["onnx"], tmp_path / "b")
    before = _snapshot(tmp_path / "b")
    with pytest.raises(EdgefaceError, match="is an onnx bundle; build-engine takes a tensorrt bundle"):
        build_engine(tmp_path / "b")
    with pytest.raises(EdgefaceError, match="only a tensorrt bundle takes an engine"):
        install_engine(tmp_path / "b", _fake_build)
    assert _snapshot(tmp_path / "b") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_build_engine_without_tensorrt_says_how_to_install_and_touches_nothing(trt_bundle):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    before = _snapshot(trt_bundle)
    with pytest.raises(EdgefaceError, match=r"pip install edgeface\[tensorrt\]"):
        build_engine(trt_bundle)
    assert _snapshot(trt_bundle) == before
    assert sorted(p.name for p in trt_bundle.parent.iterdir()) == ["b"]


def test_build_engine_refuses_a_damaged_bundle(trt_bundle):
    manifest = json.loads((trt_bundle / "manifest.json").read_text())
    manifest["target_info"]["build"]["builder_flags"] = ["INT8"]  # not what a fp16 bundle is built with
    (trt_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgefaceError, match="field target_info.build.builder_flags"):
        build_engine(trt_bundle)
    assert sorted(p.name for p in trt_bundle.parent.iterdir()) == ["b"]
