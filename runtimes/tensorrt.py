"""TensorRT engines (Jetson, NVIDIA GPUs). The engine is built on the device by ``edgeface build-engine BUNDLE``
(an export step, which changes the bundle); opening a runtime never writes to the bundle. Device memory is owned by
PyTorch CUDA tensors, allocated once per input shape and freed with the runtime, so long streams do not leak."""

from __future__ import annotations

from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import TORCH_EXTRA, EdgefaceError, require
from edgeface.core.manifest import OUTPUTS


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    targets = ("tensorrt",)
    # One execution context with its bound buffers and input shape: calls take turns under self.lock (one
    # context per thread would need its own optimisation profile).
    concurrent = False
    # The engine runs on the GPU (buffers on torch's "cuda", GPU 0); "cpu", every command's default, is accepted
    # and changes nothing.
    devices = ("cpu", "cuda", "cuda:0")
    default_for = ("tensorrt",)
    options = ()  # the engine's settings were fixed when it was built
    extra = "tensorrt"  # or JetPack's TensorRT on a Jetson; CUDA buffers through PyTorch
    libraries = ("tensorrt", "torch")

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle.manifest, source=str(bundle.path))
        trt = require("tensorrt", self.extra, "The tensorrt runtime")
        torch = require("torch", TORCH_EXTRA, "The tensorrt runtime (CUDA buffers; JetPack's PyTorch on a Jetson)")
        if not torch.cuda.is_available():
            raise EdgefaceError("the tensorrt runtime needs an NVIDIA GPU visible to PyTorch (torch.cuda)")
        if "engine" not in bundle.manifest.files:
            raise EdgefaceError(f"bundle {bundle.path} has no TensorRT engine yet: build it on this device with "
                                f"`edgeface build-engine {bundle.path}`")
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(bundle.file("engine").read_bytes())
        if self._engine is None:
            raise EdgefaceError(f"{bundle.file('engine')} could not be loaded: it was built for another GPU or "
                                f"TensorRT version; rebuild it with `edgeface build-engine {bundle.path}`")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._buffers: dict[str, Any] = {}
        self._shape: tuple[int, ...] | None = None

    @classmethod
    def open(cls, bundle: Bundle | None, **_: Any) -> "TensorRTRuntime":
        if bundle is None:
            raise EdgefaceError("the tensorrt runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target jetson`)")
        return cls(bundle)

    def _bind(self, shape: tuple[int, ...]) -> None:
        """(Re)allocate the output buffers when the input shape changes, and bind every tensor by name."""
        torch = self._torch
        name = self.manifest.input.name
        self._context.set_input_shape(name, shape)
        self._buffers = {name: torch.empty(shape, dtype=torch.float32, device="cuda")}
        for output in OUTPUTS:
            out_shape = tuple(self._context.get_tensor_shape(output))
            self._buffers[output] = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        for tensor_name, buffer in self._buffers.items():
            self._context.set_tensor_address(tensor_name, buffer.data_ptr())
        self._shape = shape

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with self.lock:  # the context, its bound buffers and shape are shared state (see `concurrent`)
            if batch.shape != self._shape:
                self._bind(batch.shape)
            with torch.cuda.stream(self._stream):
                self._buffers[self.manifest.input.name].copy_(torch.from_numpy(batch), non_blocking=False)
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise EdgefaceError("TensorRT execution failed")
                outputs = {name: self._buffers[name].cpu().numpy() for name in OUTPUTS}
            self._stream.synchronize()
        return outputs

    def describe(self) -> dict[str, Any]:
        import tensorrt as trt

        return {**super().describe(), "tensorrt": trt.__version__, "device": self._torch.cuda.get_device_name(0)}

    def close(self) -> None:
        self._buffers.clear()
        self._context = self._engine = None
