"""Quantisation-aware training (QAT) for full-integer ONNX (QDQ) models, as onnxruntime runs them.

The network trains with fake quantisation at exactly the tensors onnxruntime's static quantiser (``quantize_static``,
QDQ, everything quantised: no float islands) quantises in the exported graph, and with the numerics it uses:

- weights: BatchNorm folded into the convolution (as the ONNX export and onnxsim fold it), then int8 per output
  channel, symmetric in -127..127 with scale max|w| / 127; the BatchNorm scale is divided back out so that the
  model keeps the reference layout (its checkpoint loads everywhere, as a float model);
- activations: uint8 per tensor, asymmetric, after every convolution (BatchNorm folded, before the activation),
  after every LeakyReLU, after the FPN's two additions, after each SSH module's concatenation + ReLU, at the
  input and at the three output concatenations; the softmax output at onnxruntime's fixed scale 1/255. Resize,
  Slice, Transpose and Reshape keep their input's quantisation, as in onnxruntime.

Activation scales and zero points start from onnxruntime's own min-max calibration of the same graph on training
images and are learned with the weights (LSQ+: Bhalgat et al. 2020, through torch's fused
``_fake_quantize_learnable_per_tensor_affine``). The points are named by the tensors of the exported graph; the
learned values go to ``quantize_static`` as ``TensorQuantOverrides``, so the integer model onnxruntime runs is the
one that was trained. :func:`quantisation_points` checks, before any training, that the points are exactly the
tensors onnxruntime quantises.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgeface.core.errors import EdgefaceError
from edgeface.export.base import quiet
from edgeface.export.onnx import PASS_THROUGH, export_float, quantised_tensors, simplify, to_int8
from edgeface.models.retinaface import SSH, RetinaFace
from edgeface.training.batchnorm import conv_batchnorm_pairs

# onnxruntime's ranges: uint8 activations, int8 symmetric weights without -128 (WeightSymmetric), and the fixed
# output quantisation of QLinearSoftmax.
ACTIVATION_RANGE = (0, 255)
WEIGHT_LIMIT = 127
SOFTMAX_SCALE = 1 / 255


@dataclass(frozen=True)
class QuantizationScheme:
    """What the fake quantisation simulates (written into the QAT record and the bundle manifest)."""

    runtime: str = "onnxruntime static quantisation, QDQ, every operator quantised"
    weights: str = "int8 per output channel, symmetric (-127..127), BatchNorm folded first"
    activations: str = "uint8 per tensor, asymmetric; scale and zero point learned (LSQ+), from min-max calibration"
    softmax: str = "uint8, scale 1/255, zero point 0 (onnxruntime's QLinearSoftmax)"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class ActivationFakeQuant(nn.Module):
    """uint8 per-tensor fake quantisation with a learned scale (as its log, so that steps are relative) and zero
    point."""

    def __init__(self, scale: float, zero_point: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.zero_point = nn.Parameter(torch.tensor(float(zero_point)))

    def forward(self, x: Tensor) -> Tensor:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.log_scale.exp().reshape(1), self.zero_point.reshape(1), *ACTIVATION_RANGE, 1.0)

    def parameters_as_quantised(self) -> tuple[float, int]:
        """(scale, integer zero point) as the exported graph will hold them."""
        zero = int(np.clip(round(float(self.zero_point.detach())), *ACTIVATION_RANGE))
        return float(self.log_scale.detach().exp()), zero


class FoldedWeightFakeQuant(nn.Module):
    """Parametrisation of a convolution's weight: fold the following BatchNorm's scale in, quantise per output
    channel to int8 as onnxruntime will, divide the scale back out (straight-through gradients)."""

    def __init__(self, batchnorm: nn.BatchNorm2d | None) -> None:
        super().__init__()
        self._batchnorm = (batchnorm,)  # a tuple: the BatchNorm stays a module of the network, not of this

    def fold_factor(self, weight: Tensor) -> Tensor:
        bn = self._batchnorm[0]
        if bn is None:
            return torch.ones(weight.shape[0], 1, 1, 1, dtype=weight.dtype, device=weight.device)
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return factor.reshape(-1, 1, 1, 1)

    def forward(self, weight: Tensor) -> Tensor:
        factor = self.fold_factor(weight)
        folded = weight * factor
        scale = (folded.detach().abs().amax(dim=(1, 2, 3)) / WEIGHT_LIMIT).clamp(min=1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        quantised = torch.fake_quantize_per_channel_affine(folded, scale, zero, 0, -WEIGHT_LIMIT, WEIGHT_LIMIT)
        return quantised / factor


def _scope(root: nn.Module, path: str) -> str:
    """The TorchScript ONNX exporter's scope of a module path: ``body.stage1.0.0`` ->
    ``/body/stage1/stage1.0/stage1.0.0``, ``BboxHead.2.conv1x1`` -> ``/BboxHead.2/conv1x1`` (a ModuleList is no
    scope of its own; a Sequential child is named ``parent.index``)."""
    parts, names = path.split("."), []
    for i in range(len(parts)):
        if isinstance(root.get_submodule(".".join(parts[: i + 1])), nn.ModuleList):
            continue
        start = i
        while start > 0 and parts[start].isdigit():
            start -= 1
        names.append(".".join(parts[start: i + 1]))
    return "/" + "/".join(names)


def _conv_batchnorm(net: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(path, convolution, the BatchNorm right after it in its Sequential or None) for every convolution."""
    following = dict(conv_batchnorm_pairs(net))
    return [(path, m, following.get(m)) for path, m in net.named_modules() if isinstance(m, nn.Conv2d)]


