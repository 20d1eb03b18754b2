"""OpenVINO IR bundles (``model.xml`` + ``model.bin``) in the OpenVINO runtime: the CPU here, and on Intel hardware
the integrated GPU (``gpu``, ``gpu:N``) or the NPU (``npu``) of Core Ultra processors.

The model is compiled for exactly the device asked for (never ``AUTO`` or ``HETERO``), so it either runs there or
the runtime refuses in one line: no silent fall-back to the CPU. The model's own input and outputs are checked
against the manifest before anything runs, and outputs are read by their names (``loc``, ``conf``,
``landmarks``, kept from the ONNX graph the IR was converted from).

OpenVINO's Python package sends usage telemetry by default (``openvino-telemetry``, opt-out: ``opt_in_out
--opt_out``): importing ``openvino`` starts a thread that posts an event to Google Analytics. edgeface never lets
it: :func:`import_openvino` imports OpenVINO with ``openvino_telemetry`` unimportable for the process, which is
the path OpenVINO and NNCF themselves take when the package is not installed (their built-in no-op stubs)."""

from __future__ import annotations

import queue
import sys
from typing import Any

import numpy as np
from edgeface.runtimes.base import END2END_NOT_RAW, Runtime, check_end2end_io, require_end2end_model

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, require
from edgeface.core.manifest import OUTPUTS, Manifest

# edgeface device name -> OpenVINO device name ("gpu:1" -> "GPU.1").
DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
_OV_TYPES = {"f32": "float32", "f16": "float16", "i8": "int8", "u8": "uint8"}


def import_openvino():
    """``openvino``, imported without its telemetry: ``openvino_telemetry`` is made unimportable for this process
    (unless something imported it already), so that OpenVINO's model-conversion API and NNCF use their no-op
    stubs and nothing tries the network (measured: with the package importable, ``import openvino`` alone sends a
    DNS query for Google Analytics and writes ``~/intel/openvino_ga_cid``).

    Raises :class:`EdgefaceError` naming the extra when OpenVINO is not installed."""
    sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: `import` raises ImportError
    return require("openvino", "openvino-runtime", "running OpenVINO bundles")


