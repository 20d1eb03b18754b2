"""ONNX bundles in onnxruntime: CPU, or CUDA / TensorRT / CoreML / XNNPACK execution providers when present."""

from __future__ import annotations

from typing import Any

import numpy as np
from edgeface.runtimes.base import END2END_NOT_RAW, Runtime, check_end2end_io, require_end2end_model

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.manifest import OUTPUTS

# In order of preference when the caller does not choose.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "cpu": "CPUExecutionProvider"}


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
               "tensor(uint8)": "uint8"}


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    targets = ("onnx", "tensorrt")  # a tensorrt bundle carries its ONNX (the engine is built on the device)
    concurrent = True  # InferenceSession.run is thread-safe
    # cpu, cuda / cuda:N (the CUDA provider) or another execution provider by its short name (see PROVIDERS)
    devices = ("cpu", "cuda", "cuda:N", *(p for p in PROVIDERS if p not in ("cpu", "cuda")))
    default_for = ("onnx",)
    options = ("threads", "providers", "end2end")
    extra = None  # onnxruntime is in the base install
    libraries = ("onnxruntime",)

    def __init__(self, bundle: Bundle, *, providers: list[str] | None = None, threads: int | None = None,
                 end2end: bool = False) -> None:
        import onnxruntime as ort

        super().__init__(bundle.manifest, source=str(bundle.path))
        if end2end:
            require_end2end_model(bundle)
        self.end2end = bool(end2end)
        model_file = bundle.file("end2end" if end2end else "model")
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
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=wanted)
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph, NoSuchFile, ...
            raise EdgefaceError(f"onnxruntime could not load {model_file}: {first_line(exc)}; the file is "
                                "damaged or not an ONNX model: re-export the bundle") from None
        if self.end2end:
            self._check_end2end()
        else:
            self._check_model()
        self.input_name = self.manifest.input.name

    def _check_model(self) -> None:
        """The model's own input and outputs against the manifest (names, element types, ranks, static sizes): a
        manifest that does not describe this model is refused rather than misread."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        declared = [("input", self.manifest.input, inputs)]
        declared += [(f"outputs[{i}]", spec, outputs) for i, spec in enumerate(self.manifest.outputs)]
        for field, spec, tensors in declared:
            actual = tensors.get(spec.name)
            if actual is None or (field == "input" and len(inputs) != 1):
                raise EdgefaceError(f"bundle {self.source}: manifest field {field}.name is {spec.name!r}, but the "
                                    f"model's {'inputs' if field == 'input' else 'outputs'} are {sorted(tensors)}; "
                                    "re-export the bundle")
            dtype = _ONNX_TYPES.get(actual.type, actual.type)
            static_mismatch = any(isinstance(want, int) and isinstance(have, int) and want != have
                                  for want, have in zip(spec.shape, actual.shape))
            if dtype != spec.dtype:
                problem = f"dtype {spec.dtype!r}, but the model's is {dtype!r}"
            elif len(actual.shape) != len(spec.shape) or static_mismatch:
                problem = f"shape {spec.shape}, but the model's is {actual.shape}"
            else:
                continue
            raise EdgefaceError(f"bundle {self.source}: manifest field {field} has {problem}; re-export the bundle")

    def _check_end2end(self) -> None:
        """The end-to-end model's inputs and outputs by name, as ``target_info.end2end`` describes them."""
        check_end2end_io(self.manifest, self.source, [i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()])

    @classmethod
    def open(cls, bundle: Bundle | None, *, providers: list[str] | None = None, threads: int | None = None,
             device: str | None = None, end2end: bool = False, **_: Any) -> "OnnxRuntime":
        if device and device != "cpu" and not providers:
            providers = ["cuda" if device.startswith("cuda") else device, "cpu"]
        return cls(bundle, providers=providers, threads=threads, end2end=end2end)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.end2end:
            raise EdgefaceError(END2END_NOT_RAW)
        outputs = self.session.run(list(OUTPUTS), {self.input_name: batch})
        return {name: out.astype(np.float32, copy=False) for name, out in zip(OUTPUTS, outputs)}

    def infer_end2end(self, batch: np.ndarray, *, score_threshold: float, iou_threshold: float, pixel: float
                      ) -> dict[str, np.ndarray]:
        if not self.end2end:
            return super().infer_end2end(batch, score_threshold=score_threshold, iou_threshold=iou_threshold,
                                         pixel=pixel)
        scalars = {"score_threshold": score_threshold, "iou_threshold": iou_threshold, "pixel": pixel}
        names = ("boxes", "scores", "landmarks")
        outputs = self.session.run(list(names), {self.input_name: batch,
                                                 **{k: np.array(v, np.float32) for k, v in scalars.items()}})
        return dict(zip(names, outputs))

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().describe(), "providers": self.session.get_providers(), "onnxruntime": ort.__version__}

    def close(self) -> None:
        self.session = None
