"""TFLite bundles in the LiteRT interpreter (``ai_edge_litert``), or in ``tflite_runtime`` where that is what is
installed (Raspberry Pi OS). Both use XNNPACK as their default CPU delegate; ``xnnpack=False`` runs the plain
built-in kernels instead. The bundle's input is NHWC; int8 inputs/outputs are (de)quantised here with the scales
and zero points the manifest records, and outputs are read by the tensor mapping the export established."""

from __future__ import annotations

from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.manifest import OUTPUTS
from edgeface.core.processing import dequantize, quantize

# Interpreter modules in order of preference: (module, distribution name for the version).
INTERPRETERS = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))


def interpreter_module() -> tuple[Any, str]:
    """The first importable TFLite interpreter module and its distribution name."""
    import importlib

    failures = []
    for module, dist in INTERPRETERS:
        try:
            return importlib.import_module(module), dist
        except (ImportError, AttributeError) as exc:  # tflite-runtime built for numpy 1 fails so under numpy 2
            failures.append(f"{module}: {first_line(exc)}")
    raise EdgefaceError(
        "running TFLite bundles needs a TFLite interpreter (" + "; ".join(failures) + "); install one with "
        "`pip install edgeface[litert]` (the LiteRT interpreter alone, no PyTorch), "
        "or on a Raspberry Pi `pip install tflite-runtime` (which needs numpy<2)"
    )


def load_interpreter(*, model_path: str | None = None, model_content: bytes | None = None,
                     threads: int | None = None, xnnpack: bool = True) -> tuple[Any, dict[str, Any]]:
    """An Interpreter for a model file or flatbuffer, and what it is (library, version, delegate, threads)."""
    from importlib.metadata import PackageNotFoundError, version

    module, dist = interpreter_module()
    kwargs: dict[str, Any] = {}
    if threads:
        kwargs["num_threads"] = int(threads)
    if not xnnpack:
        kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    source = {"model_path": model_path} if model_path is not None else {"model_content": model_content}
    try:
        interpreter = module.Interpreter(**source, **kwargs)
    except (ValueError, RuntimeError) as exc:  # not a flatbuffer / wrong identifier / truncated
        raise EdgefaceError(f"the TFLite interpreter could not load {model_path or 'the model'}: "
                            f"{first_line(exc)}; the file is damaged or not a TFLite model: re-export the "
                            "bundle") from None
    try:
        lib_version = version(dist)
    except PackageNotFoundError:
        lib_version = "unknown"
    info = {"interpreter": f"{module.__name__}.Interpreter", "library": dist, "version": lib_version,
            "delegate": "XNNPACK (default CPU delegate)" if xnnpack else "none (built-in kernels)",
            "threads": int(threads) if threads else "interpreter default"}
    return interpreter, info


