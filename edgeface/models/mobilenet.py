"""MobileNetV1 x0.25, the backbone of RetinaFace-MobileNet0.25.

Module names mirror the reference implementation (biubug6/Pytorch_Retinaface ``models/net.py``) so that its
checkpoints load key for key: ``stage1.0.0`` is a convolution, ``stage1.0.1`` its BatchNorm.
"""

from __future__ import annotations

from torch import Tensor, nn

from edgeface.models.layers import conv_bn


def _depthwise_separable(in_ch: int, out_ch: int, stride: int, negative_slope: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.LeakyReLU(negative_slope, inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.LeakyReLU(negative_slope, inplace=True),
    )


class MobileNetV1(nn.Module):
    """Returns the stride-8, 16 and 32 feature maps (64, 128 and 256 channels)."""

    out_channels = (64, 128, 256)

    def __init__(self, *, negative_slope: float) -> None:
        super().__init__()
        dw = lambda i, o, s: _depthwise_separable(i, o, s, negative_slope)  # noqa: E731
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 3, stride=2, negative_slope=negative_slope),
            dw(8, 16, 1),
            dw(16, 32, 2),
            dw(32, 32, 1),
            dw(32, 64, 2),
            dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(dw(64, 128, 2), *(dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(dw(128, 256, 2), dw(256, 256, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return c3, c4, c5
