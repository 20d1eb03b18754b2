"""Core ML bundles (``model.mlpackage``, an ML Program).

:class:`CoreMLRuntime` runs the package with Core ML itself, which exists on Apple platforms only (macOS here;
iOS apps load the package with the Core ML framework directly). Everywhere else ``open`` says so and names the
bundles that do run there.

:class:`MILProgramRuntime` is not Core ML: it interprets the package's MIL program (the ops, weights and
dtypes that coremltools wrote into the package) with NumPy / PyTorch, rounding every FP16 tensor to FP16 between
ops. It runs on any platform, so the Core ML export checks what it converted on Linux too; it approximates the
Core ML engines (which may fuse ops or accumulate differently) and proves nothing about them.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgeface.bundle import Bundle, Manifest
from edgeface.errors import EdgefaceError
from edgeface.runtimes.base import OUTPUTS, Runtime, require

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE",
                 # short forms
                 "cpu": "CPU_ONLY", "gpu": "CPU_AND_GPU", "ne": "CPU_AND_NE", "ane": "CPU_AND_NE"}
NOT_APPLE = ("Core ML runs on Apple platforms only (macOS / iOS), not on {platform}. Run this bundle on a Mac or "
             "in an iOS app, or export an onnx bundle (`edgeface export onnx`, onnxruntime runtime) or a tflite "
             "bundle (`edgeface export tflite`) for this machine")


def is_apple() -> bool:
    return sys.platform == "darwin"


def _compute_units(ct, compute_units: Any, device: str | None):
    """``compute_units`` (a ``coremltools.ComputeUnit`` or its name) wins; ``device`` is read only when it names
    Core ML units ("ane", "gpu", "all", ...). ``device="cpu"`` is every command's default and does not restrict
    Core ML: pass ``compute_units="cpu_only"`` for that."""
    if isinstance(compute_units, ct.ComputeUnit):
        return compute_units
    wanted = compute_units
    if wanted is None and device and device.lower() not in ("cpu",) and not device.lower().startswith("cuda"):
        wanted = device
    if wanted is None:
        return ct.ComputeUnit.ALL
    key = str(wanted).lower()
    if key not in COMPUTE_UNITS and str(wanted).upper() not in ct.ComputeUnit.__members__:
        raise EdgefaceError(f"unknown Core ML compute units {wanted!r}; use one of "
                            f"{', '.join(k for k in COMPUTE_UNITS if '_' in k or k == 'all')}")
    return ct.ComputeUnit[COMPUTE_UNITS.get(key, str(wanted).upper())]


def _image_input(manifest: Manifest) -> bool:
    return manifest.target_info.get("input_type", "tensor") == "image"


class _PaddingChoice:
    """``pad_with_mean`` (image inputs): the runtime asks the shared pre-processing for mean-subtracted input
    (``mean_bgr`` = the model's mean) and adds the mean back before the model, so that letterbox padding reaches
    the model as the mean colour, i.e. as zeros after its in-graph bias, as in PyTorch and as the manifest tells
    apps to pad. Without it (the default) ``infer`` takes 0-255 pixels and the shared pre-processing pads with
    black, which the model sees as -mean."""

    manifest: Manifest
    image_input: bool
    pad_with_mean: bool = False

    @property
    def mean_bgr(self) -> tuple[float, float, float]:
        if self.pad_with_mean:
            return tuple(float(m) for m in self.manifest.preprocessing["mean_bgr"])
        return self.manifest.mean_bgr

    def _pixels(self, batch: np.ndarray) -> np.ndarray:
        """The 0-255 BGR pixels of a batch produced for :attr:`mean_bgr`."""
        if self.pad_with_mean:
            return batch + np.asarray(self.mean_bgr, np.float32).reshape(1, 3, 1, 1)
        return batch


class CoreMLRuntime(_PaddingChoice, Runtime):
    """``infer`` takes what the shared pre-processing makes for this manifest: NCHW float32, BGR; for an image
    input (``mean_in_graph``) the mean is not subtracted, so values are the 0-255 pixels. Each batch item is one
    prediction (Core ML bundles have batch 1)."""

    name = "coreml"

    def __init__(self, bundle: Bundle, *, compute_units: Any = None, device: str | None = None,
                 pad_with_mean: bool = False) -> None:
        ct = require("coremltools", "coreml", "Running Core ML bundles")
        super().__init__(bundle.manifest, source=str(bundle.path))
        self._ct = ct
        self.compute_units = _compute_units(ct, compute_units, device)
        self.image_input = _image_input(self.manifest)
        self.pad_with_mean = pad_with_mean and self.image_input
        self.input_name = self.manifest.input.name
        if self.image_input:
            require("PIL.Image", "coreml", "Feeding images to a Core ML model")
        try:
            self.model = ct.models.MLModel(str(bundle.file()), compute_units=self.compute_units)
        except Exception as exc:  # coremltools raises plain Exceptions (compile / load failures)
            raise EdgefaceError(f"Core ML could not load {bundle.file()} ({exc})") from None

    @classmethod
    def open(cls, bundle: Bundle | None, *, compute_units: Any = None, device: str | None = None,
             threads: int | None = None, pad_with_mean: bool = False, **_: Any) -> "CoreMLRuntime":
        """``compute_units``: all (default) | cpu_only | cpu_and_gpu | cpu_and_ne. ``threads`` has no Core ML
        counterpart and is ignored. ``pad_with_mean``: see :class:`_PaddingChoice`."""
        if not is_apple():
            raise EdgefaceError(NOT_APPLE.format(platform=sys.platform))
        if bundle is None:
            raise EdgefaceError("the coreml runtime needs a bundle (--model DIR made by `edgeface export coreml`)")
        return cls(bundle, compute_units=compute_units, device=device, pad_with_mean=pad_with_mean)

    def _feed(self, item: np.ndarray) -> dict[str, Any]:
        """One (3, H, W) BGR float item -> the model's input."""
        if self.image_input:
            from PIL import Image

            # Core ML takes RGB PIL images for RGB *and* BGR image inputs (coremltools checks mode == "RGB") and
            # reorders the channels itself to the model's BGR colour layout: hand it RGB pixels.
            pixels = np.clip(np.rint(item), 0, 255).astype(np.uint8).transpose(1, 2, 0)[:, :, ::-1]
            return {self.input_name: Image.fromarray(np.ascontiguousarray(pixels))}  # uint8 HxWx3: mode RGB
        return {self.input_name: np.ascontiguousarray(item[None], dtype=np.float32)}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise EdgefaceError(f"the coreml runtime takes an NCHW batch with 3 channels, got shape {batch.shape}")
        results: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for item in self._pixels(batch):
            out = self.model.predict(self._feed(item))
            missing = [name for name in OUTPUTS if name not in out]
            if missing:
                raise EdgefaceError(f"{self.source}: the Core ML model has no output(s) {missing} "
                                    f"(it returned {sorted(out)}); re-export the bundle")
            for name in OUTPUTS:
                results[name].append(np.asarray(out[name], dtype=np.float32).reshape(1, -1, _width(name)))
        return {name: np.concatenate(parts) for name, parts in results.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "compute_units": self.compute_units.name, "pad_with_mean": self.pad_with_mean,
                "coremltools": self._ct.__version__}

    def close(self) -> None:
        self.model = None


def _width(name: str) -> int:
    return {"loc": 4, "conf": 2, "landmarks": 10}[name]


# --- the MIL program, interpreted --------------------------------------------------------------------------------


@contextmanager
def single_thread():
    """One PyTorch thread for the duration: small convolutions called one by one are much slower with several
    (every call synchronises the thread pool; on a busy machine by a factor of 100)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class UnsupportedOp(EdgefaceError):
    """The MIL program uses an op this interpreter has no implementation of."""


def load_program(package):
    """The MIL program (pymil) of a saved ``.mlpackage`` (a path) or of an ``MLModel``, weights included."""
    ct = require("coremltools", "coreml", "Reading Core ML packages")
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_to_pymil

    model = package if isinstance(package, ct.models.MLModel) else ct.models.MLModel(str(package),
                                                                                      skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise EdgefaceError(f"{package} is not an ML Program (it is a {spec.WhichOneof('Type')})")
    return milproto_to_pymil(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=model.weights_dir)


class MILInterpreter:
    """Runs the ``main`` function of a MIL program op by op. Float ops compute in float32 (PyTorch for
    convolutions and resampling) and round their results to the dtype the program declares for them (FP16
    tensors are stored as FP16, as on the device); constexpr ops (compressed weights) are materialised by
    coremltools' own definitions."""

    def __init__(self, program) -> None:
        from coremltools.converters.mil.mil import types

        self._types = types
        self.function = program.functions["main"]
        self.operations = list(self.function.operations)
        self.input_names = list(self.function.inputs)
        self.output_names = [v.name for v in self.function.outputs]
        self.op_types = sorted({op.op_type for op in self.operations})
        missing = [t for t in self.op_types if t not in _OPS and t != "const" and not t.startswith("constexpr_")]
        if missing:
            raise UnsupportedOp(f"no reference implementation of MIL op(s) {missing}")
        self._consts: dict[str, Any] = {}
        for op in self.operations:  # constants once (decompressed weights included)
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = op.outputs[0].val
            elif op.op_type.startswith("constexpr_"):
                values = op.materialized_val_inference()
                values = values if isinstance(values, tuple) else (values,)
                for var, value in zip(op.outputs, values):
                    self._consts[var.name] = np.asarray(value)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with single_thread():
            return self._run(inputs)

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = dict(self._consts)
        for name, var in self.function.inputs.items():
            env[name] = self._store(np.asarray(inputs[name]), var)
        for op in self.operations:
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                continue
            args = {k: self._value(v, env) for k, v in op.inputs.items()}
            results = _OPS[op.op_type](args)
            results = results if isinstance(results, tuple) else (results,)
            for var, value in zip(op.outputs, results):
                env[var.name] = self._store(value, var)
        return {name: env[name] for name in self.output_names}

    def _value(self, var, env):
        if isinstance(var, (list, tuple)):
            return [self._value(v, env) for v in var]
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return var.val
        raise EdgefaceError(f"MIL interpreter: no value for {var.name}")

    def _store(self, value, var):
        types = self._types
        dtype = var.dtype
        if isinstance(value, str) or dtype is None:
            return value
        if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
            np_dtype = types.nptype_from_builtin(dtype) if not types.is_str(dtype) else None
            if np_dtype is not None:
                return np.asarray(value).astype(np_dtype, copy=False)
        return value


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _torch():
    import torch

    return torch


def _tensor(value):
    """float32, contiguous torch tensor (shared memory when already so)."""
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def _conv(a):
    torch = _torch()
    x, w = _tensor(a["x"]), _tensor(a["weight"])
    bias = a.get("bias")
    b = _tensor(bias) if bias is not None else None
    strides = [int(s) for s in a.get("strides", [1, 1])]
    dilations = [int(d) for d in a.get("dilations", [1, 1])]
    groups = int(a.get("groups", 1))
    pad_type = str(a.get("pad_type", "valid"))
    if pad_type == "custom":
        top, bottom, left, right = (int(p) for p in a["pad"])
    elif pad_type == "valid":
        top = bottom = left = right = 0
    elif pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(x.shape[2:], w.shape[2:], strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((big, small) if pad_type == "same_lower" else (small, big))
        (top, bottom), (left, right) = pads
    else:
        raise UnsupportedOp(f"conv pad_type {pad_type!r}")
    padding = (top, left)
    if (top, left) != (bottom, right):  # asymmetric: pad explicitly
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        padding = (0, 0)
    with torch.no_grad():
        return torch.nn.functional.conv2d(x, w, b, stride=strides, padding=padding, dilation=dilations,
                                          groups=groups).numpy()


def _pool(kind):
    def run(a):
        torch = _torch()
        x = torch.from_numpy(_f32(a["x"]))
        kernel = [int(k) for k in a["kernel_sizes"]]
        strides = [int(s) for s in a["strides"]]
        pad_type = str(a.get("pad_type", "valid"))
        if pad_type == "custom":
            top, bottom, left, right = (int(p) for p in a["pad"])
        elif pad_type == "valid":
            top = bottom = left = right = 0
        else:
            raise UnsupportedOp(f"{kind} pad_type {pad_type!r}")
        ceil = bool(a.get("ceil_mode", False))
        if kind == "max_pool":
            x = torch.nn.functional.pad(x, (left, right, top, bottom), value=float("-inf"))
            return torch.nn.functional.max_pool2d(x, kernel, strides, ceil_mode=ceil).numpy()
        if not a.get("exclude_padding_from_average", False) or not (top or bottom or left or right):
            x = torch.nn.functional.pad(x, (left, right, top, bottom))
            return torch.nn.functional.avg_pool2d(x, kernel, strides, ceil_mode=ceil).numpy()
        raise UnsupportedOp("avg_pool excluding padding")
    return run


def _upsample_nearest(a):
    x = np.asarray(a["x"])
    sh, sw = a.get("scale_factor_height", 1), a.get("scale_factor_width", 1)
    if float(sh) != int(sh) or float(sw) != int(sw):
        raise UnsupportedOp("upsample_nearest_neighbor with a fractional scale")
    return x.repeat(int(sh), axis=-2).repeat(int(sw), axis=-1)


def _slice_by_index(a):
    x = np.asarray(a["x"])
    rank = x.ndim
    begin, end = list(np.asarray(a["begin"]).reshape(-1)), list(np.asarray(a["end"]).reshape(-1))
    stride = list(np.asarray(a.get("stride", [1] * rank)).reshape(-1))
    begin_mask = list(np.asarray(a.get("begin_mask", [False] * rank)).reshape(-1))
    end_mask = list(np.asarray(a.get("end_mask", [False] * rank)).reshape(-1))
    squeeze = list(np.asarray(a.get("squeeze_mask", [False] * rank)).reshape(-1))
    index = []
    for axis in range(rank):
        b = None if begin_mask[axis] else int(begin[axis])
        e = None if end_mask[axis] else int(end[axis])
        index.append(int(begin[axis]) if squeeze[axis] else slice(b, e, int(stride[axis])))
    return x[tuple(index)]


def _leaky_relu(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.maximum(x, x * alpha) if 0 <= alpha <= 1 else np.where(x >= 0, x, x * alpha)


def _softmax(a):
    x = _f32(a["x"])
    axis = int(a.get("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _batch_norm(a):
    x = _f32(a["x"])
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = _f32(a["mean"]).reshape(shape), _f32(a["variance"]).reshape(shape)
    gamma = _f32(a["gamma"]).reshape(shape) if a.get("gamma") is not None else 1.0
    beta = _f32(a["beta"]).reshape(shape) if a.get("beta") is not None else 0.0
    return (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5))) * gamma + beta


_CAST = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
         "uint8": np.uint8, "bool": np.bool_}


def _cast(a):
    dtype = str(a["dtype"])
    if dtype not in _CAST:
        raise UnsupportedOp(f"cast to {dtype}")
    return np.asarray(a["x"]).astype(_CAST[dtype])


def _binary(fn):
    return lambda a: fn(_promote(a["x"]), _promote(a["y"]))


def _promote(v):
    v = np.asarray(v)
    return v.astype(np.float32) if v.dtype == np.float16 else v


_OPS = {
    "conv": _conv,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "floor_div": _binary(np.floor_divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "relu": lambda a: np.maximum(_f32(a["x"]), 0),
    "leaky_relu": lambda a: _leaky_relu(_f32(a["x"]), float(a.get("alpha", 0.01))),
    "sigmoid": lambda a: 1 / (1 + np.exp(-_f32(a["x"]))),
    "clip": lambda a: np.clip(_f32(a["x"]), float(a["alpha"]), float(a["beta"])),
    "softmax": _softmax,
    "batch_norm": _batch_norm,
    "max_pool": _pool("max_pool"),
    "avg_pool": _pool("avg_pool"),
    "upsample_nearest_neighbor": _upsample_nearest,
    "transpose": lambda a: np.transpose(np.asarray(a["x"]), [int(p) for p in a["perm"]]),
    "reshape": lambda a: np.asarray(a["x"]).reshape([int(s) for s in np.asarray(a["shape"]).reshape(-1)]),
    # (shape arithmetic concatenates scalars into shape vectors)
    "concat": lambda a: np.concatenate([np.atleast_1d(np.asarray(v)) for v in a["values"]], axis=int(a["axis"])),
    "cast": _cast,
    "identity": lambda a: np.asarray(a["x"]),
    "shape": lambda a: np.asarray(np.asarray(a["x"]).shape, dtype=np.int32),
    "gather": lambda a: np.take(np.asarray(a["x"]), np.asarray(a["indices"]), axis=int(a.get("axis", 0))),
    "slice_by_index": _slice_by_index,
}


class MILProgramRuntime(_PaddingChoice, Runtime):
    """A Core ML bundle's MIL program, interpreted (see :class:`MILInterpreter`): the converter's output checked
    on any platform. Not registered as a user-facing runtime: it is not Core ML. Takes what
    :class:`CoreMLRuntime` takes (``pad_with_mean`` likewise)."""

    name = "coreml-mil"

    def __init__(self, manifest: Manifest, package: str | Path, *, pad_with_mean: bool = False) -> None:
        super().__init__(manifest, source=str(package))
        self.interpreter = MILInterpreter(load_program(package))
        self.input_name = self.interpreter.input_names[0]
        self.image_input = _image_input(manifest)
        self.pad_with_mean = pad_with_mean and self.image_input

    @classmethod
    def open(cls, bundle: Bundle | None, *, pad_with_mean: bool = False, **_: Any) -> "MILProgramRuntime":
        if bundle is None:
            raise EdgefaceError("the coreml-mil runtime needs a Core ML bundle")
        return cls(bundle.manifest, bundle.file(), pad_with_mean=pad_with_mean)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for item in self._pixels(batch):  # batch 1 programs
            # An image input reaches the program as float (1, 3, H, W) in its colour layout (BGR), 0-255.
            result = self.interpreter.run({self.input_name: np.asarray(item[None], np.float32)})
            for name in OUTPUTS:
                outs[name].append(np.asarray(result[name], np.float32))
        return {name: np.concatenate(parts) for name, parts in outs.items()}
