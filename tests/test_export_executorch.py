"""ExecuTorch bundles: torch.export -> XNNPACK-lowered ``.pte`` (FP32 with dynamic sizes, INT8 by PT2E), the output
binding established against PyTorch on real images, the ExecuTorch runtime's checks of the program against its
manifest, parity through the shared pipeline and the astronaut's face through the Detector and the CLI."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("executorch.exir", reason="ExecuTorch export needs executorch: pip install edgeface[executorch]")

from edgeface.export import executorch as et  # noqa: E402
from edgeface.export.pipeline import export_bundle  # noqa: E402
from edgeface.runtimes.executorch import ExecuTorchRuntime  # noqa: E402

from edgeface import Detector, EdgefaceError  # noqa: E402
from edgeface.cli import main  # noqa: E402
from edgeface.core.bundle import load_bundle  # noqa: E402

SIZE = (320, 320)
PRIORS = 2 * (40 * 40 + 20 * 20 + 10 * 10)
CALIB_N = 8


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A dynamic-size FP32 bundle through the shared pipeline (conversion, binding, size checks, parity)."""
    return export_bundle("executorch", precision="fp32", dynamic=True, progress=False,
                         out=tmp_path_factory.mktemp("bundles") / "fp32")


@pytest.fixture(scope="module")
def int8(tmp_path_factory, calib_dir):
    return export_bundle("executorch", precision="int8", imgsz=SIZE, calib=calib_dir, calib_n=CALIB_N,
                         progress=False, out=tmp_path_factory.mktemp("bundles") / "int8")


def _face(detector, path):
    faces = detector.detect(path)
    assert len(faces) == 1
    return faces[0]


def test_fp32_dynamic_bundle_contract(fp32):
    m = fp32.manifest
    assert m.target == "executorch" and m.files == {"model": "model.pte"} and (fp32.path / "model.pte").is_file()
    assert m.input.shape == [1, 3, "height", "width"] and m.input.layout == "NCHW" and m.input.dtype == "float32"
    assert m.dynamic == {"height": [32, 640, 2048], "width": [32, 640, 2048]}
    assert m.preprocessing["resize"] == "original" and not m.preprocessing["mean_in_graph"]
    info = m.target_info
    assert info["method"] == "forward" and sorted(info["output_positions"].values()) == [0, 1, 2]
    assert info["output_check"]["status"] == "passed" and info["output_check"]["input_size"] == [640, 640]
    assert all(max(o["error_by_stride"].values()) < 1e-3 for o in info["output_check"]["outputs"].values())
    # memory is planned for the largest input; XNNPACK runs every other size at fp32 parity
    assert info["method_meta"]["inputs"] == [{"sizes": [1, 3, 2048, 2048], "dtype": "float32"}]
    assert info["size_check"]["status"] == "passed" and len(info["size_check"]["sizes"]) == 3
    assert info["delegation"]["backend"] == "XnnpackBackend" and info["delegation"]["delegated_ops"] > 100
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "executorch"
    # parity images at their own sizes, padded to multiples of 32 by the runtime: the same faces
    assert m.parity["detection_agreement"] == 1.0 and m.parity["landmark_error"] < 1e-3
    assert m.converter["versions"]["executorch"] and m.calibration is None


def test_detector_runs_the_dynamic_bundle_at_any_size(fp32, astronaut_path):
    import cv2

    for policy in ("original", "longest:300", "fixed:256x384"):
        want = _face(Detector(resize=policy), astronaut_path)
        got = _face(Detector(model=fp32.path, resize=policy), astronaut_path)
        assert got.box == pytest.approx(want.box, abs=0.05) and got.score == pytest.approx(want.score, abs=1e-4)
    image = cv2.imread(str(astronaut_path))
    # a size that is not a multiple of 32: padded by the runtime, outputs cut back to that size's priors
    raw, _ = Detector(model=fp32.path).infer_arrays([image[:301, :347]])[0]
    ref, _ = Detector().infer_arrays([image[:301, :347]])[0]
    assert {k: v.shape for k, v in raw.items()} == {k: v.shape for k, v in ref.items()}
    batch = Detector(model=fp32.path).detect([image, image[:300, :350]])
    assert [len(faces) for faces in batch] == [1, 1]


