"""Runtimes under real use: one runtime (one Detector) shared by several threads, a runtime that does not run the
bundle's target, and model files that do not load. Over the whole registry; a runtime that cannot run on this
machine skips with the reason it gives."""

import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from edgeface.export import get_spec, list_targets, specs
from edgeface.export.pipeline import export_bundle
from edgeface.runtimes import get_runtime_class, list_runtimes, open_runtime, runtimes_for
from edgeface.runtimes.coreml import NOT_APPLE, is_apple

from edgeface import Detector, EdgefaceError
from edgeface.core.bundle import load_bundle, write_manifest
from edgeface.core.errors import with_article
from edgeface.core.images import list_images, load_image
from edgeface.evaluation.accuracy import spread

THREADS, CALLS = 4, 8
SIZE = (320, 320)
RESIZE = "fixed:320x320"
WIDER_IMAGES = 7
# Small, quick bundles (no parity run: these tests are about the runtimes, not the conversions): dynamic where the
# target takes it, else small and static.
EXPORTS = {spec.name: {"dynamic": True} if spec.dynamic else {"imgsz": SIZE} for spec in specs()}
# Targets whose export takes a minute here (Core ML: program check): left out where any bundle would do.
SLOW_EXPORTS = ("coreml",)
CLI = [sys.executable, "-m", "edgeface"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, calib_dir):
    """Bundles by target, exported on first use: FP32, or the target's default precision where it has no FP32 (QNN:
    int8, calibrated on a few images). A target whose toolchain lives in its own environment (rknn) is skipped
    here with the export's own reason."""
    made = {}

    def get(target):
        if target not in made:
            spec = get_spec(target)
            precision = "fp32" if "fp32" in spec.precisions else spec.precisions[0]
            calib = dict(calib=calib_dir, calib_n=4) if precision in spec.calibrated else {}
            try:
                made[target] = export_bundle(target, precision=precision, verify=False, progress=False,
                                             out=tmp_path_factory.mktemp("bundles") / target, **calib,
                                             **EXPORTS[target])
            except EdgefaceError as exc:
                if "not importable here" not in str(exc):
                    raise
                pytest.skip(str(exc))
        return made[target]

    return get


@pytest.fixture(scope="module")
def images(astronaut_path, wider_images):
    """Real photographs: the astronaut and WIDER FACE val images of several events."""
    return [load_image(astronaut_path)] + [load_image(p) for p in spread(list_images(wider_images), WIDER_IMAGES)]


def _open(name, bundles):
    """The runtime ``name`` on a bundle it runs, or a skip with the reason it cannot run here."""
    if name == "torch":
        return open_runtime("torch", weights="default")
    if name == "coreml" and not is_apple():
        pytest.skip(NOT_APPLE.format(platform=sys.platform))  # before a Core ML export that could not run anyway
    try:
        return open_runtime(name, model=bundles(get_runtime_class(name).targets[0]).path)
    except EdgefaceError as exc:
        pytest.skip(f"{name}: {exc}")


def _same(got, expected):
    for field in ("boxes", "scores", "landmarks"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))


def test_every_runtime_declares_its_targets_and_concurrency():
    for name in list_runtimes():
        cls = get_runtime_class(name)
        assert isinstance(cls.concurrent, bool) and isinstance(cls.targets, tuple), name
    for target in list_targets():  # the runtime that runs its bundles, and the one that checks them at export
        spec = get_spec(target)
        assert {spec.runtime, spec.runtime_here} <= set(runtimes_for(target)), target
    assert runtimes_for("tensorrt") == ["onnxruntime", "tensorrt"]  # its ONNX here, its engine on the device


@pytest.mark.parametrize("name", list_runtimes())
def test_one_detector_shared_by_threads_gives_the_single_thread_results(name, bundles, images):
    runtime = _open(name, bundles)
    detector = Detector(runtime=runtime, resize=RESIZE, score_threshold=0.02)
    expected = [detector.detect_arrays([image])[0] for image in images]
    assert len(expected[0]) >= 1 and sum(len(d) for d in expected) > 20  # real faces to compare
    start = threading.Barrier(THREADS)

    def work(thread):
        start.wait()  # all threads call at once
        order = [(thread * 3 + k) % len(images) for k in range(CALLS)]
        return [(i, detector.detect_arrays([images[i]])[0]) for i in order]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [item for part in pool.map(work, range(THREADS)) for item in part]
    assert len(results) == THREADS * CALLS
    for index, detections in results:
        _same(detections, expected[index])
    # The runtime's own tensors too, several batches in flight at once.
    batches = [np.random.default_rng(i).normal(0, 50, (1, 3, *SIZE)).astype(np.float32) for i in range(THREADS)]
    if runtime.layout == "NHWC":
        batches = [np.ascontiguousarray(b.transpose(0, 2, 3, 1)) for b in batches]
    alone = [runtime.infer(b) for b in batches]
    with ThreadPoolExecutor(THREADS) as pool:
        together = list(pool.map(runtime.infer, batches * 2))
    for got, want in zip(together, alone * 2):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    runtime.close()


