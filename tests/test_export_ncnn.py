"""ncnn bundles (pnnx -> .param / .bin): convert, run in the ncnn Python package, assert parity with PyTorch on real
images; the output binding guard, static / dynamic sizes, fp16 weights, a manifest that lies, failures."""

import json
import shutil
import threading

import numpy as np
import pytest
from edgeface.export.pipeline import export_bundle
from edgeface.runtimes import open_runtime

from edgeface import Detector, EdgefaceError
from edgeface.cli import main
from edgeface.core.bundle import load_bundle

pytest.importorskip("pnnx", reason="ncnn export needs the ncnn extra: pip install edgeface[ncnn]")
ncnn = pytest.importorskip("ncnn", reason="running ncnn bundles needs the ncnn package: pip install "
                           "edgeface[ncnn-runtime]")

PRIORS_320 = 2 * (40 * 40 + 20 * 20 + 10 * 10)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return export_bundle("ncnn", precision="fp32", imgsz=(320, 320), out=tmp_path_factory.mktemp("b") / "fp32",
                         progress=False)


@pytest.fixture(scope="module")
def fp16_dynamic(tmp_path_factory):
    return export_bundle("ncnn", precision="fp16", dynamic=True, out=tmp_path_factory.mktemp("b") / "fp16",
                         progress=False)


def _astronaut_face(detector, astronaut_path):
    faces = detector.detect(astronaut_path)
    assert len(faces) == 1
    return faces[0]


def _lying_copy(bundle, tmp_path, change):
    """A copy of ``bundle`` whose manifest is edited by ``change(manifest dict)`` (the manifest is not hashed)."""
    copy = shutil.copytree(bundle.path, tmp_path / "lying")
    data = json.loads((copy / "manifest.json").read_text())
    change(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_fp32_bundle_contract(fp32):
    m = fp32.manifest
    assert m.target == "ncnn" and m.precision == "fp32"
    assert m.files == {"model": "model.ncnn.param", "weights": "model.ncnn.bin"}
    # only the ncnn pair: pnnx's own .pnnx.param / .onnx / .py files stay out of the bundle
    assert sorted(p.name for p in fp32.path.iterdir()) == ["manifest.json", "model.ncnn.bin", "model.ncnn.param",
                                                           "parity"]
    assert (fp32.path / "model.ncnn.param").read_text().startswith("7767517\n")
    assert m.input.shape == [1, 3, 320, 320] and m.input.layout == "NCHW" and m.dynamic is None
    assert [(o.name, o.shape) for o in m.outputs] == [("loc", [1, PRIORS_320, 4]), ("conf", [1, PRIORS_320, 2]),
                                                      ("landmarks", [1, PRIORS_320, 10])]
    info = m.target_info
    # the binding was established against PyTorch, and pnnx's names are what the file holds
    assert info["input_blob"] == "in0" and set(info["output_blobs"]) == {"loc", "conf", "landmarks"}
    assert len(set(info["output_blobs"].values())) == 3 and info["weights"] == "float32"
    check = info["output_check"]
    assert check["status"] == "passed" and check["conf_row_sum_max_error"] < 1e-4
    assert all(max(o["error_by_stride"].values()) < 1e-3 for o in check["outputs"].values())
    assert info["shapes"] == "static" and info["layer_types"]["Softmax"] == 1  # the softmax survived
    assert set(m.sha256) >= {"model.ncnn.param", "model.ncnn.bin", "parity/reference.json"}
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "ncnn"
    assert m.parity["detection_agreement"] >= 0.99 and m.parity["max_abs_diff"]["conf"] < 1e-4
    assert m.converter["versions"]["pnnx"] and m.converter["versions"]["ncnn"]
    assert "fp16=0" in m.converter["command"] and m.converter["checked_with"]["fp16"].startswith("off")


def test_detector_finds_the_astronaut_like_pytorch(fp32, astronaut_path):
    torch_face = _astronaut_face(Detector(resize="fixed:320x320"), astronaut_path)
    face = _astronaut_face(Detector(model=fp32.path), astronaut_path)
    assert face.box == pytest.approx(torch_face.box, abs=0.05)
    assert face.score == pytest.approx(torch_face.score, abs=1e-5)
    assert np.allclose(face.landmarks, torch_face.landmarks, atol=0.05)


def test_static_bundle_refuses_another_size(fp32):
    """ncnn itself would run a fixed-Reshape graph at another size and return arrays of the old shape filled from the
    wrong memory; the runtime refuses instead."""
    with open_runtime(model=fp32.path) as runtime:
        assert runtime.name == "ncnn" and runtime.describe()["shapes"] == "static"
        out = runtime.infer(np.zeros((2, 3, 320, 320), np.float32))
        assert {k: v.shape for k, v in out.items()} == {"loc": (2, PRIORS_320, 4), "conf": (2, PRIORS_320, 2),
                                                         "landmarks": (2, PRIORS_320, 10)}
        assert np.allclose(out["conf"].sum(axis=2), 1, atol=1e-5)
        with pytest.raises(EdgefaceError, match=r"expects NCHW input of shape \(N, 3, 320, 320\), got \(1, 3, 256"):
            runtime.infer(np.zeros((1, 3, 256, 256), np.float32))


def test_concurrent_calls_give_the_sequential_results(fp32, astronaut_path):
    """``concurrent = True``: one Net, an Extractor per call, from several threads at once."""
    from edgeface.core.images import load_image
    from edgeface.core.processing import ResizePolicy, preprocess

    image = load_image(astronaut_path)
    batches = [preprocess([image[i * 20:]], policy=ResizePolicy("fixed", (320, 320)), mean_bgr=(104, 117, 123))[0]
               for i in range(4)]
    with open_runtime(model=fp32.path, threads=1) as runtime:
        assert runtime.concurrent
        expected = [runtime.infer(b) for b in batches]
        results = [None] * len(batches)

        def work(i):
            for _ in range(3):
                results[i] = runtime.infer(batches[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, want in zip(results, expected):
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["target_info"]["output_blobs"].update(loc=m["target_info"]["output_blobs"]["conf"],
                                                       conf=m["target_info"]["output_blobs"]["loc"]),
     r"bound to 'loc' by the manifest, gives shape \[4200, 2\] for a 320x320 input, expected \[4200, 4\]"),
    (lambda m: m["target_info"].update(input_blob="input"),
     r"target_info.input_blob is 'input', but the model's inputs are \['in0'\]"),
    (lambda m: m["target_info"]["output_blobs"].update(conf="out9"), r"names \{'conf': 'out9'\}, but the model's"),
    (lambda m: m["target_info"]["output_blobs"].update(conf=m["target_info"]["output_blobs"]["loc"]),
     "binds one blob to two outputs"),
])
def test_runtime_refuses_a_manifest_that_lies(fp32, tmp_path, change, message):
    copy = _lying_copy(fp32, tmp_path, change)
    with pytest.raises(EdgefaceError, match=message):
        Detector(model=copy)


