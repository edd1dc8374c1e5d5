"""Quantized Conv2d: a convolution lowered to the GEMM kernels of any linear family.

A Conv2d with weight ``[O, C, kh, kw]`` is a GEMM over patches: unfold (im2col) the input to
rows of ``K = C * kh * kw`` values, one row per output position, and multiply by the weight
reshaped to ``[O, K]`` (``F.unfold`` orders a patch channel-major, then kh, then kw, which is
exactly ``weight.reshape(O, K)``). :class:`QuantizedConv2d` keeps the geometry and an inner
quantized linear module (:class:`lowbit.nn.Int8Linear`, :class:`~lowbit.nn.Int4Linear`,
:class:`~lowbit.nn.FP8Linear`, or any family registered later), built by that family's own
config handler, so every format that quantizes nn.Linear quantizes Conv2d with no code of its own.

* A 1x1 convolution with stride 1 and no padding is the GEMM itself on the channels-last view:
  no unfold copy.
* Activation quantization of the inner module is per row of the lowered GEMM, i.e. per
  output position (one patch): the conv analogue of per-token scales.
* ``groups != 1`` and non-zero padding modes are rejected with :class:`Unsupported` (the layer
  stays float); grouped convolutions would need one GEMM per group.

Forward has no data-dependent Python control flow and traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOAT_DTYPES
from ..configs import Config, Unsupported, handler_for
from .base import QuantizedLinear


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def check_float_conv2d(conv: nn.Module) -> None:
    """Raise :class:`Unsupported` unless `conv` can be lowered to one GEMM."""
    if not isinstance(conv, nn.Conv2d):
        raise Unsupported(f"{type(conv).__name__} is not an nn.Conv2d")
    if type(conv).forward is not nn.Conv2d.forward:
        raise Unsupported(f"{type(conv).__name__} overrides nn.Conv2d.forward")
    if conv.groups != 1:
        raise Unsupported(f"groups={conv.groups}: only groups=1 convolutions lower to a single GEMM")
    if conv.padding_mode != "zeros":
        raise Unsupported(f"padding_mode={conv.padding_mode!r}: only 'zeros' is supported")
    if isinstance(conv.padding, str):
        raise Unsupported(f"padding={conv.padding!r}: give the padding as integers")
    if conv._forward_hooks or conv._forward_pre_hooks:
        raise Unsupported("has forward hooks, which replacing the module would drop")
    if conv.weight.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"weight dtype {str(conv.weight.dtype).replace('torch.', '')} is not float32, "
                          "float16 or bfloat16")


def conv_as_linear(conv: nn.Conv2d, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> nn.Linear:
    """The nn.Linear ``[O, C*kh*kw]`` that computes `conv` on unfolded patches (weights copied).

    `weight` / `bias` override the conv's own (e.g. batch-norm-folded values)."""
    w = conv.weight if weight is None else weight
    b = conv.bias if bias is None else bias
    O = w.shape[0]
    linear = nn.Linear(w[0].numel(), O, bias=b is not None, device="meta", dtype=w.dtype)
    linear.weight = nn.Parameter(w.detach().reshape(O, -1).clone(), requires_grad=False)
    if b is not None:
        linear.bias = nn.Parameter(b.detach().to(w.dtype).clone(), requires_grad=False)
    linear.train(conv.training)
    return linear


class QuantizedConv2d(nn.Module):
    """nn.Conv2d replacement: im2col (or the 1x1 channels-last view) + a quantized linear module."""

    def __init__(self, linear: QuantizedLinear, in_channels: int, out_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        K = in_channels * self.kernel_size[0] * self.kernel_size[1]
        if linear.in_features != K or linear.out_features != out_channels:
            raise ValueError(f"lowbit QuantizedConv2d: linear must be [{out_channels}, {K}] "
                             f"(out_channels x in_channels*kh*kw), got [{linear.out_features}, {linear.in_features}]")
        self.linear = linear

    @property
    def scheme(self) -> str:
        return self.linear.scheme

    @classmethod
    def from_float(cls, conv: nn.Conv2d, config: Config | None = None, *, linear: QuantizedLinear | None = None,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> QuantizedConv2d:
        """Quantize `conv` with `config`'s handler, or wrap an already quantized `linear`."""
        check_float_conv2d(conv)
        if linear is None:
            if config is None:
                raise ValueError("lowbit QuantizedConv2d.from_float: give a config or a quantized linear")
            linear = handler_for(config)(conv_as_linear(conv, weight, bias), config)
        m = cls(linear, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation)
        m.train(conv.training)
        return m

    def bits_per_weight(self) -> float:
        return self.linear.bits_per_weight()

    def weight_nbytes(self) -> int:
        return self.linear.weight_nbytes()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float [O, C, kh, kw] weight this layer computes with."""
        return self.linear.dequantize(dtype).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, scheme={self.scheme!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"lowbit QuantizedConv2d: input must have shape [B, {self.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        rows, Ho, Wo = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        return rows_to_image(self.linear(rows), x.shape[0], Ho, Wo)


def im2col(x: torch.Tensor, kernel_size, stride, padding, dilation) -> tuple[torch.Tensor, int, int]:
    """[B, C, H, W] -> (rows [B*Ho*Wo, C*kh*kw], Ho, Wo): one row per output position, ordered
    like ``weight.reshape(O, -1)``. A 1x1 stride-1 unpadded conv is the channels-last view (no copy
    of patches)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    B, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        return x.permute(0, 2, 3, 1).reshape(B * H * W, C), H, W
    cols = F.unfold(x, (kh, kw), (dh, dw), (ph, pw), (sh, sw))  # [B, C*kh*kw, Ho*Wo]
    return cols.transpose(1, 2).reshape(B * Ho * Wo, cols.shape[1]), Ho, Wo


def rows_to_image(y: torch.Tensor, B: int, Ho: int, Wo: int) -> torch.Tensor:
    """GEMM output [B*Ho*Wo, O] -> [B, O, Ho, Wo]."""
    return y.reshape(B, Ho, Wo, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
