"""QNN bundles (Snapdragon Hexagon NPU) in onnxruntime with Qualcomm's QNN execution provider (``onnxruntime-qnn``,
a plug-in EP registered with :func:`onnxruntime.register_execution_provider_library`), HTP backend.

A bundle holds the static QDQ ONNX model (``model``) and, for the SoC it was exported for, the ahead-of-time
compiled QNN context binary inside an EPContext ONNX model (``context``). Devices:

- ``htp`` (and ``cpu``, every command's default, which means the same here): the QDQ model, compiled for the HTP
  when the session opens;
- ``context``: the context binary (no compilation on load: what an app ships), for the SoC in
  ``target_info.soc``.

CPU fallback is disabled (``session.disable_cpu_ep_fallback``): a session opens only if the QNN EP takes every
node, so a graph that would silently run partly on the CPU fails instead. A bundle exported with
``allow_fallback`` (its ``target_info.placement.cpu_fallback`` names the nodes) opens with fallback allowed, as
does ``allow_fallback=True``; :meth:`QnnRuntime.describe` says which.

On x86-64 the wheel's ``libQnnHtp.so`` emulates the HTP (Qualcomm's simulator of its integer arithmetic, seconds per
640x640 image): the export's parity check and ``--eval`` run there. Its latency is not the device's.
"""

from __future__ import annotations

import contextlib
import platform
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from edgeface.runtimes.onnxruntime import OnnxRuntime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, first_line, require
from edgeface.core.files import captured_output
from edgeface.core.manifest import OUTPUTS

EP_NAME = "QNNExecutionProvider"
EXTRA = "qnn-runtime"  # onnxruntime-qnn alone (no PyTorch): `pip install edgeface[qnn-runtime]`
# x86-64 machine names: there the HTP backend is Qualcomm's simulator of the NPU, not the NPU itself.
X86 = ("x86_64", "amd64", "AMD64", "i686")
_register_lock = threading.Lock()


def qnn_library() -> Any:
    """The ``onnxruntime_qnn`` package (library paths), or one line naming the extra that installs it."""
    return require("onnxruntime_qnn", EXTRA, "Running QNN (Snapdragon NPU) bundles")


def register_qnn() -> tuple[Any, list[Any]]:
    """onnxruntime with the QNN plug-in EP registered once per process, and its EP devices
    (:func:`onnxruntime.get_ep_devices` entries named ``QNNExecutionProvider``)."""
    import onnxruntime as ort

    qnn = qnn_library()
    with _register_lock:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            try:
                ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
            except Exception as exc:  # an onnxruntime without plug-in EP support, a damaged wheel
                raise EdgefaceError(f"onnxruntime {ort.__version__} could not load the QNN execution provider "
                                    f"{qnn.get_library_path()}: {first_line(exc)}; install matching onnxruntime and "
                                    f"onnxruntime-qnn (`pip install edgeface[{EXTRA}]`)") from None
            devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            raise EdgefaceError(f"the QNN execution provider ({qnn.get_library_path()}) offers no device here")
    return ort, devices


def emulated() -> bool:
    """Whether the HTP backend here is the x86-64 simulator."""
    return platform.machine() in X86


def qnn_session(model: str | Path, *, soc: dict[str, Any] | None, allow_fallback: bool = False,
                threads: int | None = None, config: dict[str, str] | None = None, log: Path | None = None):
    """An onnxruntime session of ``model`` (an ONNX file) on the QNN EP's HTP backend.

    ``soc`` (``{"name", "soc_model", "htp_arch"}``, see :data:`edgeface.export.qnn.SOCS`) is given to the backend
    on x86-64, where the simulator needs it (measured with onnxruntime-qnn 2.7.0: without ``soc_model`` the graph
    fails to finalize with QNN_COMMON_ERROR_MEM_ALLOC); on a device the backend reads the real chip.
    ``allow_fallback=False`` disables onnxruntime's CPU fallback, so the session only opens if every node runs on
    the NPU. ``config`` adds session config entries (``ep.context_enable``, ...). The backend's console output
    during the load is captured (into ``log`` when given), so that a run prints only edgeface's lines.

    Raises :class:`EdgefaceError` (one line) when the EP is missing or the session cannot be created."""
    ort, devices = register_qnn()
    qnn = qnn_library()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the EP warns about features of Windows-on-Arm builds
    if threads:  # for nodes on the CPU (fallback) and onnxruntime's own work
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not allow_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    # The QNN EP's default hands the graph input's QuantizeLinear and the outputs' DequantizeLinear to the CPU EP
    # when fallback is allowed (and keeps them when it is disabled): off, so that both modes compile one graph with
    # every node on the HTP, and the placement counted with fallback allowed is the one a device runs.
    provider = {"backend_path": qnn.get_qnn_htp_path(), "offload_graph_io_quantization": "0"}
    if soc and emulated():
        provider |= {"soc_model": str(soc["soc_model"]), "htp_arch": str(soc["htp_arch"])}
    options.add_provider_for_devices(devices, provider)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log, "ab") if log else tempfile.TemporaryFile())  # noqa: SIM115
        try:
            with captured_output(sink):
                return ort.InferenceSession(str(model), options)
        except Exception as exc:  # EPFail, Fail, InvalidGraph, NoSuchFile: one line, not a native traceback
            raise EdgefaceError(f"the QNN execution provider could not open {model}: {first_line(exc)}") from None


