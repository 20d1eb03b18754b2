"""ExecuTorch bundles (``model.pte``) in the ExecuTorch runtime's Python bindings, with the XNNPACK delegate on the
CPU: what an Android or iOS app runs through ExecuTorch's Module API, here on the export machine or a Linux board.

The bindings take and return ``torch.Tensor`` objects (the ``executorch`` wheel depends on PyTorch), so this
runtime's extra is ``executorch``, which brings PyTorch; a device app uses ExecuTorch's own C++ / Java / Swift
runtime instead. Outputs of a ``.pte`` are positional: they are read by the positions the export established on
real images (``target_info.output_positions``), never by their shapes.

Threads: ``threads=N`` sets the size of ExecuTorch's one process-wide thread pool (the bindings'
``_unsafe_reset_threadpool``), which XNNPACK runs on; every ExecuTorch runtime of the process shares it (the last
one opened with ``threads`` sets it, and calls take turns under one lock). Without ``threads`` the pool keeps the
library's default (one thread per core).
"""

from __future__ import annotations

import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.files import captured_output
from edgeface.core.manifest import OUTPUTS
from edgeface.core.processing import INPUT_MULTIPLE

METHOD = "forward"
# ExecuTorch ScalarType codes (executorch/runtime/core/portable_type/scalar_type.h) of the dtypes a bundle states.
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64"}
# One thread pool per process (XNNPACK's): its size is set, and methods run, one at a time across all runtimes.
_LOCK = threading.Lock()


def _bindings():
    """``executorch.runtime`` and the pybindings module, imported with their console noise (torchao's "Failed to
    load" lines, cpuinfo logs) kept out of the user's terminal: shown only if the import fails."""
    import importlib

    with tempfile.TemporaryFile() as log:
        try:
            with captured_output(log):
                runtime = importlib.import_module("executorch.runtime")
                bindings = importlib.import_module("executorch.extension.pybindings.portable_lib")
        except ImportError as exc:
            raise EdgefaceError(f"running ExecuTorch bundles needs the Python package providing "
                                f"'executorch.runtime' ({first_line(exc)}); install it with "
                                "`pip install edgeface[executorch]`") from None
    return runtime, bindings


def load_program(path: str | Path):
    """An ExecuTorch ``Program`` for a ``.pte`` file; EdgefaceError in one line when the file is not one."""
    runtime, _ = _bindings()
    with tempfile.TemporaryFile() as log:
        try:
            with captured_output(log):  # the runtime logs its refusal natively before raising
                return runtime.Runtime.get().load_program(Path(path))
        except Exception as exc:  # the bindings raise RuntimeError / ValueError with native codes
            raise EdgefaceError(f"the ExecuTorch runtime could not load {path}: {first_line(exc)}; the file is "
                                "damaged or not an ExecuTorch program: re-export the bundle") from None


# Methods loaded and not yet garbage-collected: the thread pool cannot be resized under them.
_LOADED: weakref.WeakSet = weakref.WeakSet()


class LoadedMethod:
    """A program's ``forward`` method together with its program: the bindings' Method does not keep its Program
    alive, and executing a method whose program was freed crashes inside the XNNPACK backend (seen here as a
    general protection fault, and before that as NaN outputs), so both live and die together."""

    def __init__(self, path: str | Path, *, source: str | None = None) -> None:
        where = self.where = source or str(path)
        _LOADED.add(self)  # from here on the thread pool stays as it is (set_threads)
        self.program = load_program(path)
        names = sorted(self.program.method_names)
        if METHOD not in names:
            raise EdgefaceError(f"{where}: the program has no {METHOD!r} method (methods: {names}); re-export the "
                                "bundle")
        with tempfile.TemporaryFile() as log:
            try:
                with captured_output(log):
                    self.method = self.program.load_method(METHOD)
            except Exception as exc:  # a backend the bindings lack, a delegate blob they cannot init
                raise EdgefaceError(f"the ExecuTorch runtime could not load {path}'s {METHOD} method "
                                    f"({first_line(exc)}); re-export the bundle") from None

    @property
    def metadata(self):
        """The bindings' MethodMeta: the method's input and output tensors (sizes, dtypes)."""
        return self.method.metadata

    def execute(self, inputs: list[Any]) -> list[Any]:
        """Run ``forward`` on ``inputs`` (torch tensors, NCHW float32); returns its output tensors, positional.
        A failure (a size the program was not exported for, a kernel error) is one EdgefaceError line with the
        runtime's own message, which it logs natively (captured)."""
        with tempfile.TemporaryFile() as log:
            try:
                with captured_output(log):
                    return self.method.execute(inputs)
            except Exception as exc:  # RuntimeError with a native error code
                log.seek(0)
                said = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
                raise EdgefaceError(f"the ExecuTorch runtime failed to run {self.where} ({first_line(exc)}"
                                    f"{': ' + said[0][:200] if said else ''})") from None


