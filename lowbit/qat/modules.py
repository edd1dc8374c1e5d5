"""QAT modules: nn.Linear / nn.Conv2d that compute with fake-quantized weights and activations.

Each module keeps its float weight (what the optimizer updates) and one set of fake quantizers
per *stage* (one stage unless a :class:`lowbit.qat.ProgressiveSchedule` lowers the bit width
during training); ``stage`` picks the active one and ``quant_enabled=False`` runs the layer in
float (a schedule that quantizes a growing fraction of layers turns it on). All quantizers,
learnable scales included, exist from the start, so an optimizer built right after
:func:`lowbit.prepare_qat` sees every parameter.

The forward pass computes what the converted module computes:

* Linear: ``F.linear(act_fq(x), weight_fq(W), b)``;
* Conv2d: with an activation quantizer, the same im2col rows the kernel-backed
  :class:`lowbit.nn.QuantizedConv2d` multiplies (activation scales per patch), then a linear; a
  weight-only scheme runs ``F.conv2d`` on the fake-quantized weight (same product, cheaper).

:class:`QATConvBn2d` / :class:`QATLinearBn1d` fold a following batch norm into the weight
*before* fake quantization (what the converted layer quantizes), as in Jacob et al. (2018):
while batch statistics are in use (training, before the freeze), the layer fake-quantizes
``W * gamma / sigma_running``, divides its output by the same factor and applies the batch norm
with batch statistics, so the running statistics keep tracking; after the freeze step
(``freeze_bn_step``, counted in the batch norm's ``num_batches_tracked``), and always in eval
mode, it runs exactly the folded layer that :func:`lowbit.convert` produces.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import Config, Int8Config
from ..nn.conv import QuantizedConv2d, conv_as_linear, im2col, rows_to_image
from .bn_fold import bn_scale, fold_weights
from .fake_quant import LSQInt8ActivationFakeQuant, fake_quant_scheme


class _QATMixin:
    """Fake quantizers per stage, and the switch between them."""

    def _init_quantizers(self, configs: Sequence[Config], learnable_scales: bool,
                         static_activations: bool = False) -> None:
        weight_2d = self.quantized_weight_source().detach().reshape(self.weight.shape[0], -1)
        schemes = [fake_quant_scheme(c, weight_2d, learnable_scales) for c in configs]
        if static_activations:
            for c, s in zip(configs, schemes):
                if not (isinstance(c, Int8Config) and not c.weight_only):
                    raise ValueError(f"lowbit.qat: static (learned) activation steps are for W8A8 int8 "
                                     f"(Int8Config(weight_only=False)), not {c}")
                s.activation = LSQInt8ActivationFakeQuant(weight_2d.shape[1])
        self.configs = tuple(configs)
        self.learnable_scales = learnable_scales
        self.weight_fake_quants = nn.ModuleList(s.weight for s in schemes)
        self.act_fake_quants = nn.ModuleList(s.activation or nn.Identity() for s in schemes)
        self._has_act = tuple(s.activation is not None for s in schemes)
        self.stage = 0
        self.quant_enabled = True

    @property
    def config(self) -> Config:
        return self.configs[self.stage]

    @property
    def weight_fake_quant(self) -> nn.Module:
        return self.weight_fake_quants[self.stage]

    @property
    def act_fake_quant(self) -> nn.Module | None:
        return self.act_fake_quants[self.stage] if self._has_act[self.stage] else None

    def _convert_activation(self, module: nn.Module) -> nn.Module:
        """Let the activation quantizer configure the converted module (e.g. a learned static step)."""
        act = self.act_fake_quant
        return act.convert_module(module) if hasattr(act, "convert_module") else module

    def quantized_weight_source(self) -> torch.Tensor:
        """The float weight that gets quantized (the folded one for fused batch norms)."""
        return self.weight

    def fake_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_fake_quant(w.reshape(w.shape[0], -1)).reshape(w.shape)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", qat={type(self.config).__name__}, stage={self.stage}, "
                f"quant_enabled={self.quant_enabled}")


class QATLinear(_QATMixin, nn.Linear):
    """nn.Linear trained with fake quantization; :meth:`to_quantized` gives the kernel module."""

    @classmethod
    def from_float(cls, linear: nn.Linear, configs: Sequence[Config], learnable_scales: bool = False,
                   static_activations: bool = False) -> QATLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                dtype=linear.weight.dtype)
        m.weight = linear.weight
        m.bias = linear.bias
        m._init_quantizers(configs, learnable_scales, static_activations)
        m.train(linear.training)
        return m

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.quant_enabled:
            return F.linear(x, w, b)
        if hasattr(self.weight_fake_quant, "fake_linear"):  # the family computes the whole layer (binary)
            return self.weight_fake_quant.fake_linear(x, w, b)
        act = self.act_fake_quant
        if act is not None:
            x = act(x.reshape(-1, self.in_features)).reshape(x.shape)
        return F.linear(x, self.fake_quant_weight(w), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight, self.bias)

    def _float_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """The kernel-backed module (float nn.Linear if quantization is off for this layer)."""
        w, b = self._float_weights()
        linear = nn.Linear(self.in_features, self.out_features, b is not None, device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if b is not None:
            linear.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        linear.train(self.training)
        if not self.quant_enabled:
            return linear
        return self._convert_activation(self.weight_fake_quant.quantize_linear(linear, self.config))


class QATConv2d(_QATMixin, nn.Conv2d):
    """nn.Conv2d (groups=1) trained with fake quantization; :meth:`to_quantized` gives a
    :class:`lowbit.nn.QuantizedConv2d`."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, configs: Sequence[Config], learnable_scales: bool = False,
                   static_activations: bool = False) -> QATConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype)
        m.weight = conv.weight
        m.bias = conv.bias
        m._init_quantizers(configs, learnable_scales, static_activations)
        m.train(conv.training)
        return m

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.quant_enabled:
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)
        if hasattr(self.weight_fake_quant, "fake_linear"):  # the family computes the whole layer (binary)
            rows, Ho, Wo = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
            y = self.weight_fake_quant.fake_linear(rows, w.reshape(self.out_channels, -1), b)
            return rows_to_image(y, x.shape[0], Ho, Wo)
        wq = self.fake_quant_weight(w)
        act = self.act_fake_quant
        if act is None:
            return F.conv2d(x, wq, b, self.stride, self.padding, self.dilation)
        rows, Ho, Wo = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = F.linear(act(rows), wq.reshape(self.out_channels, -1), b)
        return rows_to_image(y, x.shape[0], Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.bias)

    def _float_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """A :class:`lowbit.nn.QuantizedConv2d` (float nn.Conv2d if quantization is off for this layer)."""
        w, b = self._float_weights()
        if not self.quant_enabled:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, bias=b is not None, device=w.device, dtype=w.dtype)
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
            return conv.train(self.training)
        if hasattr(self.weight_fake_quant, "quantize_conv"):  # the family's own conv module (BinaryConv2d)
            return self.weight_fake_quant.quantize_conv(self, w, b, self.config).train(self.training)
        linear = conv_as_linear(self, w, b)
        q = self._convert_activation(self.weight_fake_quant.quantize_linear(linear, self.config))
        return QuantizedConv2d(q, self.in_channels, self.out_channels, self.kernel_size, self.stride,
                               self.padding, self.dilation).train(self.training)