def assignment(session) -> dict[str, list[tuple[str, str]]]:
    """Execution provider -> [(op type, node name)] of the nodes it runs, from a session created with the config
    entry ``session.record_ep_graph_assignment_info`` = 1 (onnxruntime >= 1.23)."""
    placed: dict[str, list[tuple[str, str]]] = {}
    for subgraph in session.get_provider_graph_assignment_info():
        placed.setdefault(subgraph.ep_name, []).extend((n.op_type, n.name) for n in subgraph.get_nodes())
    return placed


class QnnRuntime(OnnxRuntime):
    """The QNN EP's HTP backend; inputs, outputs and their checks are onnxruntime's (:class:`OnnxRuntime`)."""

    name = "qnn"
    targets = ("qnn",)
    # One compiled graph on one NPU: calls take turns under self.lock (the HTP executes one graph at a time).
    concurrent = False
    devices = ("cpu", "htp", "context")  # "cpu": every command's default, the QDQ model on the HTP as "htp"
    default_for = ("qnn",)
    options = ("threads", "allow_fallback")
    extra = EXTRA
    libraries = ("onnxruntime", "onnxruntime-qnn")

    def __init__(self, bundle: Bundle, *, device: str = "htp", allow_fallback: bool | None = None,
                 threads: int | None = None) -> None:
        super(OnnxRuntime, self).__init__(bundle.manifest, source=str(bundle.path))
        info = self.manifest.target_info or {}
        self.soc = info.get("soc")
        recorded = list((info.get("placement") or {}).get("cpu_fallback") or [])
        # A bundle whose export allowed CPU fallback says so; otherwise fallback is off unless asked for.
        self.allow_fallback = bool(recorded) if allow_fallback is None else bool(allow_fallback)
        self.artifact = "context" if device == "context" else "model"
        if self.artifact not in self.manifest.files:
            raise EdgefaceError(f"bundle {bundle.path} has no QNN context binary (files.context); run its QDQ "
                                "model with --device htp, or re-export it")
        path = bundle.file(self.artifact)
        register_qnn()  # a missing onnxruntime-qnn is its own one-line error
        try:
            self.session = qnn_session(path, soc=self.soc, allow_fallback=self.allow_fallback, threads=threads)
        except EdgefaceError as exc:
            hint = ""
            if self.artifact == "context" and self.soc:
                hint = (f" (the context binary is compiled for {self.soc['name']}, HTP v{self.soc['htp_arch']}: on "
                        "another SoC re-export with --soc-model, or use --device htp)")
            elif not self.allow_fallback:
                hint = " (CPU fallback is disabled: a node the NPU does not take fails the load)"
            raise EdgefaceError(f"{exc}{hint}") from None
        if EP_NAME not in self.session.get_providers():
            raise EdgefaceError(f"bundle {bundle.path}: the session did not use the QNN execution provider")
        self._check_model()
        self.input_name = self.manifest.input.name

    @classmethod
    def open(cls, bundle: Bundle | None, *, device: str | None = None, allow_fallback: bool | None = None,
             threads: int | None = None, **_: Any) -> "QnnRuntime":
        if bundle is None:
            raise EdgefaceError("the qnn runtime needs a bundle (--model DIR made by `edgeface export --target qnn`)")
        return cls(bundle, device=device or "htp", allow_fallback=allow_fallback, threads=threads)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """NCHW float32 batch (mean subtracted) -> outputs by name, (N, A, k) float32. The compiled graph's batch
        is fixed: rows run one after the other."""
        step = self.manifest.input.shape[0]
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for start in range(0, len(batch), step):
            rows = np.ascontiguousarray(batch[start:start + step], dtype=np.float32)
            with self.lock:  # see `concurrent`
                try:
                    outputs = self.session.run(list(OUTPUTS), {self.input_name: rows})
                except Exception as exc:  # onnxruntime Fail / InvalidArgument from the HTP backend
                    raise EdgefaceError(f"the QNN execution provider failed to run {self.source}: "
                                        f"{first_line(exc)}") from None
            for name, out in zip(OUTPUTS, outputs):
                results[name].append(out.astype(np.float32, copy=False))
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in results.items()}

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        import onnxruntime as ort

        return {**super(OnnxRuntime, self).describe(), "providers": self.session.get_providers(),
                "onnxruntime": ort.__version__, "onnxruntime-qnn": version("onnxruntime-qnn"), "backend": "HTP",
                "artifact": self.manifest.files[self.artifact], "soc": self.soc,
                "htp": "simulated on x86-64 (latency is not the device's)" if emulated() else "device",
                "cpu_fallback": "allowed" if self.allow_fallback else "disabled",
                # where the export found the graph to run (target_info.placement): the NPU share, CPU nodes named
                "placement": {k: v for k, v in (self.manifest.target_info or {}).get("placement", {}).items()
                              if k in ("npu_nodes", "total_nodes", "npu_share", "cpu_fallback")}}