class TFLiteRuntime(Runtime):
    name = "tflite"
    targets = ("tflite",)
    # One interpreter holds one set of input/output buffers: set_tensor / invoke / get_tensor from two threads
    # interleave (or fail with "There is at least 1 reference to internal data"), so calls take turns.
    concurrent = False
    devices = ("cpu",)  # XNNPACK on the CPU
    default_for = ("tflite",)
    options = ("threads", "xnnpack")
    extra = "litert"  # the LiteRT interpreter, without PyTorch; on a Raspberry Pi, tflite-runtime serves as well
    libraries = tuple(dist for _, dist in INTERPRETERS)

    def __init__(self, bundle: Bundle, *, threads: int | None = None, xnnpack: bool = True) -> None:
        super().__init__(bundle.manifest, source=str(bundle.path))
        self.interpreter, self.info = load_interpreter(model_path=str(bundle.file()), threads=threads,
                                                       xnnpack=xnnpack)
        try:
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            hint = "re-export the bundle"
            if self.manifest.input.dtype != "float32":
                # e.g. tflite-runtime 2.14 has no int8 -> int16 QUANTIZE, which --int8-io bundles start with
                hint = ("int8-I/O bundles with 16-bit stages need LiteRT (`pip install ai-edge-litert`); use the "
                        "float-I/O INT8 bundle on tflite-runtime")
            raise EdgefaceError(f"{self.info['library']} {self.info['version']} cannot run {bundle.file()}: "
                                f"{first_line(exc)}; {hint}") from None
        self._input, self._outputs = self._resolve_tensors()
        spec = self.manifest.input
        self._input_dtype = spec.dtype
        self._input_quantization = spec.quantization
        if spec.dtype != "float32" and not spec.quantization:
            raise EdgefaceError(f"bundle {bundle.path}: {spec.dtype} input without quantisation parameters in "
                                "its manifest; re-export it")
        self._output_quantization = {o.name: o.quantization for o in self.manifest.outputs}
        for name, detail in self._outputs.items():
            if np.issubdtype(np.dtype(detail["dtype"]), np.integer) and not self._output_quantization.get(name):
                raise EdgefaceError(f"bundle {bundle.path}: output {name!r} is {np.dtype(detail['dtype']).name} "
                                    "without quantisation parameters in its manifest; re-export it")

    def _resolve_tensors(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Input and output tensor details by the mapping recorded at export (name first, then index), checked
        against the file: a manifest that does not describe this model is refused rather than misread."""
        info = self.manifest.target_info or {}
        recorded = info.get("output_tensors")
        if not recorded or set(recorded) != set(OUTPUTS):
            raise EdgefaceError(f"bundle {self.source}: its manifest has no complete output_tensors mapping "
                                f"(target_info.output_tensors); re-export it with `edgeface export`")
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise EdgefaceError(f"bundle {self.source}: the TFLite model has {len(inputs)} inputs, expected 1")
        details = self.interpreter.get_output_details()
        by_name = {d["name"]: d for d in details}
        by_index = {int(d["index"]): d for d in details}
        outputs = {}
        for name in OUTPUTS:
            entry = recorded[name]
            detail = by_name.get(entry.get("name")) or by_index.get(int(entry.get("index", -1)))
            if detail is None:
                raise EdgefaceError(f"bundle {self.source}: output {name!r} ({entry}) is not an output of "
                                    f"{self.manifest.files['model']}; re-export the bundle")
            shape = [int(s) for s in detail["shape"]]
            if entry.get("shape") and shape != list(entry["shape"]):
                raise EdgefaceError(f"bundle {self.source}: output {name!r} has shape {shape} in the model but "
                                    f"{entry['shape']} in the manifest; re-export the bundle")
            outputs[name] = detail
        expected = [int(s) for s in self.manifest.input.shape if isinstance(s, int)]
        actual = [int(s) for s in inputs[0]["shape"]]
        if len(expected) == 4 and expected != actual:
            raise EdgefaceError(f"bundle {self.source}: the model's input shape {actual} differs from the "
                                f"manifest's {expected}; re-export the bundle")
        return inputs[0], outputs

    @classmethod
    def open(cls, bundle: Bundle | None, *, threads: int | None = None, device: str | None = None,
             xnnpack: bool = True, **_: Any) -> "TFLiteRuntime":
        if bundle is None:
            raise EdgefaceError("the tflite runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target tflite`)")
        if device and device != "cpu":
            raise EdgefaceError(f"the tflite runtime runs on the CPU (XNNPACK); device {device!r} is not "
                                "available for TFLite bundles")
        return cls(bundle, threads=threads, xnnpack=xnnpack)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """NHWC float32 batch (mean subtracted) -> outputs by name, (N, A, k) float32. The model's batch is 1:
        rows run one after the other."""
        shape = tuple(int(s) for s in self._input["shape"])
        if batch.ndim != 4 or tuple(batch.shape[1:]) != shape[1:]:
            raise EdgefaceError(f"the tflite runtime expects NHWC input of shape (N, {shape[1]}, {shape[2]}, "
                                f"{shape[3]}), got {tuple(batch.shape)}")
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        step = shape[0]
        for start in range(0, len(batch), step):
            rows = np.ascontiguousarray(batch[start:start + step], dtype=np.float32)
            if self._input_quantization:
                rows = quantize(rows, self._input_quantization, self._input_dtype)
            with self.lock:  # see `concurrent`; get_tensor returns copies, so the outputs outlive the turn
                self.interpreter.set_tensor(self._input["index"], rows)
                self.interpreter.invoke()
                raws = {name: self.interpreter.get_tensor(detail["index"]) for name, detail in self._outputs.items()}
            for name, raw in raws.items():
                if np.issubdtype(raw.dtype, np.integer):
                    raw = dequantize(raw, self._output_quantization[name])
                results[name].append(raw.astype(np.float32, copy=True))
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in results.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info, "input_dtype": self._input_dtype}

    def close(self) -> None:
        self.interpreter = None
