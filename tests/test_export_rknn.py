"""RKNN bundles (Rockchip NPUs): rknn-toolkit2 converts the model for one SoC, and its simulator, in the process that
built the model, checks it against PyTorch through the shared pipeline (parity on real images); the compiler's
operator table gives the placement; bad SoCs and fp16 on an int8-only chip are refused in one line; a failed export
writes nothing; the rknn runtime refuses to open a bundle here (rknn-toolkit-lite2 is the board's), and reads
outputs as its manifest says (checked with a stand-in RKNNLite).

rknn-toolkit2 pins torch <= 2.4 and numpy <= 1.26.4, so it lives in its own environment: scripts/test-rknn.sh makes
.venv-rknn and runs this file there with EDGEFACE_RKNN_REQUIRED=1, which turns the toolkit's absence into a
failure. Elsewhere the conversion tests skip, saying why; the rest runs everywhere. Small inputs (320x320) and 8
calibration images: each conversion takes a few seconds."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
from edgeface.export import check_options, get_spec
from edgeface.export.base import ExportRequest
from edgeface.export.rknn import SOCS, check_request
from edgeface.runtimes import open_runtime
from edgeface.runtimes.rknn import RknnRuntime

from edgeface import EdgefaceError
from edgeface.cli import main
from edgeface.core.manifest import manifest_for_config
from edgeface.core.model_config import MNET025

REQUIRED_ENV = "EDGEFACE_RKNN_REQUIRED"
REQUIRED = os.environ.get(REQUIRED_ENV) == "1"
SIZE = (320, 320)
PRIORS = 2 * (40 * 40 + 20 * 20 + 10 * 10)
CALIB_N = 8


def _toolkit():
    try:
        import rknn.api  # noqa: F401
    except ImportError as exc:
        reason = (f"rknn-toolkit2 is not importable here ({exc}): it pins torch <= 2.4 and numpy <= 1.26.4 and runs "
                  "in its own environment, scripts/test-rknn.sh (.venv-rknn)")
        if REQUIRED:
            pytest.fail(f"{reason} ({REQUIRED_ENV}=1)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def int8(tmp_path_factory, calib_dir):
    _toolkit()
    from edgeface.export.pipeline import export_bundle

    return export_bundle("rknn", imgsz=SIZE, calib=calib_dir, calib_n=CALIB_N, progress=False,
                         out=tmp_path_factory.mktemp("bundles") / "int8")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    _toolkit()
    from edgeface.export.pipeline import export_bundle

    return export_bundle("rockchip", precision="fp16", imgsz=SIZE, options={"soc": "rk3566"}, progress=False,
                         out=tmp_path_factory.mktemp("bundles") / "fp16")


# --- conversion in the simulator (rknn-toolkit2) -------------------------------------------------------------------


def test_int8_bundle_contract_and_parity(int8):
    m = int8.manifest
    assert m.target == "rknn" and m.precision == "int8" and m.files == {"model": "model.rknn"}
    assert m.input.layout == "NHWC" and m.input.dtype == "float32" and m.input.shape == [1, *SIZE, 3]
    assert not m.preprocessing["mean_in_graph"] and m.preprocessing["resize"] == "fixed:320x320"
    assert [(o.name, o.shape, o.dtype) for o in m.outputs] == [
        ("loc", [1, PRIORS, 4], "float32"), ("conf", [1, PRIORS, 2], "float32"), ("landmarks", [1, PRIORS, 10], "float32")]
    # parity ran in the simulator, through the runtime the converter handed over, and passed the INT8 tolerance
    assert m.parity["status"] == "passed" and m.parity["runtime"] == "rknn"
    assert m.parity["detection_agreement"] >= 0.75 and m.parity["landmark_error"] <= 0.04
    info = m.target_info
    assert info["soc"] == "rk3588" and info["toolkit"].startswith("rknn-toolkit2 ")
    assert info["output_order"] == ["loc", "conf", "landmarks"]
    place = info["placement"]
    assert 0 < place["npu_nodes"] <= place["total_nodes"] and len(place["cpu_fallback"]) == (
        place["total_nodes"] - place["npu_nodes"])
    assert place["npu_share"] >= 0.9  # convolutions, activations, concatenations, softmax on the NPU
    cal = m.calibration
    assert cal["images"] == CALIB_N and cal["dtype"] == "w8a8" and cal["algorithm"] == "normal"
    # the recipe: MobileNet stage1 in float16 by rknn's hybrid quantisation, the rest int8
    assert cal["keep_float"] == ["/body/stage1/"] and cal["tool"].endswith("hybrid_quantization_step1 / step2")
    assert cal["nodes_kept_float"] and all(n.startswith("/body/stage1/") for n in cal["nodes_kept_float"])
    analysis = cal["accuracy_analysis"]
    assert set(analysis["outputs_cos"]) == {"loc", "conf", "landmarks"} and analysis["worst_layers"]
    assert all(0 <= layer["cos"] <= 1.0001 for layer in analysis["worst_layers"])
    # the manifest on disk is the one the schema and rules accept (load_bundle validated it)
    assert json.loads((int8.path / "manifest.json").read_text())["target_info"]["soc"] == "rk3588"


def test_fp16_bundle_for_an_fp16_soc(fp16):
    m = fp16.manifest
    assert m.precision == "fp16" and m.calibration is None and m.target_info["soc"] == "rk3566"
    assert m.parity["status"] == "passed" and m.parity["detection_agreement"] >= 0.97
    assert m.parity["landmark_error"] <= 0.01
    assert m.target_info["placement"]["dtypes"].get("INT8", 0) == 0  # nothing quantised


def test_the_runtime_refuses_the_bundle_here_saying_why(int8):
    """rknn-toolkit-lite2 is the board's runtime (aarch64 wheels); a .rknn loaded back from disk cannot run in the
    simulator either: the bundle is refused in one line."""
    with pytest.raises(EdgefaceError, match=r"the rknn runtime needs rknn-toolkit-lite2 .*aarch64 wheels only"):
        open_runtime(model=int8.path)


def test_a_failed_export_writes_nothing(tmp_path, calib_dir):
    _toolkit()
    from edgeface.export.pipeline import export_bundle

    with pytest.raises(EdgefaceError, match="keep_float '/no/such/layer/' names no tensor"):
        export_bundle("rknn", imgsz=SIZE, calib=calib_dir, calib_n=4, progress=False, out=tmp_path / "b",
                      options={"keep_float": ["/no/such/layer/"]})
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_fp16_on_an_int8_only_soc_is_refused_before_any_work(tmp_path, capsys):
    assert main(["export", "--target", "rknn", "--precision", "fp16", "--soc", "rv1106", "--imgsz", "320x320",
                 "--out", str(tmp_path / "b")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgeface: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "edgeface: error: --precision fp16 is not available for --soc rv1106: its NPU computes in int8 only")
    assert not (tmp_path / "b").exists()


# --- everywhere (no toolkit needed) --------------------------------------------------------------------------------


def test_without_the_toolkit_the_export_says_where_it_lives_before_any_work(tmp_path, capsys):
    """Outside .venv-rknn the export stops at once (no model built, no calibration image read), naming the
    environment; checked where rknn-toolkit2 is absent."""
    try:
        import rknn.api  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("rknn-toolkit2 is importable here: the refusal is for environments without it")
    assert main(["export", "--target", "rknn", "--calib", str(tmp_path / "absent"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "calibrating" not in err and "converting" not in err
    assert err.strip().splitlines()[-1].startswith("edgeface: error: the rknn target needs rknn-toolkit2")
    assert ".venv-rknn" in err and not (tmp_path / "b").exists()


def test_a_bad_soc_is_refused_in_one_line(tmp_path, capsys):
    assert main(["export", "--target", "rknn", "--soc", "rk9999", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err == ("edgeface: error: --soc 'rk9999' is not supported: give " + ", ".join(SOCS)
                   + " (default rk3588)\n")
    assert not (tmp_path / "b").exists()


def test_spec_and_request_checks():
    spec = get_spec("rockchip")
    assert spec.name == "rknn" and spec.precisions == ("int8", "fp16") and spec.calibrated == ("int8",)
    assert not spec.dynamic and spec.option("soc").flag == "--soc"
    check_options("rknn", {"soc": "rv1106", "algorithm": "mmse", "keep_float": ["heads"]})
    assert check_request(ExportRequest("rknn", "fp16", SIZE, options={"soc": "rk3576"})) == "rk3576"
    for soc, chip in SOCS.items():
        request = ExportRequest("rknn", "fp16", SIZE, options={"soc": soc})
        if chip["fp16"]:
            check_request(request)
        else:
            with pytest.raises(EdgefaceError, match=f"fp16 is not available for --soc {soc}"):
                check_request(request)
    with pytest.raises(EdgefaceError, match="option 'algorithm' is for --precision int8"):
        check_request(ExportRequest("rknn", "fp16", SIZE, options={"algorithm": "mmse"}))


def _rknn_manifest(order=("loc", "conf", "landmarks")):
    return manifest_for_config(MNET025, None, target="rknn", precision="int8",
                               files={"model": "model.rknn"}, layout="NHWC", input_hw=SIZE,
                               target_info={"soc": "rk3588", "toolkit": "rknn-toolkit2 2.5.0",
                                            "output_order": list(order),
                                            "placement": {"npu_nodes": 1, "total_nodes": 1, "npu_share": 1.0,
                                                          "cpu_fallback": []}})


class _FakeRKNNLite:
    """Stands in for rknnlite.api.RKNNLite: records calls, returns outputs in a given order and shapes."""

    NPU_CORE_AUTO, NPU_CORE_0, NPU_CORE_1, NPU_CORE_2, NPU_CORE_0_1_2 = 0, 1, 2, 4, 7
    returned: list | None = None

    def __init__(self, verbose=False):
        self.calls = []

    def load_rknn(self, path):
        self.calls.append(("load_rknn", path))
        return 0

    def init_runtime(self, core_mask=0):
        self.calls.append(("init_runtime", core_mask))
        return 0

    def inference(self, inputs, data_format=None):
        self.calls.append(("inference", inputs[0].shape, inputs[0].dtype, data_format))
        if self.returned is not None:
            return self.returned
        x = inputs[0]
        value = float(x.mean())
        # the model's own output shapes: rknn returns what the graph returns, (1, A, k)
        return [np.full((1, PRIORS, 4), value, np.float32), np.full((1, PRIORS, 2), 0.5, np.float16),
                np.full((1, PRIORS, 10), -value, np.float32)]

    def release(self):
        self.calls.append(("release",))


def test_runtime_io_with_a_stand_in_rknnlite():
    manifest = _rknn_manifest(order=("conf", "loc", "landmarks"))
    engine = _FakeRKNNLite()
    engine.returned = [np.full((1, PRIORS, 1, 2), 0.25, np.float16), np.ones((1, PRIORS, 4), np.float32),
                       np.zeros((1, PRIORS * 10), np.float32)]
    runtime = RknnRuntime(manifest, engine, source="fake")
    batch = np.random.default_rng(0).normal(size=(2, *SIZE, 3)).astype(np.float32)
    out = runtime.infer(batch)
    assert {k: v.shape for k, v in out.items()} == {"loc": (2, PRIORS, 4), "conf": (2, PRIORS, 2),
                                                    "landmarks": (2, PRIORS, 10)}
    assert all(v.dtype == np.float32 for v in out.values())
    assert out["conf"].max() == 0.25 and out["loc"].min() == 1  # bound by output_order, not position
    assert [c for c in engine.calls if c[0] == "inference"] == [("inference", (1, *SIZE, 3), np.float32, "nhwc")] * 2
    with pytest.raises(EdgefaceError, match=r"expects NHWC input of shape \(N, 320, 320, 3\)"):
        runtime.infer(np.zeros((1, 3, *SIZE), np.float32))
    engine.returned = engine.returned[:2]
    with pytest.raises(EdgefaceError, match="returned 2 outputs, expected 3"):
        runtime.infer(batch[:1])
    engine.returned = [np.zeros((1, 5, 2)), np.zeros((1, PRIORS, 4)), np.zeros((1, PRIORS, 10))]
    with pytest.raises(EdgefaceError, match=r"output 'conf' has 10 values"):
        runtime.infer(batch[:1])
    runtime.close()
    assert engine.calls[-1] == ("release",) and runtime.engine is None
    with pytest.raises(EdgefaceError, match="is closed"):
        runtime.infer(batch[:1])


def test_runtime_open_on_a_board_uses_rknnlite(monkeypatch, tmp_path):
    """With rknnlite importable (a board), open() loads the .rknn and sets the core mask of --device."""
    engines = []

    class Lite(_FakeRKNNLite):
        def __init__(self, verbose=False):
            super().__init__(verbose)
            engines.append(self)

    module = types.ModuleType("rknnlite.api")
    module.RKNNLite = Lite
    monkeypatch.setitem(sys.modules, "rknnlite", types.ModuleType("rknnlite"))
    monkeypatch.setitem(sys.modules, "rknnlite.api", module)
    bundle = types.SimpleNamespace(path=tmp_path, manifest=_rknn_manifest(), file=lambda role="model": tmp_path / "m.rknn")
    runtime = RknnRuntime.open(bundle, device="npu:all")
    assert engines[0].calls == [("load_rknn", str(tmp_path / "m.rknn")), ("init_runtime", 7)]
    assert runtime.describe()["backend"] == "rknn-toolkit-lite2" and runtime.describe()["soc"] == "rk3588"
    runtime.close()
    assert engines[0].calls[-1] == ("release",)
    with pytest.raises(EdgefaceError, match="unknown device 'npu:9' for the rknn runtime"):
        open_runtime("rknn", model=tmp_path, device="npu:9")


def test_runtime_without_rknnlite_says_why(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rknnlite", None)
    bundle = types.SimpleNamespace(path=tmp_path, manifest=_rknn_manifest(), file=lambda role="model": tmp_path)
    with pytest.raises(EdgefaceError) as info:
        RknnRuntime.open(bundle)
    message = str(info.value)
    assert message.startswith("the rknn runtime needs rknn-toolkit-lite2") and "\n" not in message
    import platform

    if platform.machine() not in ("aarch64", "arm64"):
        assert "Linux aarch64 wheels only" in message and "simulator" in message


def test_the_manifest_rules_of_rknn_bundles():
    from edgeface.core.manifest import validate_manifest

    good = _rknn_manifest().to_dict()
    good["sha256"] = {"model.rknn": "0" * 64}
    validate_manifest(good, "m")
    bad = json.loads(json.dumps(good))
    bad["target_info"]["placement"].update(npu_nodes=1, total_nodes=2, npu_share=0.5)
    with pytest.raises(EdgefaceError, match=r"cpu_fallback names 0 nodes, but 1 are not on the NPU"):
        validate_manifest(bad, "m")
    bad = json.loads(json.dumps(good))
    bad["target_info"]["placement"]["npu_share"] = 0.5
    with pytest.raises(EdgefaceError, match=r"npu_share 0.5, expected 1.0000"):
        validate_manifest(bad, "m")
    bad = json.loads(json.dumps(good))
    bad["precision"] = "fp32"
    with pytest.raises(EdgefaceError, match="precision"):
        validate_manifest(bad, "m")
    bad = json.loads(json.dumps(good))
    del bad["target_info"]["placement"]
    with pytest.raises(EdgefaceError, match="placement"):
        validate_manifest(bad, "m")
