"""Building blocks shared by the backbones and the RetinaFace neck."""

from __future__ import annotations

from torch import nn


def conv_bn(
    in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, negative_slope: float | None
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ LeakyReLU unless ``negative_slope`` is None).

    ``negative_slope=0.0`` is a plain ReLU; keeping LeakyReLU for it keeps the module tree identical for both
    activations, so one checkpoint layout serves both.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if negative_slope is not None:
        layers.append(nn.LeakyReLU(negative_slope, inplace=True))
    return nn.Sequential(*layers)
