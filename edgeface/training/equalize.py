"""Activation equalisation of the full-resolution MobileNet stage, so that its activations survive per-tensor int8.

Full-integer INT8 quantises each activation tensor with one scale. In ``body.stage1`` of RetinaFace-MobileNet0.25
the channels of an activation differ in range by orders of magnitude, so one scale wipes out the narrow channels:
with every operator quantised (onnxruntime, min-max) WIDER AP at 640 x 640 falls by 5.9 / 6.9 / 4.9 points (easy /
medium / hard, 200 val images), and keeping only stage1's activations in float recovers all of it.

LeakyReLU (like ReLU) commutes with a positive per-channel scale, and a depthwise convolution acts channel by
channel, so in each ``conv -> BN -> act -> depthwise -> BN -> act -> conv`` chain the two activations of a channel can
be rescaled by 1/s1 and 1/s2 and the change undone in the convolution that reads them: the network computes the
same function (cross-layer equalisation, Nagel et al., ICCV 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"). The scales are s = (r / max r) ** 0.5 for the channel ranges r measured on
training images: a migration strength of 0.5 as in SmoothQuant (Xiao et al., ICML 2023), here on the activation
ranges alone (the next convolution's weights are quantised per output channel). It halves the spread of ranges, in
log terms, that the one scale must cover; the rest moves into the weights. 0.5 measured best of 0.3-1.0 (README).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from edgeface.training.batchnorm import observe

STRENGTH = 0.5


def _triplets(stage: nn.Sequential) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]]:
    """(convolution, BatchNorm, activation) in order through a MobileNet stage's blocks."""
    modules = [m for block in stage for m in (block if isinstance(block, nn.Sequential) else [block])]
    return [(a, b, c) for a, b, c in zip(modules[::3], modules[1::3], modules[2::3])
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]


def _scale_output(bn: nn.BatchNorm2d, factor: Tensor) -> None:
    """Multiply a BatchNorm's output channels by ``factor`` (> 0)."""
    bn.weight.mul_(factor)
    bn.bias.mul_(factor)


def _scale_input(bn: nn.BatchNorm2d, factor: Tensor) -> None:
    """Keep a BatchNorm's output when its input channels are multiplied by ``factor`` (>= 1): mean x factor, and
    the variance such that sqrt(var + eps) scales by exactly ``factor`` (non-negative for factors >= 1)."""
    bn.running_mean.mul_(factor)
    bn.running_var.copy_((bn.running_var + bn.eps) * factor * factor - bn.eps)


@torch.no_grad()
def equalize_activations(stage: nn.Sequential, model: nn.Module, batches: Iterable[Tensor], *,
                         strength: float = STRENGTH) -> int:
    """Equalise the activation ranges inside ``stage`` (e.g. ``model.body.stage1``) of ``model``, measured on
    ``batches`` of network inputs (N, 3, H, W) float32; ``model`` computes the same function afterwards (to float
    rounding). The stage's last activation, read outside it, is left as it is. Returns the number of chains
    equalised. Raises ValueError for a stage that is not conv / depthwise / conv chains."""
    layers = _triplets(stage)
    for k in range(1, len(layers) - 1, 2):
        depthwise = layers[k][0]
        if depthwise.groups != depthwise.in_channels or depthwise.groups != depthwise.out_channels:
            raise ValueError(f"layer {k} of the stage is not a depthwise convolution: not a MobileNet stage")
    ranges: dict[int, Tensor] = {}

    def record(index):
        def hook(_module, _inputs, output):
            span = output.amax(dim=(0, 2, 3)) - output.amin(dim=(0, 2, 3))
            ranges[index] = torch.maximum(ranges[index], span) if index in ranges else span
        return hook

    observe(model, [(act, record(i)) for i, (_, _, act) in enumerate(layers)], batches)
    chains = 0
    for k in range(0, len(layers) - 2, 2):
        (_, first_bn, _), (_, depthwise_bn, _), (reader, _, _) = layers[k:k + 3]
        s1 = (ranges[k] / ranges[k].max()).clamp(min=1e-4) ** strength  # <= 1: narrow channels are widened
        s2 = (ranges[k + 1] / ranges[k + 1].max()).clamp(min=1e-4) ** strength
        _scale_output(first_bn, 1 / s1)  # activation 1 of channel c: x 1/s1
        _scale_input(depthwise_bn, 1 / s1)  # the depthwise convolution passes it on, channel by channel
        _scale_output(depthwise_bn, 1 / s2)  # activation 2 of channel c: x 1/s2
        reader.weight.mul_(s2.reshape(1, -1, 1, 1))  # the next convolution reads channel c x s2 again
        chains += 1
    return chains
