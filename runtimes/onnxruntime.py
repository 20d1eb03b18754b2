"""ONNX bundles in onnxruntime: CPU, or CUDA / TensorRT / CoreML / XNNPACK execution providers when present."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeface.bundle import Bundle
from edgeface.errors import EdgefaceError
from edgeface.runtimes.base import OUTPUTS, Runtime

# In order of preference when the caller does not choose.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "cpu": "CPUExecutionProvider"}


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, *, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(bundle.manifest, source=str(bundle.path))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        if providers:
            wanted = [PROVIDERS.get(p, p) for p in providers]
            missing = [p for p in wanted if p not in available]
            if missing:
                raise EdgefaceError(f"onnxruntime providers {missing} are not available here "
                                    f"(available: {', '.join(available)})")
        else:
            wanted = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(bundle.file()), options, providers=wanted)
        self.input_name = self.manifest.input.name

    @classmethod
    def open(cls, bundle: Bundle | None, *, providers: list[str] | None = None, threads: int | None = None,
             device: str | None = None, **_: Any) -> "OnnxRuntime":
        if device and device != "cpu" and not providers:
            providers = ["cuda" if device.startswith("cuda") else device, "cpu"]
        return cls(bundle, providers=providers, threads=threads)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(list(OUTPUTS), {self.input_name: batch})
        return {name: out.astype(np.float32, copy=False) for name, out in zip(OUTPUTS, outputs)}

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().describe(), "providers": self.session.get_providers(), "onnxruntime": ort.__version__}

    def close(self) -> None:
        self.session = None