def _tensor(info) -> dict[str, Any]:
    return {"sizes": [int(s) for s in info.sizes()], "dtype": SCALAR_TYPES.get(int(info.dtype()), str(info.dtype()))}


def describe_method(method) -> dict[str, Any]:
    """A loaded method's inputs and outputs as its program states them: sizes (a dynamic program's largest, for
    which its memory is planned) and dtypes, in position order."""
    meta = method.metadata
    return {"name": meta.name(), "inputs": [_tensor(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
            "outputs": [_tensor(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())]}


def set_threads(threads: int | None) -> int:
    """Size ExecuTorch's process-wide thread pool (``threads``; None leaves it); returns its size. Raises
    EdgefaceError when a method is loaded under another size: resetting the pool under a loaded XNNPACK method
    crashes the process at its next run (executorch 1.5.1, measured: a segmentation fault)."""
    _, bindings = _bindings()
    with _LOCK:
        current = bindings._threadpool_get_thread_count()
        if threads and threads != current and _LOADED:
            raise EdgefaceError(f"ExecuTorch has one thread pool per process, of {current} threads, in use by "
                                f"{len(_LOADED)} open ExecuTorch method(s): open this bundle with threads={current}, "
                                "or close the others first")
        if threads and threads != current:
            with tempfile.TemporaryFile() as log, captured_output(log):  # "Resetting threadpool to N threads."
                bindings._unsafe_reset_threadpool(int(threads))
        return int(bindings._threadpool_get_thread_count())


def _kept_priors(anchors, input_hw: tuple[int, int], padded_hw: tuple[int, int]) -> np.ndarray:
    """Indices, into the priors of ``padded_hw``, of the priors of ``input_hw`` (each level's grid of rows x
    columns x anchor sizes, cut to the smaller grid), in the order the heads emit them (levels by stride, rows,
    columns, sizes; edgeface.core.processing.prior_boxes)."""
    keep, start = [], 0
    for step, sizes in zip(anchors.steps, anchors.min_sizes):
        rows, cols = -(-input_hw[0] // step), -(-input_hw[1] // step)
        rows_p, cols_p = -(-padded_hw[0] // step), -(-padded_hw[1] // step)
        grid = np.arange(rows_p * cols_p * len(sizes)).reshape(rows_p, cols_p, len(sizes))
        keep.append(start + grid[:rows, :cols].ravel())
        start += grid.size
    return np.concatenate(keep)


class ExecuTorchRuntime(Runtime):
    """``infer`` takes what the shared pre-processing makes for this manifest: NCHW float32, BGR, mean subtracted,
    zero padding; each batch item is one call of the batch-1 ``forward`` method."""

    name = "executorch"
    targets = ("executorch",)
    # One loaded method holds one set of planned buffers, and the thread pool is the process's: calls take turns.
    concurrent = False
    devices = ("cpu",)  # the XNNPACK delegate on the CPU
    default_for = ("executorch",)
    options = ("threads",)
    extra = "executorch"  # brings PyTorch: the bindings exchange torch tensors
    libraries = ("executorch",)

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        super().__init__(bundle.manifest, source=str(bundle.path))
        import torch  # the bindings' tensors; installed with executorch (its dependency)

        self._torch = torch
        # before the method loads: XNNPACK keeps the pool of its load, and one reset under it crashes (measured)
        self.threads = set_threads(threads)
        self.method = LoadedMethod(bundle.file(), source=f"bundle {self.source}")
        self.meta = describe_method(self.method)
        self.positions = self._check_model()
        self.threads_requested = threads

    def _check_model(self) -> dict[str, int]:
        """The method's own input and outputs against the manifest (count, dtype, rank, static sizes, the outputs'
        positions): a manifest that does not describe this program is refused rather than misread."""
        m = self.manifest
        info = m.target_info or {}
        positions = info.get("output_positions")
        if not isinstance(positions, dict) or set(positions) != set(OUTPUTS):
            raise EdgefaceError(f"bundle {self.source}: its manifest has no complete output_positions binding "
                                "(target_info.output_positions); re-export it with `edgeface export`")
        inputs, outputs = self.meta["inputs"], self.meta["outputs"]
        if len(inputs) != 1 or len(outputs) != len(OUTPUTS):
            raise EdgefaceError(f"bundle {self.source}: the program's {METHOD} takes {len(inputs)} inputs and "
                                f"returns {len(outputs)} outputs, the manifest describes 1 and {len(OUTPUTS)}; "
                                "re-export the bundle")
        dynamic = m.dynamic or {}
        planned = [dynamic[d][2] if isinstance(v, str) and d in dynamic else v
                   for v, d in zip(m.input.shape, ("batch", "channels", "height", "width"))]
        program_input = inputs[0]
        if program_input["dtype"] != m.input.dtype:
            raise EdgefaceError(f"bundle {self.source}: manifest field input has dtype {m.input.dtype!r}, but the "
                                f"program's is {program_input['dtype']!r}; re-export the bundle")
        if program_input["sizes"] != planned:
            raise EdgefaceError(f"bundle {self.source}: manifest field input has shape {m.input.shape} (largest "
                                f"{planned}), but the program's is {program_input['sizes']}; re-export the bundle")
        height, width = planned[2], planned[3]
        priors = m.anchors.num_priors((height, width))
        for index, spec in enumerate(m.outputs):
            position = positions[spec.name]
            if not isinstance(position, int) or not 0 <= position < len(outputs):
                raise EdgefaceError(f"bundle {self.source}: target_info.output_positions.{spec.name} is "
                                    f"{position!r}, not an output of the program (0-{len(outputs) - 1}); "
                                    "re-export the bundle")
            actual = outputs[position]
            expected = [1, priors, spec.shape[-1]]
            if actual["dtype"] != spec.dtype or actual["sizes"] != expected:
                raise EdgefaceError(f"bundle {self.source}: manifest field outputs[{index}] ({spec.name!r}, output "
                                    f"{position}) is {spec.dtype} {expected}, but the program's output {position} "
                                    f"is {actual['dtype']} {actual['sizes']}; re-export the bundle")
        if sorted(positions.values()) != list(range(len(OUTPUTS))):
            raise EdgefaceError(f"bundle {self.source}: target_info.output_positions {positions} does not name each "
                                "output once; re-export the bundle")
        return dict(positions)

    @classmethod
    def open(cls, bundle: Bundle | None, *, threads: int | None = None, device: str | None = None,
             **_: Any) -> "ExecuTorchRuntime":
        if bundle is None:
            raise EdgefaceError("the executorch runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target executorch`)")
        if device and device != "cpu":
            raise EdgefaceError(f"the executorch runtime runs on the CPU (XNNPACK); device {device!r} is not "
                                "available for ExecuTorch bundles")
        return cls(bundle, threads=threads)

    def _check_size(self, height: int, width: int) -> None:
        shape, dynamic = self.manifest.input.shape, self.manifest.dynamic or {}
        for value, dim, name in ((height, shape[2], "height"), (width, shape[3], "width")):
            if isinstance(dim, int):
                if value != dim:
                    raise EdgefaceError(f"the executorch runtime expects NCHW input of shape (N, 3, {shape[2]}, "
                                        f"{shape[3]}), got {name} {value}")
            else:
                high = dynamic[name][2]  # smaller sides are padded up to the program's sizes (infer)
                if not 1 <= value <= high:
                    raise EdgefaceError(f"bundle {self.source} takes input {name}s up to {high} (its memory is "
                                        f"planned for at most {high}), got {value}: use a resize that scales down "
                                        f"(--resize max:{high})")

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """NCHW float32 batch (mean subtracted) -> outputs by name, (N, A, k) float32, one item at a time."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise EdgefaceError(f"the executorch runtime takes an NCHW batch with 3 channels, got shape "
                                f"{tuple(batch.shape)}")
        height, width = int(batch.shape[2]), int(batch.shape[3])
        self._check_size(height, width)
        # A dynamic program takes multiples of 32 only (torch.export Dim 32*k): other sizes are zero-padded (the
        # mean colour after mean subtraction, as batch padding is) and the outputs cut back to the priors of the
        # size given.
        padded = (-(-height // INPUT_MULTIPLE) * INPUT_MULTIPLE, -(-width // INPUT_MULTIPLE) * INPUT_MULTIPLE)
        keep = None if padded == (height, width) else _kept_priors(self.manifest.anchors, (height, width), padded)
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for item in batch:
            if keep is not None:
                item = np.pad(item, ((0, 0), (0, padded[0] - height), (0, padded[1] - width)))
            x = self._torch.from_numpy(np.ascontiguousarray(item[None], dtype=np.float32))
            with _LOCK:  # copies taken under the lock: the outputs may live in the program's planned buffers
                outputs = self.method.execute([x])
                for name in OUTPUTS:
                    value = outputs[self.positions[name]].numpy()
                    results[name].append((value[:, keep] if keep is not None else value).astype(np.float32,
                                                                                             copy=True))
        return {name: np.concatenate(parts) if len(parts) > 1 else parts[0] for name, parts in results.items()}

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            lib = version("executorch")
        except PackageNotFoundError:  # pragma: no cover - a source build
            lib = "unknown"
        return {**super().describe(), "executorch": lib, "method": METHOD, "backend": "XnnpackBackend",
                "threads": self.threads, "threads_note": "ExecuTorch's process-wide thread pool",
                "output_positions": self.positions}

    def close(self) -> None:
        self.method = None