class QuantizationAwareRetinaFace(nn.Module):
    """A :class:`~edgeface.models.retinaface.RetinaFace` with onnxruntime's quantisation simulated (see the module
    docstring). ``initial``: exported tensor name -> (scale, zero point) to start from, one for each point (see
    :func:`onnxruntime_parameters`); the network's BatchNorm statistics are frozen.

    ``forward`` returns (loc (N, A, 4), conf (N, A, 2) softmax on the 1/255 grid, landmarks (N, A, 10));
    ``forward_logits`` the class logits instead of conf, for the losses.
    """

    def __init__(self, net: RetinaFace, initial: dict[str, tuple[float, int]]) -> None:
        super().__init__()
        self.net = net
        self.points = nn.ModuleDict()
        self.names: dict[str, str] = {}  # ModuleDict key -> exported tensor name
        self.config = net.config  # what runtimes and manifests read of a RetinaFace
        self.weights_info = getattr(net, "weights_info", None)
        missing = sorted(set(self.point_names()) - set(initial))
        if missing:
            raise EdgefaceError(f"no starting quantisation parameters for {len(missing)} tensors (e.g. {missing[0]})")
        for name in self.point_names():
            key = self._key(name)
            self.points[key] = ActivationFakeQuant(*initial[name])
            self.names[key] = name
        for path, conv, bn in _conv_batchnorm(net):
            parametrize.register_parametrization(conv, "weight", FoldedWeightFakeQuant(bn))
            after = bn if bn is not None else conv
            self._after(after, f"{_scope(net, path)}/Conv_output_0")
        for path, module in net.named_modules():
            if isinstance(module, nn.LeakyReLU):
                module.inplace = False  # the hook replaces the output
                self._after(module, f"{_scope(net, path)}/LeakyRelu_output_0")
            elif isinstance(module, SSH):
                self._after(module, f"/{path}/Relu_output_0")
        # the FPN's additions are the inputs of its merge blocks
        self._before(net.fpn.merge2, "/fpn/Add_output_0")
        self._before(net.fpn.merge1, "/fpn/Add_1_output_0")
        self.freeze_batchnorm()

    @staticmethod
    def point_names_of(net: RetinaFace) -> list[str]:
        names = ["input", "loc", "/Concat_1_output_0", "landmarks", "/fpn/Add_output_0", "/fpn/Add_1_output_0"]
        names += [f"{_scope(net, path)}/Conv_output_0" for path, _, _ in _conv_batchnorm(net)]
        for path, module in net.named_modules():
            if isinstance(module, nn.LeakyReLU):
                names.append(f"{_scope(net, path)}/LeakyRelu_output_0")
            elif isinstance(module, SSH):
                names.append(f"/{path}/Relu_output_0")
        return names

    def point_names(self) -> list[str]:
        return self.point_names_of(self.net)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", ":").replace("/", "|") or "_"

    def _point(self, name: str) -> ActivationFakeQuant:
        return self.points[self._key(name)]

    # Hooks are bound methods (not closures) so that a deep copy of the model (validation) uses its own points.
    def _quantise_output(self, key: str, _module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        return self.points[key](output)

    def _quantise_input(self, key: str, _module: nn.Module, inputs: tuple) -> tuple:
        return (self.points[key](inputs[0]), *inputs[1:])

    def _after(self, module: nn.Module, name: str) -> None:
        module.register_forward_hook(functools.partial(self._quantise_output, self._key(name)))

    def _before(self, module: nn.Module, name: str) -> None:
        module.register_forward_pre_hook(functools.partial(self._quantise_input, self._key(name)))

    def freeze_batchnorm(self) -> None:
        """BatchNorm statistics and scales stay as they are (their folding is what is quantised); shifts train."""
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
                module.weight.requires_grad_(False)

    def train(self, mode: bool = True) -> "QuantizationAwareRetinaFace":
        super().train(mode)
        self.freeze_batchnorm()
        return self

    def forward_logits(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, logits, landmarks = self.net.forward_logits(self._point("input")(images))
        return self._point("loc")(loc), self._point("/Concat_1_output_0")(logits), self._point("landmarks")(landmarks)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, logits, landmarks = self.forward_logits(images)
        conf = F.softmax(logits, dim=-1)
        steps = conf / SOFTMAX_SCALE
        conf = (steps + (steps.round() - steps).detach()).clamp(*ACTIVATION_RANGE) * SOFTMAX_SCALE
        return loc, conf, landmarks

    def learned_parameters(self) -> dict[str, tuple[float, int]]:
        """Exported tensor name -> (scale, zero point), as the integer graph will hold them."""
        return {self.names[key]: point.parameters_as_quantised() for key, point in self.points.items()}

    def float_state_dict(self) -> dict[str, Tensor]:
        """The network's weights in the reference layout (the float weights the fake quantisation acts on)."""
        out = {}
        for key, value in self.net.state_dict().items():
            out[key.replace("parametrizations.weight.original", "weight")] = value.detach().cpu().clone()
        return out


def onnxruntime_parameters(net: RetinaFace, calibration: Sequence[np.ndarray], input_hw: tuple[int, int],
                           *, opset: int = 17) -> dict[str, tuple[float, int]]:
    """Exported tensor name -> (scale, zero point) of every activation onnxruntime quantises when it quantises
    ``net`` fully (nothing kept in float) with min-max calibration on ``calibration`` (NCHW float32 batches,
    mean subtracted): the starting point of QAT. Raises :class:`EdgefaceError` when these tensors are not exactly
    the points of :class:`QuantizationAwareRetinaFace` (an exporter that names tensors differently)."""
    proto = simplify(export_float(net.eval(), input_hw, False, opset), input_hw)
    images = tuple(image[None] for batch in calibration for image in batch)  # the graph takes one image
    with quiet("onnxruntime min-max calibration for QAT"):  # its generic advice on the root logger
        quantised, _ = to_int8(proto, images, keep_float=())
    found = quantised_tensors(quantised)
    pass_through = {n.output[0] for n in proto.graph.node if n.op_type in PASS_THROUGH}
    activations = {name: value for name, value in found.items() if name not in pass_through and name != "conf"}
    expected = set(QuantizationAwareRetinaFace.point_names_of(net))
    if set(activations) != expected:
        extra, missing = sorted(set(activations) - expected), sorted(expected - set(activations))
        raise EdgefaceError(
            "the tensors onnxruntime quantises do not match the QAT points (exporter naming changed?): "
            f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(missing)} missing (e.g. {missing[:2]})")
    return activations