class _FusedBnMixin:
    """A layer with its following batch norm folded in (see the module docstring)."""

    def _init_bn(self, bn: nn.modules.batchnorm._BatchNorm, freeze_bn_step: int | None) -> None:
        self.bn = bn
        self.freeze_bn_step = freeze_bn_step
        self.bn_frozen = False

    def freeze_bn_stats(self) -> None:
        """Stop updating the running statistics and normalise with them (the converted layer's math)."""
        self.bn_frozen = True

    def quantized_weight_source(self) -> torch.Tensor:
        return fold_weights(self.weight, self.bias, self.bn)[0]

    def _float_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_weights(self.weight, self.bias, self.bn)

    def _fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor:
        if (self.training and not self.bn_frozen and self.freeze_bn_step is not None
                and int(self.bn.num_batches_tracked) >= self.freeze_bn_step):
            self.freeze_bn_stats()
        w_fold, b_fold = fold_weights(self.weight, self.bias, self.bn)
        if not self.training or self.bn_frozen:
            return layer(x, w_fold, b_fold)
        # Batch statistics: quantize the weight the converted layer will use, undo the running
        # scale on the output, and let the batch norm normalise (and update its statistics).
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = layer(x, w_fold, None) / bn_scale(self.bn).reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return self.bn(y)


class QATConvBn2d(_FusedBnMixin, QATConv2d):
    """Conv2d + BatchNorm2d, folded for quantization-aware training."""

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, configs: Sequence[Config],
                     learnable_scales: bool = False, freeze_bn_step: int | None = None,
                     static_activations: bool = False) -> QATConvBn2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype)
        m.weight, m.bias = conv.weight, conv.bias
        m._init_bn(bn, freeze_bn_step)
        m._init_quantizers(configs, learnable_scales, static_activations)
        m.train(conv.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused_forward(x, self._conv)


class QATLinearBn1d(_FusedBnMixin, QATLinear):
    """Linear + BatchNorm1d (on [B, features] inputs), folded for quantization-aware training."""

    @classmethod
    def from_modules(cls, linear: nn.Linear, bn: nn.BatchNorm1d, configs: Sequence[Config],
                     learnable_scales: bool = False, freeze_bn_step: int | None = None,
                     static_activations: bool = False) -> QATLinearBn1d:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                dtype=linear.weight.dtype)
        m.weight, m.bias = linear.weight, linear.bias
        m._init_bn(bn, freeze_bn_step)
        m._init_quantizers(configs, learnable_scales, static_activations)
        m.train(linear.training)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"lowbit QATLinearBn1d: input must be [B, {self.in_features}] (BatchNorm1d after a "
                             f"Linear normalises its features), got {list(x.shape)}")
        return self._fused_forward(x, self._linear)


QAT_MODULES = (QATLinear, QATConv2d)
