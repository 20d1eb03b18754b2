"""RetinaFace (Deng et al., arXiv 1905.00641): backbone, 3-level FPN, SSH context modules, and class / box /
5-landmark heads on each level.

Module names follow the reference implementation (biubug6/Pytorch_Retinaface) so its checkpoints load as they are.
Export-friendly by construction: the FPN upsamples by a fixed factor of 2, and there is no Python control flow on
tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeface.core.model_config import MNET025, R50, RetinaFaceConfig
from edgeface.models.layers import conv_bn
from edgeface.models.mobilenet import MobileNetV1
from edgeface.models.resnet import ResNet50

# The configurations are data in edgeface.core.model_config (a device install reads them without PyTorch).
__all__ = ["MNET025", "R50", "RetinaFaceConfig", "RetinaFace", "OUTPUT_NAMES", "NUM_LANDMARKS"]

OUTPUT_NAMES = ("loc", "conf", "landmarks")
NUM_LANDMARKS = 5


class FeatureExtractor(nn.Module):
    """Runs the backbone's children in order and returns the outputs of ``return_layers`` (the reference wraps
    its backbones the same way, which is why checkpoint keys read ``body.stage1...``)."""

    def __init__(self, backbone: nn.Module, return_layers: tuple[str, ...]) -> None:
        super().__init__()
        names = [name for name, _ in backbone.named_children()]
        missing = set(return_layers) - set(names)
        if missing:
            raise ValueError(f"backbone has no layers {sorted(missing)}; it has {names}")
        last = max(names.index(n) for n in return_layers)
        for name in names[: last + 1]:
            self.add_module(name, getattr(backbone, name))
        self.return_layers = return_layers

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for name, module in self.named_children():
            x = module(x)
            if name in self.return_layers:
                features.append(x)
        return features


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, negative_slope: float) -> None:
        super().__init__()
        self.output1 = conv_bn(in_channels[0], out_channels, 1, negative_slope=negative_slope)
        self.output2 = conv_bn(in_channels[1], out_channels, 1, negative_slope=negative_slope)
        self.output3 = conv_bn(in_channels[2], out_channels, 1, negative_slope=negative_slope)
        self.merge1 = conv_bn(out_channels, out_channels, 3, negative_slope=negative_slope)
        self.merge2 = conv_bn(out_channels, out_channels, 3, negative_slope=negative_slope)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        p3 = self.output1(features[0])
        p4 = self.output2(features[1])
        p5 = self.output3(features[2])
        p4 = self.merge2(p4 + _upsample_like(p5, p4))
        p3 = self.merge1(p3 + _upsample_like(p4, p3))
        return [p3, p4, p5]


def _upsample_like(coarse: Tensor, fine: Tensor) -> Tensor:
    """Nearest x2 upsampling by a fixed scale factor (a static Resize for every exporter), cropped to ``fine``.

    Levels have sizes ceil(n / stride), so the x2 map is at most one row/column too large. For inputs that are
    multiples of 32 (every exported model) the crop is a no-op that exporters fold away; for any other size it
    gives exactly what the reference's ``interpolate(size=fine.shape)`` gives.
    """
    up = F.interpolate(coarse, scale_factor=2.0, mode="nearest")
    return up[:, :, : fine.shape[2], : fine.shape[3]]


class SSH(nn.Module):
    """Single Stage Headless context module: parallel 3x3, 5x5 and 7x7 receptive fields (stacked 3x3 convs)."""

    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"SSH channels must be divisible by 4, got {channels}")
        self.conv3X3 = conv_bn(channels, channels // 2, 3, negative_slope=None)
        self.conv5X5_1 = conv_bn(channels, channels // 4, 3, negative_slope=negative_slope)
        self.conv5X5_2 = conv_bn(channels // 4, channels // 4, 3, negative_slope=None)
        self.conv7X7_2 = conv_bn(channels // 4, channels // 4, 3, negative_slope=negative_slope)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, 3, negative_slope=None)

    def forward(self, x: Tensor) -> Tensor:
        branch5 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), self.conv7x7_3(self.conv7X7_2(branch5))], dim=1)
        return F.relu(out)


class Head(nn.Module):
    """1x1 conv predicting ``values`` numbers per anchor, flattened to (N, H*W*anchors, values) in NHWC order,
    the order in which the priors are generated."""

    def __init__(self, in_channels: int, anchors: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """Outputs ``loc`` (N, A, 4) box offsets, ``conf`` (N, A, 2) softmax [background, face], ``landmarks``
    (N, A, 10) landmark offsets; A = anchors over all levels. Decoding is done outside, by
    :mod:`edgeface.core.processing`, so that every runtime shares it."""

    def __init__(self, config: RetinaFaceConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "mobilenet_v1_0.25":
            backbone: nn.Module = MobileNetV1(negative_slope=config.negative_slope)
        elif config.backbone == "resnet50":
            backbone = ResNet50()
        else:
            raise ValueError(f"unknown backbone {config.backbone!r}; known: mobilenet_v1_0.25, resnet50")
        self.body = FeatureExtractor(backbone, config.return_layers)
        ch, slope, anchors = config.out_channels, config.negative_slope, config.anchors_per_location
        self.fpn = FPN(config.in_channels, ch, slope)
        self.ssh1, self.ssh2, self.ssh3 = SSH(ch, slope), SSH(ch, slope), SSH(ch, slope)
        self.ClassHead = nn.ModuleList(Head(ch, anchors, 2) for _ in config.anchors.steps)
        self.BboxHead = nn.ModuleList(Head(ch, anchors, 4) for _ in config.anchors.steps)
        self.LandmarkHead = nn.ModuleList(Head(ch, anchors, 2 * NUM_LANDMARKS) for _ in config.anchors.steps)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, logits, landmarks = self.forward_logits(images)
        return loc, F.softmax(logits, dim=-1), landmarks

    def forward_logits(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`forward`, with the class scores before the softmax (N, A, 2): what the training loss takes
        (cross-entropy on logits is the numerically stable form)."""
        p3, p4, p5 = self.fpn(self.body(images))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, logits, landmarks