def test_runtime_threads_sizes_and_device(fp32):
    runtime = ExecuTorchRuntime.open(fp32, threads=1)
    info = runtime.describe()
    assert info["runtime"] == "executorch" and info["threads"] == 1 and info["backend"] == "XnnpackBackend"
    out = runtime.infer(np.random.default_rng(0).normal(0, 50, (2, 3, 64, 96)).astype(np.float32))
    priors = 2 * (8 * 12 + 4 * 6 + 2 * 3)
    assert {k: v.shape for k, v in out.items()} == {"loc": (2, priors, 4), "conf": (2, priors, 2),
                                                    "landmarks": (2, priors, 10)}
    assert np.allclose(out["conf"].sum(-1), 1.0, atol=1e-5)
    small = runtime.infer(np.zeros((1, 3, 20, 40), np.float32))  # under 32: padded, cut back to 20x40's priors
    assert small["loc"].shape == (1, 2 * (3 * 5 + 2 * 3 + 1 * 2), 4)
    with pytest.raises(EdgefaceError, match=r"takes input heights up to 2048 .* got 2080"):
        runtime.infer(np.zeros((1, 3, 2080, 32), np.float32))
    with pytest.raises(EdgefaceError, match="NCHW batch with 3 channels"):
        runtime.infer(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(EdgefaceError, match="runs on the CPU"):
        ExecuTorchRuntime.open(fp32, device="cuda")


def _lie(bundle, tmp_path, edit):
    copy = shutil.copytree(bundle.path, tmp_path / "lie")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_runtime_refuses_a_manifest_that_lies(fp32, tmp_path):
    def swap(manifest):  # loc and landmarks bound to each other's positions, method_meta made to agree
        info = manifest["target_info"]
        positions = info["output_positions"]
        positions["loc"], positions["landmarks"] = positions["landmarks"], positions["loc"]
        outs = info["method_meta"]["outputs"]
        outs[positions["loc"]], outs[positions["landmarks"]] = outs[positions["landmarks"]], outs[positions["loc"]]

    with pytest.raises(EdgefaceError, match=r"manifest field outputs\[0\] \('loc', output 2\) is float32 "
                                            r"\[1, \d+, 4\], but the program's output 2 is float32 "
                                            r"\[1, \d+, 10\]"):
        Detector(model=_lie(fp32, tmp_path / "a", swap))

    def smaller(manifest):  # a dynamic range the program was not planned for
        manifest["dynamic"]["height"] = [32, 640, 1024]
        manifest["target_info"]["method_meta"]["inputs"][0]["sizes"][2] = 1024

    with pytest.raises(EdgefaceError, match=r"manifest field input has shape \[1, 3, 'height', 'width'\] \(largest "
                                            r"\[1, 3, 1024, 2048\]\), but the program's is \[1, 3, 2048, 2048\]"):
        Detector(model=_lie(fp32, tmp_path / "b", smaller))

    def unbound(manifest):  # the schema and the cross-field rules refuse a broken binding before any runtime
        manifest["target_info"]["output_positions"]["conf"] = 0

    with pytest.raises(EdgefaceError, match="output_positions .* expected positions 0, 1 and 2 once each"):
        load_bundle(_lie(fp32, tmp_path / "c", unbound))


def test_binding_check_refuses_a_program_that_reproduces_nothing(fp32):
    from edgeface.models import get_model

    stranger = get_model("retinaface_mnet025", weights=None)  # random weights: no output matches
    with pytest.raises(EdgefaceError, match="no ExecuTorch output reproduces PyTorch's 'loc'"):
        et.map_outputs(fp32.file(), stranger, "fp32", SIZE)
    model = get_model("retinaface_mnet025", weights="default")
    positions, check = et.map_outputs(fp32.file(), model, "fp32", SIZE)
    assert positions == fp32.manifest.target_info["output_positions"] and check["status"] == "passed"


def test_int8_is_pt2e_calibrated_with_the_sensitive_modules_in_float(int8, fp32, astronaut_path):
    m = int8.manifest
    assert m.input.shape == [1, 3, *SIZE] and m.outputs[0].shape == [1, PRIORS, 4]
    calibration = m.calibration
    assert calibration["images"] == CALIB_N and calibration["weights"] == "int8 per-channel symmetric"
    assert calibration["modules_kept_float"] == list(et.INT8_KEEP_FLOAT) and calibration["source"]
    assert m.parity["status"] == "passed" and m.parity["tolerance"]["agreement"] == 0.75
    assert m.target_info["output_check"]["status"] == "passed"
    # int8 weights: well under the fp32 program's size
    assert int8.file().stat().st_size < 0.6 * fp32.file().stat().st_size
    want = _face(Detector(resize="fixed:320x320"), astronaut_path)
    got = _face(Detector(model=int8.path), astronaut_path)
    assert got.box == pytest.approx(want.box, abs=4.0)


def test_float_filter_keeps_the_named_modules():
    class Node:
        def __init__(self, *paths):
            self.meta = {"nn_module_stack": {p: (p, "M") for p in paths}}

    keep = et.float_filter(("heads", "body.stage1"))
    assert not keep(Node("", "body", "body.stage1", "body.stage1.0"))
    assert not keep(Node("", "ClassHead.1", "ClassHead.1.conv1x1"))
    assert not keep(Node(""))  # the top-level cat / softmax after the heads
    assert keep(Node("", "body", "body.stage2")) and keep(Node("", "body.stage10"))
    assert et.float_filter(())(Node(""))


def test_cli_run_and_compare(fp32, astronaut_path, tmp_path, capsys):
    assert main(["run", "--model", str(fp32.path), "--source", str(astronaut_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["faces"]) == 1 and "executorch/fp32 (executorch)" in captured.err
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "a.jpg")
    assert main(["compare", "torch", str(fp32.path), "--images", str(folder), "--json",
                 str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["detection_agreement"] == 1.0 and report["landmark_error"] < 1e-4


def test_a_failed_export_writes_nothing(tmp_path, monkeypatch, calib_dir):
    with pytest.raises(EdgefaceError, match="no module 'body.stage9'"):
        export_bundle("executorch", precision="int8", imgsz=SIZE, calib=calib_dir, calib_n=2,
                      options={"keep_float": ["body.stage9"]}, out=tmp_path / "a", progress=False)
    with pytest.raises(EdgefaceError, match="INT8 bundles only"):
        export_bundle("executorch", precision="fp32", imgsz=SIZE, options={"keep_float": ["heads"]},
                      out=tmp_path / "b", progress=False)
    # refused from the spec, before any calibration image is read (a folder that does not exist is not reached)
    with pytest.raises(EdgefaceError, match=r"--dynamic is not available for executorch int8: ExecuTorch INT8 "
                                            "programs are exported per input size"):
        export_bundle("executorch", precision="int8", dynamic=True, calib=tmp_path / "absent", out=tmp_path / "e",
                      progress=False)
    with pytest.raises(EdgefaceError, match="unknown precision for executorch 'fp16'"):
        export_bundle("executorch", precision="fp16", out=tmp_path / "c", progress=False)
    # a lowering that yields no program: the file written is refused by the runtime, and nothing is published
    monkeypatch.setattr(et, "lower", lambda exported: (b"not a program", {"portable_ops": {}}))
    with pytest.raises(EdgefaceError, match="ExecuTorch runtime could not load .*re-export the bundle"):
        export_bundle("executorch", precision="fp32", imgsz=SIZE, out=tmp_path / "d", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_missing_executorch_says_how_to_install(monkeypatch, tmp_path, fp32):
    import sys

    from edgeface.export.base import ExportRequest

    from edgeface.models import get_model

    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # import executorch.exir -> ImportError
    with pytest.raises(EdgefaceError, match=r"pip install edgeface\[executorch\]"):
        et.convert(get_model("retinaface_mnet025", weights=None), tmp_path,
                   ExportRequest(target="executorch", precision="fp32", input_hw=SIZE))
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    with pytest.raises(EdgefaceError, match=r"running ExecuTorch bundles .*pip install edgeface\[executorch\]"):
        ExecuTorchRuntime.open(fp32)


def test_threads_set_in_a_fresh_process_then_run(fp32, astronaut_path):
    """The thread pool is sized before the method loads: resized under a loaded XNNPACK method, the next run
    crashed the process (a segmentation fault, found by `edgeface bench`, which opens with one thread)."""
    import subprocess
    import sys

    code = ("import sys; from edgeface import Detector; "
            "d = Detector(model=sys.argv[1], threads=1, self_check=False); "
            "print(len(d.detect(sys.argv[2])), d.runtime.describe()['threads'])")
    done = subprocess.run([sys.executable, "-c", code, str(fp32.path), str(astronaut_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]
    # a second size under a loaded method is refused in one line, not a crash
    first = ExecuTorchRuntime.open(fp32, threads=1)
    try:
        with pytest.raises(EdgefaceError, match="one thread pool per process, of 1 threads"):
            ExecuTorchRuntime.open(fp32, threads=2)
    finally:
        first.close()
