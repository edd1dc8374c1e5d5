"""Slimmable networks: one set of weights, several widths chosen at run time (Yu et al. 2019).

A slimmable layer uses the first ``round(width * channels)`` of its output channels (and of its
inputs, to match the previous layer), so the narrow networks are nested in the wide one and
share weights. BatchNorm statistics differ between widths, so each width has its own
(:class:`SwitchableBatchNorm2d` / ``1d``). Train with the sandwich rule
(:func:`sandwich_step`): each step the widest network learns from the labels, and the narrowest
plus a few random widths learn from the widest one's predictions (in-place distillation)::

    model = nn.Sequential(SlimmableConv2d(1, 32, 3, widths=W, slim_in=False), SwitchableBatchNorm2d(32, W), ...)
    for x, y in loader:
        sandwich_step(model, x, y, optimizer, widths=W)
    set_width(model, 0.5); model(x)                      # serve at half width
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distill import distillation_loss


def channels(total: int, width: float) -> int:
    """Active channels at `width` (a fraction of `total`, at least one)."""
    return max(1, min(total, int(round(width * total))))


class _Slimmable(nn.Module):
    width: float = 1.0

    def _init_widths(self, widths: Sequence[float]):
        widths = sorted(set(float(w) for w in widths))
        if not widths or widths[0] <= 0 or widths[-1] > 1:
            raise ValueError(f"lowbit.compress.slimmable: widths must be in (0, 1], got {widths}")
        self.widths = tuple(widths)
        self.width = widths[-1]


class SlimmableLinear(nn.Linear, _Slimmable):
    """nn.Linear whose active in/out features follow ``self.width`` (``slim_in``/``slim_out`` say which)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, widths: Sequence[float] = (1.0,),
                 slim_in: bool = True, slim_out: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_widths(widths)
        self.slim_in, self.slim_out = slim_in, slim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = channels(self.out_features, self.width) if self.slim_out else self.out_features
        k = channels(self.in_features, self.width) if self.slim_in else self.in_features
        return F.linear(x, self.weight[:n, :k], None if self.bias is None else self.bias[:n])


class SlimmableConv2d(nn.Conv2d, _Slimmable):
    """nn.Conv2d (groups=1) whose active in/out channels follow ``self.width``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, widths: Sequence[float] = (1.0,), slim_in: bool = True, slim_out: bool = True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias,
                         device=device, dtype=dtype)
        self._init_widths(widths)
        self.slim_in, self.slim_out = slim_in, slim_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = channels(self.out_channels, self.width) if self.slim_out else self.out_channels
        k = channels(self.in_channels, self.width) if self.slim_in else self.in_channels
        return self._conv_forward(x, self.weight[:n, :k], None if self.bias is None else self.bias[:n])


class _SwitchableBatchNorm(_Slimmable):
    bn_cls: type = nn.BatchNorm2d

    def __init__(self, num_features: int, widths: Sequence[float], **kw):
        super().__init__()
        self._init_widths(widths)
        self.num_features = num_features
        self.bn = nn.ModuleList([self.bn_cls(channels(num_features, w), **kw) for w in self.widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width not in self.widths:
            raise ValueError(f"lowbit.compress: width {self.width} has no BatchNorm of its own; "
                             f"switchable widths are {self.widths}")
        return self.bn[self.widths.index(self.width)](x)


class SwitchableBatchNorm2d(_SwitchableBatchNorm):
    """One BatchNorm2d per width (statistics of a narrow network differ from a wide one's)."""

    bn_cls = nn.BatchNorm2d


class SwitchableBatchNorm1d(_SwitchableBatchNorm):
    bn_cls = nn.BatchNorm1d


def set_width(model: nn.Module, width: float) -> nn.Module:
    """Make every slimmable layer of `model` run at `width`."""
    found = False
    for m in model.modules():
        if isinstance(m, _Slimmable):
            if isinstance(m, _SwitchableBatchNorm) and width not in m.widths:
                raise ValueError(f"lowbit.compress.set_width: {width} is not one of the switchable widths {m.widths}")
            m.width = float(width)
            found = True
    if not found:
        raise ValueError("lowbit.compress.set_width: the model has no slimmable layer")
    return model


def active_weights(model: nn.Module, width: float) -> int:
    """Weights (biases and BatchNorm excluded) that `model` uses at `width`."""
    total = 0
    for m in model.modules():
        if isinstance(m, (SlimmableLinear, SlimmableConv2d)):
            w = m.weight
            n = channels(w.shape[0], width) if m.slim_out else w.shape[0]
            k = channels(w.shape[1], width) if m.slim_in else w.shape[1]
            total += n * k * (w[0, 0].numel())
    return total


def sandwich_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer,
                  widths: Sequence[float], n_random: int = 2, temperature: float = 1.0,
                  task_loss: Callable = F.cross_entropy, rng: random.Random | None = None) -> float:
    """One sandwich-rule step: the widest network on the labels, then the narrowest and `n_random`
    other widths on the widest one's (detached) predictions; gradients of all of them are
    accumulated before one optimizer step. Returns the widest network's task loss."""
    widths = sorted(widths)
    rng = rng or random
    middle = widths[1:-1]
    others = [widths[0]] + ([rng.choice(middle) for _ in range(n_random)] if middle else [])
    optimizer.zero_grad(set_to_none=True)
    set_width(model, widths[-1])
    logits = model(x)
    loss = task_loss(logits, target)
    loss.backward()
    soft = logits.detach()
    for w in others:
        set_width(model, w)
        distillation_loss(model(x), soft, None, temperature).backward()
    optimizer.step()
    set_width(model, widths[-1])
    return float(loss.detach())