def ov_message(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception: its C++ reports start with "Exception from <file>:<line>:"
    and "Check '...' failed at" lines, the cause comes after them."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0]


def ov_device(device: str | None) -> str:
    """edgeface's device name -> OpenVINO's: cpu -> CPU, gpu -> GPU, gpu:1 -> GPU.1, npu -> NPU."""
    name, _, index = (device or "cpu").partition(":")
    return DEVICES[name] + (f".{index}" if index else "")


def check_model(model, manifest: Manifest, source: str) -> tuple[str, dict[str, Any]]:
    """The model's own input and outputs against the manifest (names, element types, ranks, static sizes), as
    onnxruntime's runtime checks an ONNX model: a manifest that does not describe this model is refused in one
    line rather than misread. Returns the input's name and the output ports by manifest name."""
    inputs = list(model.inputs)
    outputs = {name: port for port in model.outputs for name in port.get_names()}
    declared = [("input", manifest.input, {n: p for p in inputs for n in p.get_names()})]
    declared += [(f"outputs[{i}]", spec, outputs) for i, spec in enumerate(manifest.outputs)]
    for field, spec, ports in declared:
        port = ports.get(spec.name)
        if port is None or (field == "input" and len(inputs) != 1):
            raise EdgefaceError(f"bundle {source}: manifest field {field}.name is {spec.name!r}, but the model's "
                                f"{'inputs' if field == 'input' else 'outputs'} are {sorted(ports)}; re-export the "
                                "bundle")
        dtype = _OV_TYPES.get(port.get_element_type().get_type_name(), port.get_element_type().get_type_name())
        shape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else None
        if dtype != spec.dtype:
            problem = f"dtype {spec.dtype!r}, but the model's is {dtype!r}"
        elif dims is None or len(dims) != len(spec.shape) or any(
                isinstance(want, int) and want != have for want, have in zip(spec.shape, dims)):
            problem = f"shape {spec.shape}, but the model's is {shape}"
        else:
            continue
        raise EdgefaceError(f"bundle {source}: manifest field {field} has {problem}; re-export the bundle")
    return manifest.input.name, {spec.name: outputs[spec.name] for spec in manifest.outputs}


def check_end2end(model, manifest: Manifest, source: str) -> None:
    """The end-to-end model's inputs and outputs by name, and its input's size, as the manifest's
    ``target_info.end2end`` describes them."""
    described = manifest.target_info.get("end2end") or {}
    check_end2end_io(manifest, source, [port.get_any_name() for port in model.inputs],
                     [port.get_any_name() for port in model.outputs])
    image = next((port for port in model.inputs if port.get_any_name() == manifest.input.name), None)
    shape = image.get_partial_shape() if image is not None else None
    if shape is None or not shape.is_static or list(shape.to_shape())[2:] != list(described.get("input_hw", [])):
        raise EdgefaceError(f"bundle {source}: the end-to-end model's input is {shape}, not the "
                            f"{described.get('input_hw')} of its manifest's target_info.end2end; re-export the bundle")


class OpenVINORuntime(Runtime):
    name = "openvino"
    targets = ("openvino",)
    # A CompiledModel may be shared by threads, an InferRequest may not (OpenVINO's thread-safety rules): each call
    # takes a request of its own from a pool, so calls run in parallel.
    concurrent = True
    devices = ("cpu", "gpu", "gpu:N", "npu")
    default_for = ("openvino",)
    options = ("threads", "end2end")
    extra = "openvino-runtime"
    libraries = ("openvino",)

    def __init__(self, manifest: Manifest, compiled, *, source: str, device: str = "cpu",
                 threads: int | None = None, end2end: bool = False) -> None:
        """A runtime over a model already compiled (:meth:`open` reads and compiles a bundle's; the INT8 export's
        accuracy control validates NNCF's candidates through this one). ``compiled`` is an
        ``openvino.CompiledModel`` whose input and outputs :func:`check_model` accepted, or with ``end2end`` the
        bundle's end-to-end model (:func:`check_end2end`)."""
        super().__init__(manifest, source=source)
        self.compiled = compiled
        self.device = device
        self.threads = threads
        self.end2end = bool(end2end)
        if self.end2end:
            self.input_name = manifest.input.name
            self._outputs = {port.get_any_name(): port for port in compiled.outputs}
        else:
            self.input_name, self._outputs = check_model(compiled, manifest, source)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    @classmethod
    def open(cls, bundle: Bundle | None, *, threads: int | None = None, device: str | None = None,
             end2end: bool = False, **_: Any) -> "OpenVINORuntime":
        if bundle is None:
            raise EdgefaceError("the openvino runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target openvino`)")
        if end2end:
            require_end2end_model(bundle)
        ov = import_openvino()
        device = device or "cpu"
        core = ov.Core()
        available = core.available_devices  # CPU, GPU, GPU.0, GPU.1, NPU
        target = ov_device(device)
        if target not in available and not (target == "GPU" and any(d.startswith("GPU.") for d in available)):
            raise EdgefaceError(f"OpenVINO device {target} is not available here (available: "
                                f"{', '.join(available) or 'none'}); --device {device} needs Intel "
                                f"{'integrated graphics' if target.startswith('GPU') else 'an NPU (Core Ultra)'} "
                                "and its driver")
        xml, weights = (bundle.file("end2end"), bundle.file("end2end_weights")) if end2end else \
            (bundle.file("model"), bundle.file("weights"))
        with open(xml, "rb") as f:  # read_model tries every frontend on a non-IR file (TensorFlow's text parser...)
            head = f.read(256).lstrip()
        if not head.startswith(b"<?xml") and not head.startswith(b"<net"):
            raise EdgefaceError(f"{xml} is not an OpenVINO IR (XML) file; the bundle is damaged: re-export it")
        try:
            model = core.read_model(str(xml), str(weights))
        except RuntimeError as exc:
            raise EdgefaceError(f"OpenVINO could not read {xml}: {ov_message(exc)}; the bundle is damaged: "
                                "re-export it") from None
        # before compiling: a lie costs no compilation
        if end2end:
            check_end2end(model, bundle.manifest, str(bundle.path))
        else:
            check_model(model, bundle.manifest, str(bundle.path))
        if target == "NPU" and end2end:
            raise EdgefaceError(f"the NPU does not compile the end-to-end model (its outputs have a data-dependent "
                                f"size); run bundle {bundle.path} on the NPU without --end2end")
        if target == "NPU" and not model.inputs[0].get_partial_shape().is_static:
            raise EdgefaceError(f"bundle {bundle.path} has a dynamic input size, which the NPU does not compile; "
                                "export a fixed size for it (edgeface export --target openvino --imgsz 640x640)")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if target == "CPU" and threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if bundle.manifest.precision == "fp32" and target != "NPU":
            # What the export's parity proved: float32 arithmetic. Left alone, the CPU plugin computes in bf16 on
            # processors with AMX / AVX512-BF16 and the GPU plugin in f16.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            compiled = core.compile_model(model, target, config)
        except RuntimeError as exc:
            raise EdgefaceError(f"OpenVINO could not compile {xml} for {target}: {ov_message(exc)}") from None
        return cls(bundle.manifest, compiled, source=str(bundle.path), device=device, threads=threads,
                   end2end=end2end)

    def _request(self):
        try:
            return self._requests.get_nowait()
        except queue.Empty:
            return self.compiled.create_infer_request()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.end2end:
            raise EdgefaceError(END2END_NOT_RAW)
        request = self._request()
        try:
            results = request.infer({self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
            # copies: the request's output buffers are reused by its next call
            out = {name: np.array(results[self._outputs[name]], dtype=np.float32) for name in OUTPUTS}
        finally:
            self._requests.put(request)
        return out

    def infer_end2end(self, batch: np.ndarray, *, score_threshold: float, iou_threshold: float, pixel: float
                      ) -> dict[str, np.ndarray]:
        if not self.end2end:
            return super().infer_end2end(batch, score_threshold=score_threshold, iou_threshold=iou_threshold,
                                         pixel=pixel)
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32),
                **{name: np.array(value, np.float32) for name, value in
                   (("score_threshold", score_threshold), ("iou_threshold", iou_threshold), ("pixel", pixel))}}
        request = self._request()
        try:
            results = request.infer(feed)
            out = {name: np.array(results[self._outputs[name]], dtype=np.float32)
                   for name in ("boxes", "scores", "landmarks")}
        finally:
            self._requests.put(request)
        return out

    def describe(self) -> dict[str, Any]:
        ov = import_openvino()
        info = {**super().describe(), "openvino": ov.__version__.split("-")[0], "device": self.device}
        for key in ("EXECUTION_DEVICES", "INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS"):
            try:
                value = self.compiled.get_property(key)
            except RuntimeError:  # not every device has every property
                continue
            if hasattr(value, "get_type_name"):  # an element type (inference precision): "f32", "f16", "bf16"
                value = value.get_type_name()
            info[key.lower()] = value if isinstance(value, (int, float, str, list)) else str(value)
        return info

    def close(self) -> None:
        self.compiled = None
        self._requests = queue.SimpleQueue()