def test_a_static_model_under_a_dynamic_manifest_is_refused(fp32, tmp_path):
    def dynamic(m):
        m["input"]["shape"][2:] = ["height", "width"]
        m["dynamic"] = {"height": [32, 640, 2048], "width": [32, 640, 2048]}
        m["preprocessing"]["resize"] = "original"
        for out in m["outputs"]:
            out["shape"][1] = "priors"

    with pytest.raises(EdgefaceError, match=r"gives shape \[4200, 4\] for a 64x64 input, expected \[168, 4\]"):
        open_runtime(model=_lying_copy(fp32, tmp_path, dynamic))


def test_dynamic_fp16_runs_at_any_size(fp16_dynamic, fp32, astronaut_path):
    m = fp16_dynamic.manifest
    assert m.precision == "fp16" and m.input.shape == [1, 3, "height", "width"]
    assert m.dynamic == {"height": [32, 640, 2048], "width": [32, 640, 2048]}
    assert m.preprocessing["resize"] == "original" and m.target_info["shapes"] == "dynamic"
    check = m.target_info["output_check"]
    assert check["status"] == "passed" and len({tuple(s) for s in check["input_sizes"]}) >= 3
    assert m.parity["status"] == "passed" and m.parity["detection_agreement"] >= 0.99
    for policy in ("original", "longest:300", "fixed:256x384"):
        torch_face = _astronaut_face(Detector(resize=policy), astronaut_path)
        face = _astronaut_face(Detector(model=fp16_dynamic.path, resize=policy), astronaut_path)
        assert face.box == pytest.approx(torch_face.box, abs=1.0)  # fp16 weights: within a pixel
    import cv2

    image = cv2.imread(str(astronaut_path))
    batch = Detector(model=fp16_dynamic.path).detect([image, image[:300, :350]])
    assert [len(faces) for faces in batch] == [1, 1]


def test_fp16_weights_are_half_size_and_rounded_not_flushed(fp16_dynamic, fp32):
    """pnnx's own fp16 writer flushes weights below 2^-14 to zero (this model's first convolution sees 0-255 pixels
    and has such weights); edgeface re-encodes pnnx's fp32 weights with rounding to nearest and keeps them."""
    from edgeface.export.ncnn import NCNN_FP16_TAG, fp16_weights

    fp16_bin = (fp16_dynamic.path / "model.ncnn.bin").read_bytes()
    fp32_bin = (fp32.path / "model.ncnn.bin").read_bytes()
    assert int.from_bytes(fp16_bin[:4], "little") == NCNN_FP16_TAG and int.from_bytes(fp32_bin[:4], "little") == 0
    assert 0.45 < len(fp16_bin) / len(fp32_bin) < 0.55
    counts = fp16_dynamic.manifest.converter["fp16_weights"]
    assert counts["zeroed_by_pnnx_fp16"] > 100 and counts["fp16_subnormal"] == counts["zeroed_by_pnnx_fp16"]
    # the first convolution: 8 x 3 x 3 x 3 weights, re-encoded exactly as numpy rounds them
    param = (fp32.path / "model.ncnn.param").read_text()
    content, _ = fp16_weights(param, fp32_bin)
    first32 = np.frombuffer(fp32_bin, np.float32, 216, 4)
    first16 = np.frombuffer(content, np.float16, 216, 4)
    assert np.array_equal(first16, first32.astype(np.float16)) and (first16[np.abs(first32) < 2 ** -14] != 0).any()
    with pytest.raises(EdgefaceError, match="bytes the graph does not read"):
        fp16_weights(param, fp32_bin + b"\0" * 8)
    with pytest.raises(EdgefaceError, match="does not match layer"):
        fp16_weights(param, fp32_bin[:1000])


