"""Batch-norm folding: Conv2d + BatchNorm2d and Linear + BatchNorm1d into one layer.

In eval mode a batch norm after a layer ``y = W x + b`` is an affine map per output channel,

    bn(y) = (y - mean) * a + beta,   a = gamma / sqrt(running_var + eps)

so it folds into the layer: ``W' = W * a`` (row-wise) and ``b' = (b - mean) * a + beta``.
In exact arithmetic ``layer'(x) == bn(layer(x))``; in floating point the two differ only by
rounding (tests/test_qat_bn_fold.py checks it in float64 and against a derived float32 bound).
Folding *before* quantization is what makes the quantized layer right: the kernel then
quantizes the weights the model really multiplies by.

:func:`fold_bn` does it for post-training quantization; :mod:`lowbit.qat.modules` has the
training-time version (``QATConvBn2d``) that keeps batch statistics until a configurable step.
"""

from __future__ import annotations

import torch
from torch import nn

# A layer followed by the batch norm that folds into it, as they appear next to each other in
# an nn.Sequential.
FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``a = gamma / sqrt(running_var + eps)`` per channel."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return 1.0 / std if bn.weight is None else bn.weight / std


def fold_weights(weight: torch.Tensor, bias: torch.Tensor | None,
                 bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight, bias) of a layer with `weight` [O, ...] and `bias` [O] (or None) followed by `bn`.

    Differentiable (the QAT modules call it in their forward pass)."""
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"lowbit.qat: BatchNorm has {bn.num_features} features but the layer has "
                         f"{weight.shape[0]} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("lowbit.qat: cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    a = bn_scale(bn)
    w = weight * a.reshape(-1, *([1] * (weight.dim() - 1)))
    b = -bn.running_mean if bias is None else bias - bn.running_mean
    b = b * a
    if bn.bias is not None:
        b = b + bn.bias
    return w, b


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return any(type(layer) is lt and type(bn) is bt for lt, bt in FOLDABLE) and bn.track_running_stats


def find_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer name, batch-norm name) of each Conv2d->BatchNorm2d / Linear->BatchNorm1d that are
    consecutive children of an nn.Sequential (the pattern a fold cannot get wrong: the batch norm
    reads exactly the layer's output)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        items = list(parent._modules.items())
        for (ln, layer), (bn_name, bn) in zip(items, items[1:]):
            if _foldable(layer, bn):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + ln, prefix + bn_name))
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def fold_bn(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """Fold each batch norm into the layer before it (in place): the layer gets the folded weight
    and bias, the batch norm becomes nn.Identity. Uses the running statistics, so the model's
    eval-mode output is unchanged (up to rounding); call it before :func:`lowbit.quantize`.

    `pairs`: explicit (layer name, batch-norm name) pairs, for models where the batch norm is
    not the next child of an nn.Sequential (the caller vouches that it reads the layer's output);
    default: :func:`find_bn_pairs`.
    """
    for layer_name, bn_name in (find_bn_pairs(model) if pairs is None else pairs):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        if not _foldable(layer, bn):
            raise ValueError(f"lowbit.qat.fold_bn: cannot fold {type(bn).__name__} {bn_name!r} into "
                             f"{type(layer).__name__} {layer_name!r} (supported: Conv2d+BatchNorm2d, "
                             "Linear+BatchNorm1d, with running statistics)")
        w, b = fold_weights(layer.weight, layer.bias, bn)
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(b)
        _set(model, bn_name, nn.Identity())
    return model
