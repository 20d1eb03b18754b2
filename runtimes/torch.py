"""The reference backend: eager PyTorch on CPU or CUDA, from a checkpoint (``weights=...``). Like every runtime
module it imports its library (PyTorch, and the models built on it) when it opens, not when it is read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import TORCH_EXTRA, EdgefaceError
from edgeface.core.manifest import OUTPUTS, manifest_for_model

if TYPE_CHECKING:
    from edgeface.models import RetinaFace


def _torch():
    import torch  # deferred: PyTorch, read when the runtime opens

    return torch


class TorchRuntime(Runtime):
    name = "torch"
    targets = ()  # runs checkpoints (weights=...), not bundles
    concurrent = True  # an eval-mode forward under inference_mode keeps no state between calls
    devices = ("cpu", "cuda", "cuda:N")
    options = ("threads", "weights", "backbone", "negative_slope", "resize")
    extra = TORCH_EXTRA  # PyTorch is not in the device install
    libraries = ("torch",)

    def __init__(self, network: RetinaFace, *, device: str = "cpu", resize: str = "original") -> None:
        torch = _torch()
        manifest = manifest_for_model(network, target="torch", precision="fp32", files={},
                                      dynamic={"batch": [1, 1, 64], "height": [32, 640, 4096],
                                               "width": [32, 640, 4096]})
        manifest.preprocessing["resize"] = resize
        info = network.weights_info or {}
        super().__init__(manifest, source=str(info.get("source", "random initialisation")))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgefaceError(f"device {device!r} requested but PyTorch sees no CUDA GPU; use --device cpu")
        self._torch = torch
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()

    @classmethod
    def open(
        cls,
        bundle: Bundle | None = None,
        *,
        weights: Any = "default",
        backbone: str = "retinaface_mnet025",
        negative_slope: float | None = None,
        device: str = "cpu",
        threads: int | None = None,
        resize: str = "original",
    ) -> "TorchRuntime":
        if bundle is not None:
            raise EdgefaceError("the torch runtime runs checkpoints: pass --weights CHECKPOINT instead of a bundle")
        if threads:
            _torch().set_num_threads(threads)
        from edgeface.models import get_model  # deferred: PyTorch (the models are torch modules)

        return cls(get_model(backbone, weights=weights, negative_slope=negative_slope), device=device, resize=resize)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            outputs = self.network(torch.from_numpy(batch).to(self.device))
        return {name: t.float().cpu().numpy() for name, t in zip(OUTPUTS, outputs)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "torch": self._torch.__version__}
