"""The Core ML converter's numerical check on any platform: a Core ML package's MIL program interpreted.

This is not Core ML: :class:`MILInterpreter` runs the package's MIL program (the ops, weights and dtypes that
coremltools wrote into it) with NumPy / PyTorch, rounding every FP16 tensor to FP16 between ops, so the export
checks what it converted on Linux too (Core ML itself predicts on macOS only). It approximates the Core ML engines
(which may fuse ops or accumulate differently) and proves nothing about them. :class:`MILProgramRuntime` wraps it
as a :class:`~edgeface.runtimes.base.Runtime` for :func:`edgeface.export.coreml.check_program`; it is not a
user-facing runtime.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from edgeface.runtimes.base import Runtime

from edgeface.core.bundle import Bundle
from edgeface.core.errors import EdgefaceError, require
from edgeface.core.manifest import OUTPUTS, Manifest


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


class MILProgramRuntime(Runtime):
    """A Core ML bundle's MIL program, interpreted (see :class:`MILInterpreter`). Takes what
    :class:`~edgeface.runtimes.coreml.CoreMLRuntime` takes: the shared pre-processing's output for the manifest."""

    name = "coreml-mil"
    targets = ("coreml",)
    concurrent = False  # single_thread() changes torch's global thread count for the duration of a call

    def __init__(self, manifest: Manifest, package: str | Path) -> None:
        super().__init__(manifest, source=str(package))
        self.interpreter = MILInterpreter(load_program(package))
        self.input_name = self.interpreter.input_names[0]

    @classmethod
    def open(cls, bundle: Bundle, **_: Any) -> "MILProgramRuntime":
        return cls(bundle.manifest, bundle.file())

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
        for item in batch:  # batch 1 programs
            # An image input reaches the program as float (1, 3, H, W) in its colour layout (BGR), 0-255.
            with self.lock:
                result = self.interpreter.run({self.input_name: np.asarray(item[None], np.float32)})
            for name in OUTPUTS:
                outs[name].append(np.asarray(result[name], np.float32))
        return {name: np.concatenate(parts) for name, parts in outs.items()}
