"""Binarized (±1) layers: training with a straight-through estimator, inference on packed bits.

Inference (weights packed per :mod:`lowbit.formats.binary`, ``beta`` = mean |w| per channel)
    * :class:`BinaryLinear` (scheme ``"binary"``): with ``binary_activations=True`` (default, the
      XNOR-Net layer) each forward binarizes the input per row (:func:`lowbit.ops.binary_quantize`:
      sign bits + ``alpha`` = mean |x|) and runs :func:`lowbit.ops.binary_scaled_mm`:
      ``y = dot(sign x, sign w) * alpha * beta + bias``. With ``binary_activations=False`` the
      activations stay float: ``y = (x @ sign(w).T) * beta + bias``, computed by unpacking the
      bits to ±1 in x's dtype (there is no dedicated float x ±1 kernel; the weights are packed at
      rest, the matmul is torch's).
    * :class:`BinaryConv2d`: the same on im2col patches (``F.unfold``): ``alpha`` per output
      position (mean |x| over its patch, XNOR-Net's K matrix), ``beta`` per output channel.
      Zero padding binarizes to +1 (sign(0) = +1), in training and inference alike.

Training (latent float weights)
    :class:`BinarizedLinear` / :class:`BinarizedConv2d` are nn.Linear / nn.Conv2d whose forward
    computes exactly what the packed modules compute, in float: sign via :func:`sign_ste`, whose
    gradient is the clipped identity (1 where |x| <= 1, else 0). The sign products are integers
    (exact in float32 up to K = 2**24) and alpha comes from the same op as at inference, so
    :func:`to_packed` gives modules with identical outputs. ``beta`` = mean |w| carries gradient;
    ``alpha`` is treated as a constant (as in XNOR-Net++/Bi-Real training recipes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..configs import BinaryConfig, Unsupported, register_conv_handler, register_handler
from ..formats import binary as fmt
from .base import QuantizedLinear, check_float_linear


# ----------------------------------------------------------------------------- STE
class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return fmt.binarize(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # Clipped straight-through estimator: d sign(x)/dx := 1 on [-1, 1], 0 outside.
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (0 -> +1) forward; clipped identity gradient (1 where |x| <= 1) backward."""
    return _SignSTE.apply(x)


def _alpha(x2: torch.Tensor) -> torch.Tensor:
    """Per-row mean |x| from the same op the packed modules use (so outputs match bit for bit)."""
    return ops.binary_quantize(x2.detach())[1]


def _scaled(dot: torch.Tensor, alpha: torch.Tensor | None, beta: torch.Tensor, bias: torch.Tensor | None,
            out_dtype: torch.dtype) -> torch.Tensor:
    # The order of binary_scaled_mm: float32(dot) * alpha * beta, then + bias, then one rounding.
    y = dot if alpha is None else dot * alpha.unsqueeze(-1)
    y = y * beta
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