def test_fp16_compute_switch_and_what_ran(fp32):
    with open_runtime(model=fp32.path, fp16_compute=True) as runtime:
        described = runtime.describe()
    if ncnn.cpu_support_arm_asimdhp():
        assert described["fp16"].startswith("on")
    else:  # x86: ncnn has no fp16 arithmetic, and says so
        assert "no ncnn fp16 arithmetic" in described["fp16"]
    with pytest.raises(EdgefaceError, match="fp16_compute 'yes': give true or false"):
        open_runtime(model=fp32.path, fp16_compute="yes")
    with pytest.raises(EdgefaceError, match="xnnpack is not an option of the ncnn runtime"):
        open_runtime("ncnn", model=fp32.path, xnnpack=False)


def test_vulkan_device(fp32):
    from edgeface.runtimes.ncnn import vulkan_gpus

    count, _ = vulkan_gpus()
    if count:
        with open_runtime(model=fp32.path, device="vulkan") as runtime:
            assert runtime.describe()["device"].startswith("vulkan")
        return
    with pytest.raises(EdgefaceError, match=r"device 'vulkan': ncnn finds no Vulkan GPU here.*use --device cpu"):
        open_runtime(model=fp32.path, device="vulkan")


def test_damaged_files_are_refused(fp32, tmp_path):
    from edgeface.runtimes.ncnn import load_net

    weights = tmp_path / "w.bin"
    weights.write_bytes((fp32.path / "model.ncnn.bin").read_bytes()[:1000])
    with pytest.raises(EdgefaceError, match=r"ncnn could not load the weights .*re-export the bundle"):
        load_net(fp32.path / "model.ncnn.param", weights)
    param = tmp_path / "p.param"
    param.write_text("7767517\n1 1\nNoSuchLayer a 0 1 x\n")
    with pytest.raises(EdgefaceError, match=r"ncnn could not load the graph .*NoSuchLayer"):
        load_net(param, weights)
    copy = shutil.copytree(fp32.path, tmp_path / "copy")
    with open(copy / "model.ncnn.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EdgefaceError, match="does not match the sha256"):
        load_bundle(copy)


def test_scrambled_output_fails_the_export_and_writes_nothing(tmp_path, monkeypatch):
    """The output guard: a converter that scrambles the priors of one output (the failure other converters show)
    is caught on real images, and nothing is written."""
    import edgeface.export.ncnn as ncnn_export

    real = ncnn_export.run_net

    def scrambled(net, input_blob, image, blobs):
        out = real(net, input_blob, image, blobs)
        first = sorted(out)[0]
        out[first] = out[first][np.random.default_rng(0).permutation(len(out[first]))]
        return out

    monkeypatch.setattr(ncnn_export, "run_net", scrambled)
    with pytest.raises(EdgefaceError, match=r"no ncnn output reproduces PyTorch's '(loc|conf|landmarks)' on real "
                                            r"images .* scrambled"):
        export_bundle("ncnn", precision="fp32", imgsz=(320, 320), out=tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pnnx_failure_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import pnnx

    monkeypatch.setattr(pnnx, "EXEC_PATH", "/bin/false")
    with pytest.raises(EdgefaceError, match=r"pnnx failed \(exit status 1\); no ncnn model was written"):
        export_bundle("ncnn", precision="fp32", imgsz=(320, 320), out=tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_int8_and_options_are_refused(tmp_path):
    with pytest.raises(EdgefaceError, match=r"unknown precision for ncnn 'int8'.*choose from: fp16, fp32"):
        export_bundle("ncnn", precision="int8", out=tmp_path / "b", progress=False)
    with pytest.raises(EdgefaceError, match=r"--int8-io is not an option of the ncnn target"):
        export_bundle("ncnn", options={"int8_io": True}, out=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_cli_run_and_compare(fp32, astronaut_path, tmp_path, capsys):
    assert main(["run", "--model", str(fp32.path), "--source", str(astronaut_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and len(lines[0]["faces"]) == 1
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(astronaut_path, folder / "a.jpg")
    report = tmp_path / "compare.json"
    assert main(["compare", "torch", f"{fp32.path}@ncnn", "--images", str(folder), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["detection_agreement"] == 1.0