@pytest.mark.parametrize("target", [t for t in list_targets() if t not in SLOW_EXPORTS])
def test_a_runtime_that_does_not_run_the_bundle_says_which_do(target, bundles):
    bundle = bundles(target)
    runs = runtimes_for(target)
    for name in list_runtimes():
        if name in runs:
            continue
        # Refused before anything is loaded: no InvalidProtobuf, no platform or package complaint.
        with pytest.raises(EdgefaceError) as info:
            open_runtime(name, model=bundle.path)
        assert str(info.value) == (f"bundle {bundle.path} is {with_article(target)} bundle; runtimes that run it: "
                                   f"{', '.join(runs)}")


def test_a_tensorrt_bundle_runs_its_onnx_in_onnxruntime(bundles, images):
    with open_runtime("onnxruntime", model=bundles("tensorrt").path) as runtime:
        faces = Detector(runtime=runtime, resize=RESIZE).detect(images[0])
    assert len(faces) == 1  # the astronaut


def test_build_engine_refuses_a_bundle_of_another_target_before_asking_for_tensorrt(bundles):
    from edgeface.export.tensorrt import build_engine

    bundle = bundles("tflite")
    with pytest.raises(EdgefaceError, match=r"is a tflite bundle; build-engine takes a tensorrt bundle") as info:
        build_engine(bundle.path)
    assert "pip install" not in str(info.value)


def test_cli_run_with_the_wrong_runtime_is_one_line(bundles, astronaut_path):
    bundle = bundles("tflite")
    done = subprocess.run([*CLI, "run", "--runtime", "onnxruntime", "--model", str(bundle.path), "--source",
                           str(astronaut_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"edgeface: error: bundle {bundle.path} is a tflite bundle; runtimes that run it: tflite"]


def _damaged_copy(bundle, tmp_path, content: bytes) -> Path:
    """A copy of ``bundle`` whose model file holds ``content``, with a manifest that lists its new sha256 (a file
    damaged before it was bundled, or replaced along with the manifest)."""
    import shutil

    copy = tmp_path / bundle.path.name
    shutil.copytree(bundle.path, copy)
    copy.joinpath(bundle.manifest.files["model"]).write_bytes(content)
    write_manifest(copy, load_bundle(copy, verify=False).manifest)
    return copy


@pytest.mark.parametrize("target,damage", [("onnx", "truncated"), ("onnx", "other format"),
                                           ("tflite", "truncated"), ("tflite", "other format")])
def test_a_model_file_that_does_not_load_is_one_error_naming_it(target, damage, bundles, tmp_path):
    bundle = bundles(target)
    model = bundle.file().read_bytes()
    other = bundles("tflite" if target == "onnx" else "onnx").file().read_bytes()
    content = model[: len(model) // 3] if damage == "truncated" else other
    copy = _damaged_copy(bundle, tmp_path, content)
    with pytest.raises(EdgefaceError) as info:
        open_runtime(model=copy)
    message = str(info.value)
    assert str(copy / bundle.manifest.files["model"]) in message and "\n" not in message
    assert "re-export" in message


class _Rejected(Exception):
    pass


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_suggested_commands_in_runtime_and_export_messages_exist():
    """Every `edgeface ...` command quoted in the runtimes' and converters' sources is one the real CLI takes
    (subcommand and options; a placeholder such as BUNDLE may be left out)."""
    import re

    from edgeface.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    sources = [*sorted((root / "runtimes").glob("*.py")), *sorted((root / "export").glob("*.py"))]
    commands = {m for path in sources for m in re.findall(r"`(edgeface [^`]*)`", path.read_text())}
    assert any("--target" in c for c in commands)
    parser = build_parser()

    def reject(message):
        raise _Rejected(message)

    for each in _parsers(parser):
        each.error = reject
    for command in sorted(commands):
        try:
            parser.parse_args(shlex.split(command)[1:])
        except _Rejected as exc:
            assert str(exc).startswith("the following arguments are required"), \
                f"a message suggests `{command}`, which the CLI does not take: {exc}"
