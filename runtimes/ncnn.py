"""ncnn bundles (``model.ncnn.param`` graph + ``model.ncnn.bin`` weights) in Tencent's ``ncnn`` Python package (no
PyTorch): on the CPU (ARM NEON, x86 AVX2), or on a Vulkan GPU (``device="vulkan"``) where ncnn finds one (ncnn
itself runs any layer without a Vulkan kernel on the CPU, without a message; every layer of this model has one in
ncnn 1.0.20261020, but a device's driver is not checked here).

- Input: an ncnn Mat is one CHW image (no batch dimension), so a batch (N, 3, H, W) float32, mean subtracted, runs
  image after image, each in an Extractor of its own.
- Outputs: read from the blobs the export bound to ``loc`` / ``conf`` / ``landmarks`` by comparing them with PyTorch
  on real images (``target_info.output_blobs``; pnnx names blobs ``in0``, ``out0``, ...), each (A, k) per image,
  returned (N, A, k) float32.
- Precision: ncnn turns on fp16 storage and arithmetic by default where the hardware has them (ARMv8.2 CPUs such
  as the Raspberry Pi 5's Cortex-A76, Vulkan GPUs), which would silently run an FP32 bundle in half precision.
  So an fp32 bundle runs with them off, an fp16 bundle with them on; ``fp16_compute`` overrides either. x86 CPUs
  have no ncnn fp16 arithmetic: there fp16 weights are widened to fp32 at load and computed in fp32 (measured:
  outputs bit-identical with the fp16 switches on or off); :meth:`NcnnRuntime.describe` says what ran.
- Sizes: a static bundle runs its own input size only: its Reshape layers hold fixed sizes, and ncnn fed another
  size returns arrays of the old shape filled from the wrong memory (measured) rather than failing, so other sizes
  are refused here. A dynamic bundle (Reshape sizes as expressions of the input) runs any size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, require
from edgeface.core.files import captured_output
from edgeface.core.manifest import OUTPUTS

# The input of the check run at open for a dynamic bundle: small, so that opening costs little (a multiple of the
# largest anchor step, 32).
PROBE_HW = (64, 64)
FP16_SWITCHES = ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic")


def _ncnn():
    return require("ncnn", "ncnn-runtime", "running ncnn bundles")


def _quietly(call, *args):
    """``call(*args)`` with ncnn's native messages (written to stderr: ``dlopen failed libvulkan.so.1`` on a
    machine without Vulkan, ``layer X not exists or registered`` on a param it cannot read) captured; returns
    (result, the first line they wrote, or "")."""
    with tempfile.TemporaryFile() as log:
        with captured_output(log):
            result = call(*args)
        log.seek(0)
        text = log.read().decode("utf-8", "replace").strip()
    return result, (text.splitlines()[0] if text else "")


def vulkan_gpus() -> tuple[int, str]:
    """How many Vulkan GPUs ncnn finds here, and why none when it finds none (ncnn's own message)."""
    ncnn = _ncnn()
    count, message = _quietly(ncnn.get_gpu_count)
    return int(count), message


def load_net(param: Path, weights: Path, *, threads: int | None = None, fp16: bool = False,
             vulkan: bool = False) -> tuple[Any, dict[str, Any]]:
    """An ncnn Net with ``param`` / ``weights`` loaded, and what it runs on (library version, device, threads,
    fp16 switches). ``fp16``: ncnn's fp16 storage, packing and arithmetic (used only where the hardware has them).
    Raises EdgefaceError (one line) when ncnn cannot read the files or no Vulkan GPU is found."""
    from importlib.metadata import PackageNotFoundError, version

    ncnn = _ncnn()
    net = ncnn.Net()
    # Options are read when the model loads: all are set first.
    net.opt.use_vulkan_compute = bool(vulkan)
    if threads:
        net.opt.num_threads = int(threads)
    for switch in FP16_SWITCHES:
        setattr(net.opt, switch, bool(fp16))
    device = "cpu"
    if vulkan:
        count, why = vulkan_gpus()
        if count < 1:
            raise EdgefaceError("device 'vulkan': ncnn finds no Vulkan GPU here"
                                f"{f' ({why})' if why else ''}; install the GPU's Vulkan driver or use --device cpu")
        net.set_vulkan_device(0)
        device = f"vulkan: {ncnn.get_gpu_info(0).device_name()}"
    for what, call, path in (("graph", net.load_param, param), ("weights", net.load_model, weights)):
        status, message = _quietly(call, str(path))
        if status != 0:
            detail = f": {message}" if message else ""
            raise EdgefaceError(f"ncnn could not load the {what} {path} (status {status}{detail}); the file is "
                                "damaged or not an ncnn model: re-export the bundle")
    try:
        lib_version = version("ncnn")
    except PackageNotFoundError:
        lib_version = getattr(ncnn, "__version__", "unknown")
    if vulkan:
        fp16_here = "where the GPU supports it" if fp16 else "off"
    elif fp16:
        fp16_here = ("on (ARM fp16 arithmetic)" if ncnn.cpu_support_arm_asimdhp() else
                     "requested, but this CPU has no ncnn fp16 arithmetic: fp16 weights widened, fp32 compute")
    else:
        fp16_here = "off (fp32 compute)"
    info = {"library": "ncnn", "version": lib_version, "device": device,
            "threads": int(net.opt.num_threads), "fp16": fp16_here}
    return net, info


def run_net(net: Any, input_blob: str, image: np.ndarray, blobs: dict[str, str]) -> dict[str, np.ndarray]:
    """One CHW float32 image through ``net``; the named blobs as arrays (copies). Raises EdgefaceError when ncnn
    cannot extract one."""
    ncnn = _ncnn()
    x = np.ascontiguousarray(image, dtype=np.float32)
    extractor = net.create_extractor()  # one per call: an Extractor holds the intermediate blobs of one run
    extractor.input(input_blob, ncnn.Mat(x))  # the Mat wraps x's memory, which lives until the extracts return
    out = {}
    for name, blob in blobs.items():
        status, mat = extractor.extract(blob)
        if status != 0:
            raise EdgefaceError(f"ncnn could not compute blob {blob!r} ({name}) for an input of shape {x.shape} "
                                f"(status {status})")
        out[name] = np.array(mat, dtype=np.float32, copy=True)
    return out


class NcnnRuntime(Runtime):
    name = "ncnn"
    targets = ("ncnn",)
    # An ncnn Net is read-only once loaded and every call makes its own Extractor, ncnn's pattern for running one
    # Net from several threads.
    concurrent = True
    devices = ("cpu", "vulkan")
    default_for = ("ncnn",)
    options = ("threads", "fp16_compute")
    extra = "ncnn-runtime"  # the ncnn wheel alone, no PyTorch
    libraries = ("ncnn",)

    def __init__(self, bundle: Bundle, *, threads: int | None = None, device: str | None = None,
                 fp16_compute: bool | None = None) -> None:
        super().__init__(bundle.manifest, source=str(bundle.path))
        if fp16_compute is not None and not isinstance(fp16_compute, bool):
            raise EdgefaceError(f"fp16_compute {fp16_compute!r}: give true or false (default: on for fp16 bundles, "
                                "off for fp32)")
        info = self.manifest.target_info or {}
        blobs = info.get("output_blobs") or {}
        if not info.get("input_blob") or set(blobs) != set(OUTPUTS):
            raise EdgefaceError(f"bundle {self.source}: its manifest has no complete blob binding "
                                "(target_info.input_blob, target_info.output_blobs); re-export it with "
                                "`edgeface export --target ncnn`")
        if len(set(blobs.values())) != len(OUTPUTS):
            raise EdgefaceError(f"bundle {self.source}: target_info.output_blobs {blobs} binds one blob to two "
                                "outputs; re-export the bundle")
        spec = self.manifest.input
        if spec.layout != "NCHW" or spec.dtype != "float32" or spec.shape[0] != 1:
            raise EdgefaceError(f"bundle {self.source}: an ncnn model takes one float32 CHW image, but the "
                                f"manifest's input is {spec.dtype} {spec.layout} {spec.shape}; re-export the bundle")
        self.input_blob = info["input_blob"]
        self.output_blobs = {name: blobs[name] for name in OUTPUTS}
        self.columns = {spec.name: spec.shape[-1] for spec in self.manifest.outputs}  # values per prior
        self.static_hw = tuple(spec.shape[2:]) if all(isinstance(s, int) for s in spec.shape[2:]) else None
        self.fp16 = self.manifest.precision == "fp16" if fp16_compute is None else fp16_compute
        files = bundle.manifest.files
        self.net, self.info = load_net(bundle.path / files["model"], bundle.path / files["weights"],
                                       threads=threads, fp16=self.fp16, vulkan=device == "vulkan")
        self._check_model()

    def _check_model(self) -> None:
        """The model's own input and output blobs against the manifest, and one run at the manifest's size (a
        small one for a dynamic bundle): the blobs bound to loc / conf / landmarks must give (A, 4 | 2 | 10) with A
        the priors of that size. An ncnn graph declares no shapes, so only a run shows them; a manifest that does
        not describe this model is refused rather than misread."""
        inputs, outputs = list(self.net.input_names()), list(self.net.output_names())
        if inputs != [self.input_blob]:
            raise EdgefaceError(f"bundle {self.source}: manifest field target_info.input_blob is "
                                f"{self.input_blob!r}, but the model's inputs are {inputs}; re-export the bundle")
        missing = {name: blob for name, blob in self.output_blobs.items() if blob not in outputs}
        if missing:
            raise EdgefaceError(f"bundle {self.source}: manifest field target_info.output_blobs names {missing}, but "
                                f"the model's outputs are {sorted(outputs)}; re-export the bundle")
        hw = self.static_hw or PROBE_HW
        try:
            self._run(np.zeros((3, *hw), np.float32))
        except EdgefaceError as exc:
            raise EdgefaceError(f"bundle {self.source}: {exc}; re-export the bundle") from None

    def _run(self, image: np.ndarray) -> dict[str, np.ndarray]:
        outputs = run_net(self.net, self.input_blob, image, self.output_blobs)
        priors = self.manifest.anchors.num_priors(tuple(image.shape[1:]))
        for name, value in outputs.items():
            if value.shape != (priors, self.columns[name]):
                raise EdgefaceError(
                    f"blob {self.output_blobs[name]!r}, bound to {name!r} by the manifest, gives shape "
                    f"{list(value.shape)} for a {image.shape[1]}x{image.shape[2]} input, expected "
                    f"[{priors}, {self.columns[name]}]")
        return outputs

    @classmethod
    def open(cls, bundle: Bundle | None, *, threads: int | None = None, device: str | None = None,
             fp16_compute: bool | None = None, **_: Any) -> "NcnnRuntime":
        if bundle is None:
            raise EdgefaceError("the ncnn runtime needs a bundle (--model DIR made by "
                                "`edgeface export --target ncnn`)")
        return cls(bundle, threads=threads, device=device, fp16_compute=fp16_compute)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """NCHW float32 batch (N, 3, H, W), mean subtracted -> outputs by name, (N, A, k) float32. H, W: the
        bundle's size for a static bundle, any size for a dynamic one. Raises EdgefaceError on another shape."""
        if batch.ndim != 4 or batch.shape[1] != 3 or (self.static_hw and tuple(batch.shape[2:]) != self.static_hw):
            size = "H, W" if self.static_hw is None else f"{self.static_hw[0]}, {self.static_hw[1]}"
            raise EdgefaceError(f"the ncnn runtime expects NCHW input of shape (N, 3, {size}), got "
                                f"{tuple(batch.shape)}")
        runs = [self._run(image) for image in batch]
        return {name: np.stack([r[name] for r in runs]) for name in OUTPUTS}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.info, "input_blob": self.input_blob,
                "output_blobs": dict(self.output_blobs), "shapes": "static" if self.static_hw else "dynamic"}

    def close(self) -> None:
        if getattr(self, "net", None) is not None:
            self.net.clear()
        self.net = None


__all__ = ["NcnnRuntime", "load_net", "run_net", "vulkan_gpus"]