# ----------------------------------------------------------------------------- training modules
class BinarizedLinear(nn.Linear):
    """nn.Linear trained with binarized weights (and activations): latent float weights + STE."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, binary_activations: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.binary_activations = binary_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        w = self.weight.to(torch.float32)
        beta = w.abs().mean(dim=1)
        sw = sign_ste(w)
        if self.binary_activations:
            dot = sign_ste(x2.to(torch.float32)) @ sw.T
            y = _scaled(dot, _alpha(x2), beta, self.bias, x.dtype)
        else:
            y = _scaled(x2.to(torch.float32) @ sw.T, None, beta, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary_activations={self.binary_activations}"


class BinarizedConv2d(nn.Conv2d):
    """nn.Conv2d (groups=1, zero padding) trained with binarized weights/activations + STE."""

    def __init__(self, *args, binary_activations: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("lowbit BinarizedConv2d: only groups=1, zero padding given as integers")
        self.binary_activations = binary_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols, (oh, ow) = _im2col(x, self)
        w = self.weight.reshape(self.out_channels, -1).to(torch.float32)
        beta = w.abs().mean(dim=1)
        sw = sign_ste(w)
        if self.binary_activations:
            y = _scaled(sign_ste(cols.to(torch.float32)) @ sw.T, _alpha(cols), beta, self.bias, x.dtype)
        else:
            y = _scaled(cols.to(torch.float32) @ sw.T, None, beta, self.bias, x.dtype)
        return _col2out(y, x.shape[0], oh, ow)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary_activations={self.binary_activations}"


def _im2col(x: torch.Tensor, conv) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, H, W] -> patches [B * L, C * kh * kw] (the layout of weight.reshape(out, -1))."""
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"lowbit {type(conv).__name__}: input must have shape [B, {conv.in_channels}, H, W], "
                         f"got {list(x.shape)}")
    kh, kw = conv.kernel_size
    oh = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    ow = (x.shape[3] + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (oh, ow)


def _col2out(y: torch.Tensor, batch: int, oh: int, ow: int) -> torch.Tensor:
    return y.reshape(batch, oh * ow, -1).transpose(1, 2).reshape(batch, -1, oh, ow)


# ----------------------------------------------------------------------------- inference modules
class BinaryLinear(QuantizedLinear):
    """Packed ±1 weights (1 bit + a float32 scale per channel); XNOR-popcount GEMM."""

    scheme = "binary"
    float32_buffers = ("scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, binary_activations: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        self.binary_activations = binary_activations
        self.register_buffer("packed", torch.zeros(out_features, fmt.num_words(in_features), dtype=fmt.WORD_DTYPE,
                                                   device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=fmt.SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, binary_activations: bool | None = None) -> BinaryLinear:
        """From an nn.Linear (or a trained :class:`BinarizedLinear`, whose activation mode is kept)."""
        if isinstance(linear, BinarizedLinear):
            if binary_activations is None:
                binary_activations = linear.binary_activations
            plain = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None,
                              device="meta", dtype=linear.weight.dtype)
            plain.weight, plain.bias = linear.weight, linear.bias
            linear = plain
        check_float_linear(linear)
        with torch.no_grad():
            w = fmt.quantize_weight(linear.weight.to(torch.float32))
            m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    binary_activations=True if binary_activations is None else binary_activations,
                    device="meta", dtype=linear.weight.dtype)
            m.packed, m.scale = w.packed, w.scale
            if linear.bias is not None:
                m.bias = linear.bias.detach().clone()
        m.train(linear.training)
        return m

    def quantized_weight(self) -> fmt.BinaryWeight:
        return fmt.BinaryWeight(self.packed, self.scale, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """beta * sign(w), the [N, K] float weight this layer stands for."""
        return fmt.dequantize(self.quantized_weight(), dtype or self.orig_dtype)

    def bits_per_weight(self) -> float:
        return fmt.bits_per_weight(self.out_features, self.in_features)

    def weight_nbytes(self) -> int:
        return fmt.nbytes(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", binary_activations={self.binary_activations}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, lambda x2: _binary_forward(x2, self.packed, self.scale, self.bias, self.in_features,
                                                             self.binary_activations, x2.dtype))


def _binary_forward(x2, packed, scale, bias, K, binary_activations, out_dtype):
    if binary_activations:
        px, alpha = ops.binary_quantize(x2)
        return ops.binary_scaled_mm(px, packed, K, alpha, scale, bias, out_dtype)
    signs = fmt.unpack(packed, K, torch.float32)
    return _scaled(x2.to(torch.float32) @ signs.T, None, scale, bias, out_dtype)


class BinaryConv2d(nn.Module):
    """Packed ±1 convolution weights [out, in * kh * kw]; XNOR-popcount GEMM on im2col patches."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, binary_activations: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.binary_activations = binary_activations
        self.orig_dtype = dtype
        self.in_features = in_channels * math.prod(self.kernel_size)
        self.register_buffer("packed", torch.zeros(out_channels, fmt.num_words(self.in_features),
                                                   dtype=fmt.WORD_DTYPE, device=device))
        self.register_buffer("scale", torch.ones(out_channels, dtype=fmt.SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, binary_activations: bool | None = None) -> BinaryConv2d:
        if not isinstance(conv, nn.Conv2d):
            raise Unsupported(f"{type(conv).__name__} is not an nn.Conv2d")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise Unsupported("only groups=1 convolutions with integer zero padding are binarized")
        if binary_activations is None:
            binary_activations = getattr(conv, "binary_activations", True)
        with torch.no_grad():
            w = fmt.quantize_weight(conv.weight.reshape(conv.out_channels, -1).to(torch.float32))
            m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.bias is not None, binary_activations=binary_activations, device="meta",
                    dtype=conv.weight.dtype)
            m.packed, m.scale = w.packed, w.scale
            if conv.bias is not None:
                m.bias = conv.bias.detach().clone()
        m.train(conv.training)
        return m

    def _apply(self, fn, recurse=True):
        # scale stays float32 under .half() / .to(bfloat16), as in QuantizedLinear: the kernels
        # take float32 scales.
        scale = self._buffers["scale"]
        out = super()._apply(fn, recurse)
        if self._buffers["scale"].dtype != torch.float32:
            self._buffers["scale"] = scale.to(device=self._buffers["scale"].device)
        return out

    def bits_per_weight(self) -> float:
        return fmt.bits_per_weight(self.out_channels, self.in_features)

    def weight_nbytes(self) -> int:
        return fmt.nbytes(self.out_channels, self.in_features)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"binary_activations={self.binary_activations}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols, (oh, ow) = _im2col(x, self)
        y = _binary_forward(cols.contiguous(), self.packed, self.scale, self.bias, self.in_features,
                            self.binary_activations, x.dtype)
        return _col2out(y, x.shape[0], oh, ow)


# ----------------------------------------------------------------------------- model conversion
def _first_and_last(model: nn.Module, kinds) -> set[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    return {names[0], names[-1]} if names else set()


def binarize_for_training(model: nn.Module, *, binary_activations: bool = True,
                          keep_first_last: bool = True) -> nn.Module:
    """Replace nn.Linear / nn.Conv2d layers (in place) by their STE-trainable binarized versions.

    With ``keep_first_last`` the first and last of these layers (in module order) stay full
    precision, as BNN practice has it: the input layer sees raw data, the output layer the logits.
    The latent float weights are shared with the original layers (no copy).
    """
    keep = _first_and_last(model, (nn.Linear, nn.Conv2d)) if keep_first_last else set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in keep or isinstance(child, (BinarizedLinear, BinarizedConv2d)):
                continue
            if type(child) is nn.Linear:
                new = BinarizedLinear(child.in_features, child.out_features, child.bias is not None,
                                      binary_activations, device="meta", dtype=child.weight.dtype)
            elif type(child) is nn.Conv2d and child.groups == 1 and child.padding_mode == "zeros" \
                    and not isinstance(child.padding, str):
                new = BinarizedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                      child.padding, child.dilation, 1, child.bias is not None,
                                      binary_activations=binary_activations, device="meta",
                                      dtype=child.weight.dtype)
            else:
                continue
            new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            setattr(parent, child_name, new)
    return model


def to_packed(model: nn.Module) -> nn.Module:
    """Replace every BinarizedLinear / BinarizedConv2d (in place) by its packed inference module.

    The packed modules compute the same outputs (bit for bit on the CPU backend).
    """
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, BinarizedLinear):
                setattr(parent, child_name, BinaryLinear.from_float(child))
            elif isinstance(child, BinarizedConv2d):
                setattr(parent, child_name, BinaryConv2d.from_float(child))
    return model


@register_handler(BinaryConfig)
def _convert(linear: nn.Linear, config: BinaryConfig) -> nn.Module:
    return BinaryLinear.from_float(linear, binary_activations=config.binary_activations)


@register_conv_handler(BinaryConfig)
def _convert_conv(conv: nn.Conv2d, config: BinaryConfig) -> nn.Module:
    return BinaryConv2d.from_float(conv, binary_activations=config.binary_activations)
