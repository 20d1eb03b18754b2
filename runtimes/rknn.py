"""RKNN bundles (``model.rknn``, Rockchip NPUs) on the board, with Rockchip's ``rknn-toolkit-lite2``
(``rknnlite.api.RKNNLite``: ``load_rknn`` / ``init_runtime`` / ``inference``).

rknn-toolkit-lite2 has Linux aarch64 wheels only and drives the board's NPU driver: on any other machine this
runtime refuses to open a bundle, in one line saying why. On x86-64 the export checked the model in rknn-toolkit2's
simulator instead, in the process that built it (a ``.rknn`` loaded back from disk cannot run there): the export
hands this runtime the simulator's ``RKNN`` object (``backend="simulator"``, see :mod:`edgeface.export.rknn`).

The model takes the manifest's input (float32 NHWC, BGR minus the mean; the runtime library converts it to the
model's int8 / fp16 input) and returns float32 outputs in ``target_info.output_order``; each is checked against
the size the manifest gives it before it is read."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError
from edgeface.core.files import captured_output
from edgeface.core.manifest import OUTPUTS, Manifest

LITE = "rknn-toolkit-lite2"
# --device -> RKNNLite core mask attribute: "cpu" (every command's default) and "npu" let the driver choose the
# core; npu:N pins core N (RK3588: 0-2, RK3576: 0-1); npu:all runs on every core of an RK3588.
CORE_MASKS = {"cpu": "NPU_CORE_AUTO", "npu": "NPU_CORE_AUTO", "npu:0": "NPU_CORE_0", "npu:1": "NPU_CORE_1",
              "npu:2": "NPU_CORE_2", "npu:all": "NPU_CORE_0_1_2"}


def import_rknnlite():
    """``rknnlite.api.RKNNLite``, or one line saying why it cannot be had here."""
    try:
        from rknnlite.api import RKNNLite
    except ImportError as exc:
        machine = platform.machine() or "unknown"
        where = ("install it on the board: pip install rknn-toolkit-lite2" if machine in ("aarch64", "arm64")
                 else f"it has Linux aarch64 wheels only and this machine is {machine}: run the bundle on the "
                      "Rockchip board (on x86 `edgeface export --target rknn` checks the model in rknn-toolkit2's "
                      "simulator, which runs a model only in the process that built it)")
        raise EdgefaceError(f"the rknn runtime needs {LITE} (Rockchip's NPU runtime, {exc}); {where}") from None
    return RKNNLite


def _status(what: str, status: Any, source: str) -> None:
    if isinstance(status, int) and status != 0:
        raise EdgefaceError(f"{LITE} {what} failed for {source} (status {status}); the bundle may be for another "
                            "SoC (target_info.soc) or damaged: re-export it")


class RknnRuntime(Runtime):
    name = "rknn"
    targets = ("rknn",)
    # One RKNN context runs one inference at a time: calls take turns under self.lock.
    concurrent = False
    devices = tuple(CORE_MASKS)
    default_for = ("rknn",)
    options = ()  # the NPU schedules itself; threads is accepted and ignored
    extra = None  # rknn-toolkit-lite2 comes with the board's setup (aarch64 wheels), as TensorRT comes with JetPack
    libraries = (LITE,)

    def __init__(self, manifest: Manifest, engine, *, source: str, backend: str = "rknnlite",
                 device: str = "npu") -> None:
        """A runtime over an initialised RKNN context: ``engine`` is an ``RKNNLite`` with the bundle's model loaded
        (:meth:`open`), or rknn-toolkit2's ``RKNN`` running its simulator (``backend="simulator"``, handed over by
        the export in the process that built the model). Both take ``inference(inputs=[x], data_format=...)``."""
        super().__init__(manifest, source=source)
        self.engine = engine
        self.backend = backend
        self.device = device
        order = (manifest.target_info or {}).get("output_order", list(OUTPUTS))
        if sorted(order) != sorted(OUTPUTS):
            raise EdgefaceError(f"bundle {source}: target_info.output_order {order} does not name loc, conf and "
                                "landmarks once each; re-export it")
        self.output_order = list(order)
        if manifest.input.layout != "NHWC" or manifest.input.dtype != "float32":
            raise EdgefaceError(f"bundle {source}: the rknn runtime feeds float32 NHWC input, but the manifest's input "
                                f"is {manifest.input.dtype} {manifest.input.layout}; re-export it")
        self._shapes = {o.name: o.shape for o in manifest.outputs}
        self._input_shape = manifest.input.shape

    @classmethod
    def open(cls, bundle: Bundle | None, *, device: str | None = None, **_: Any) -> "RknnRuntime":
        if bundle is None:
            raise EdgefaceError("the rknn runtime needs a bundle (--model DIR made by `edgeface export --target rknn`)")
        RKNNLite = import_rknnlite()
        device = device or "cpu"
        engine = RKNNLite(verbose=False)
        source = str(bundle.path)
        try:
            _status("load_rknn", engine.load_rknn(str(bundle.file("model"))), source)
            mask = getattr(RKNNLite, CORE_MASKS[device], None)
            status = engine.init_runtime() if mask is None else engine.init_runtime(core_mask=mask)
            _status(f"init_runtime (--device {device})", status, source)
            return cls(bundle.manifest, engine, source=source, device=device)
        except BaseException:
            engine.release()
            raise

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """NHWC float32 batch (mean subtracted) -> outputs by name, (N, A, k) float32; the model's batch is 1, rows
        run one after the other."""
        expected = tuple(int(s) for s in self._input_shape[1:])
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise EdgefaceError(f"the rknn runtime expects NHWC input of shape (N, {', '.join(map(str, expected))}), "
                                f"got {tuple(batch.shape)}")
        if self.engine is None:
            raise EdgefaceError(f"the rknn runtime of {self.source} is closed")
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for row in batch:
            x = np.ascontiguousarray(row[None], dtype=np.float32)
            with self.lock:  # see `concurrent`
                outputs = self._run(x)
            if not isinstance(outputs, (list, tuple)) or len(outputs) != len(self.output_order):
                got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
                raise EdgefaceError(f"{self.source}: the RKNN model returned {got} outputs, expected "
                                    f"{len(self.output_order)} ({', '.join(self.output_order)})")
            for name, raw in zip(self.output_order, outputs):
                shape = [1, *self._shapes[name][1:]]
                raw = np.asarray(raw)
                if raw.size != int(np.prod(shape)):
                    raise EdgefaceError(f"{self.source}: output {name!r} has {raw.size} values ({raw.shape}), but the "
                                        f"manifest gives it shape {shape}; re-export the bundle")
                results[name].append(raw.reshape(shape).astype(np.float32, copy=True))
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in results.items()}

    def _run(self, x: np.ndarray):
        if self.backend != "simulator":
            return self.engine.inference(inputs=[x], data_format="nhwc")
        # rknn-toolkit2 logs each simulated inference (its verbose build mode stays on): kept off the console
        with open(os.devnull, "w") as sink, captured_output(sink):
            return self.engine.inference(inputs=[x], data_format="nhwc")

    def describe(self) -> dict[str, Any]:
        info = (self.manifest.target_info or {})
        return {**super().describe(), "backend": LITE if self.backend == "rknnlite" else "rknn-toolkit2 simulator",
                "soc": info.get("soc"), "device": self.device,
                # where the export found the graph to run (target_info.placement): the NPU share, CPU nodes named
                "placement": {k: v for k, v in (info.get("placement") or {}).items()
                              if k in ("npu_nodes", "total_nodes", "npu_share", "cpu_fallback")}}

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.release()
