import pytest
import torch

from edgeface import EdgefaceError
from edgeface.core.processing import AnchorSpec
from edgeface.models import RetinaFaceConfig, get_model, list_models
from edgeface.models.retinaface import MNET025


def test_registry_lists_both_backbones():
    assert list_models() == ["retinaface_mnet025", "retinaface_r50"]


def test_unknown_model_suggests_nearest():
    with pytest.raises(EdgefaceError, match="did you mean 'retinaface_mnet025'"):
        get_model("retinaface_mnet25")


@pytest.mark.parametrize("hw", [(320, 320), (480, 640), (100, 150), (37, 61)])
def test_mnet025_output_shapes(hw):
    model = get_model("mnet025")
    with torch.inference_mode():
        loc, conf, landmarks = model(torch.zeros(2, 3, *hw))
    priors = AnchorSpec().num_priors(hw)
    assert loc.shape == (2, priors, 4)
    assert conf.shape == (2, priors, 2)
    assert landmarks.shape == (2, priors, 10)
    assert torch.allclose(conf.sum(-1), torch.ones(2, priors))  # softmax in the graph


@pytest.mark.parametrize("hw", [(64, 96), (100, 70)])
def test_r50_output_shapes(hw):
    model = get_model("r50")
    with torch.inference_mode():
        loc, conf, landmarks = model(torch.zeros(1, 3, *hw))
    priors = AnchorSpec().num_priors(hw)
    assert (loc.shape, conf.shape, landmarks.shape) == ((1, priors, 4), (1, priors, 2), (1, priors, 10))


def test_parameter_counts_match_reference():
    # Reference figures: MobileNet-0.25 RetinaFace 426,608 weights (+ BN buffers); ResNet-50 RetinaFace ~27.3M.
    mnet = sum(p.numel() for p in get_model("mnet025").parameters())
    r50 = sum(p.numel() for p in get_model("r50").parameters())
    assert mnet == 426_608
    assert 27_000_000 < r50 < 27_600_000


def test_state_dict_keys_follow_reference_layout():
    keys = set(get_model("mnet025").state_dict())
    assert {"body.stage1.0.0.weight", "body.stage3.1.4.running_var", "fpn.merge1.0.weight",
            "ssh3.conv7x7_3.1.bias", "LandmarkHead.2.conv1x1.bias"} <= keys
    assert "body.layer4.2.bn3.weight" in get_model("r50").state_dict()


def test_activation_is_configuration():
    relu = get_model("mnet025", negative_slope=0.0)
    slopes = {m.negative_slope for m in relu.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.0}
    assert {m.negative_slope for m in get_model("mnet025").modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.1}


def test_config_round_trips_through_dict():
    data = MNET025.to_dict()
    assert data["anchors"] == {"min_sizes": [[16, 32], [64, 128], [256, 512]], "steps": [8, 16, 32],
                               "variance": [0.1, 0.2]}
    assert data["negative_slope"] == 0.1 and data["mean_bgr"] == [104.0, 117.0, 123.0]
    assert isinstance(MNET025.replace(negative_slope=0.0), RetinaFaceConfig)


def test_upsampling_uses_fixed_scale_factor_in_export():
    """Export-friendliness: a static Resize whose scales are constants, and no size read from a tensor."""
    import io

    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(get_model("mnet025"), torch.zeros(1, 3, 320, 320), buffer, dynamo=False,
                      input_names=["input"], output_names=["loc", "conf", "landmarks"], opset_version=17)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    assert [o.name for o in graph.output] == ["loc", "conf", "landmarks"]
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    for node in resizes:  # inputs: X, roi, scales[, sizes]; scales must be a constant
        assert node.input[2] in constants
        assert len(node.input) < 4 or not node.input[3]
