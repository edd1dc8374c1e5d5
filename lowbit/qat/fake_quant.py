"""Fake quantization: the real formats' values in float, with straight-through gradients.

Every fake quantizer computes its value with the *same code* the real format uses (the ops
and ``lowbit.formats`` functions the kernel-backed modules are built with), so a fake-quantized
weight equals ``QuantizedModule.dequantize()`` of the converted layer bit for bit, and a
fake-quantized activation equals the kernel's decoded input bit for bit. Only the float GEMM
around them differs (summation order), which is what :mod:`lowbit.qat` bounds.

Gradients
    * Straight-through estimator (STE): ``d fake(x) / dx = 1``. The min-max quantizers take
      their scale from the data (amax of the row / group / tensor, like the real formats), so
      every value lies inside the representable range and nothing is clipped; the scale is
      treated as a constant (no gradient flows into amax).
    * LSQ (Esser et al., 2020, "Learned Step Size Quantization"), integer formats: a learnable
      step ``s`` per scale group, ``v = x / s``, ``q = clamp(round(v), qn, qp)``, value ``q * s``;

          d/dx = 1 if qn < v < qp else 0
          d/ds = (round(v) - v if qn < v < qp else q) * g,   g = 1 / sqrt(n * qp)

      with ``n`` the number of weights a scale covers (the LSQ gradient scale keeps the step's
      update as large, relative to the step, as a weight's update relative to the weight).

Registry
    :func:`register_fake_quant` maps a config type (:mod:`lowbit.configs`) to a
    :class:`FakeQuantScheme`: a weight fake quantizer factory and an optional activation one.
    Families built later (binary, 2:4 sparse, codebooks) plug in with one call, next to their
    ``register_handler``::

        @register_fake_quant(BinaryConfig)
        def _binary(config, weight, learnable):
            return FakeQuantScheme(weight=MyBinaryWeightFakeQuant(config), activation=None)

    A weight fake quantizer is an ``nn.Module`` mapping a float ``[N, K]`` weight to its
    fake-quantized value, with a method ``quantize_linear(linear, config)`` that returns the
    kernel-backed module whose weight equals that value (:class:`MinMaxWeightFakeQuant` does it
    with the family's registered handler, so most families need nothing more than their handler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import ops
from ..backends.reference import fp8 as fp8_ref
from ..configs import Config, FP8Config, Int4Config, Int8Config, Unsupported, handler_for
from ..formats import fp8 as fp8_fmt
from ..formats import int4 as int4_fmt
from ..formats import int8 as int8_fmt

_INT4_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- STE
def ste(x: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`value` in the forward pass, gradient ``mask`` (1 where None) with respect to `x`.

    Written as ``value + (x - x.detach()) * mask`` rather than ``x + (value - x).detach()``:
    the added term is exactly zero, so the result is `value` bit for bit (the other form can
    be off by an ulp where ``value - x`` rounds).
    """
    delta = x - x.detach()
    if mask is not None:
        delta = delta * mask
    return value.detach() + delta


# ----------------------------------------------------------------------------- values (no grad)
def int8_values(x: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    """Symmetric int8 fake quantization, the rule of :func:`lowbit.ops.int8_quantize_dynamic`.

    ``granularity``: ``"tensor"`` (one scale), ``"channel"`` (one per row of a [N, K] weight,
    :mod:`lowbit.formats.int8`) or ``"token"`` (one per row of an activation: the same rule as
    "channel", named for what it quantizes).
    """
    if granularity not in ("tensor", "channel", "token"):
        raise ValueError(f"lowbit.qat: int8 granularity must be 'tensor', 'channel' or 'token', got {granularity!r}")
    x2 = x.detach().reshape(-1, x.shape[-1]) if granularity != "tensor" else x.detach()
    q, scale = ops.int8_quantize_dynamic(x2.contiguous(), granularity != "tensor")
    s = scale.unsqueeze(-1) if granularity != "tensor" else scale
    return (q.to(torch.float32) * s).to(x.dtype).reshape(x.shape)


def int4_values(w: torch.Tensor, group_size: int | None = 128, symmetric: bool = False,
                scale_dtype: torch.dtype | None = None, clip_search: bool = False) -> torch.Tensor:
    """Group-wise int4 fake quantization of a [N, K] weight: :func:`lowbit.formats.int4.quantize_weight`
    then :func:`~lowbit.formats.int4.dequantize` (exactly what :class:`lowbit.nn.Int4Linear` multiplies by)."""
    group_size = w.shape[-1] if group_size is None else group_size
    q = int4_fmt.quantize_weight(w.detach(), group_size, symmetric, scale_dtype, clip_search)
    return int4_fmt.dequantize(q).to(w.dtype)


def fp8_values(x: torch.Tensor, format: str = "e4m3", granularity: str = "row") -> torch.Tensor:
    """Saturating round-to-nearest fp8 fake quantization (torch's float8 casts, the ops' rule).

    ``granularity``: ``"tensor"``, ``"row"`` (per output channel or per token), ``"block"``
    (128x128 weight tiles) or ``"block1x128"`` (activation blocks).
    """
    op_granularity = {"tensor": "tensor", "row": "row", "block": "block128x128", "block1x128": "block1x128"}
    if granularity not in op_granularity:
        raise ValueError(f"lowbit.qat: fp8 granularity must be one of {sorted(op_granularity)}, got {granularity!r}")
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    q, scale = ops.fp8_quantize_dynamic(x2, format, op_granularity[granularity], True)
    return fp8_ref.fp8_dequantize(q, scale).to(x.dtype).reshape(x.shape)


def fake_quantize_int8(x: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    """:func:`int8_values` with a straight-through gradient."""
    return ste(x, int8_values(x, granularity))


def fake_quantize_int4(w: torch.Tensor, group_size: int | None = 128, symmetric: bool = False,
                       scale_dtype: torch.dtype | None = None, clip_search: bool = False) -> torch.Tensor:
    """:func:`int4_values` with a straight-through gradient."""
    return ste(w, int4_values(w, group_size, symmetric, scale_dtype, clip_search))


def fake_quantize_fp8(x: torch.Tensor, format: str = "e4m3", granularity: str = "row") -> torch.Tensor:
    """:func:`fp8_values` with a straight-through gradient."""
    return ste(x, fp8_values(x, format, granularity))


# ----------------------------------------------------------------------------- LSQ
class _LSQFunction(torch.autograd.Function):
    """value ``clamp(round(x / s), qn, qp) * s``; gradients as in the module docstring."""

    @staticmethod
    def forward(ctx, x, s, qn, qp, grad_scale):
        v = x / s
        q = torch.clamp(torch.round(v), qn, qp)
        ctx.save_for_backward(v, q, qn, qp)
        ctx.grad_scale = grad_scale
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q, qn, qp = ctx.saved_tensors
        inside = (v > qn) & (v < qp)
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        grad_s = grad * torch.where(inside, q - v, q) * ctx.grad_scale
        return grad_x, grad_s, None, None, None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, qn: torch.Tensor | float, qp: torch.Tensor | float,
                      grad_scale: float) -> torch.Tensor:
    """LSQ fake quantization; `scale` broadcasts against `x` (its gradient reduces to its own shape)."""
    s = scale.expand_as(x)  # autograd sums the step's gradient back to its own shape
    qn = torch.as_tensor(qn, dtype=x.dtype, device=x.device)
    qp = torch.as_tensor(qp, dtype=x.dtype, device=x.device)
    return _LSQFunction.apply(x, s, qn, qp, grad_scale)


# Steps this small would make the codes overflow; a learned step is kept above it.
_MIN_STEP = 1e-8


class LSQInt8WeightFakeQuant(nn.Module):
    """Learnable symmetric int8 steps (per output channel, or one per tensor), initialised to the
    min-max scale of :mod:`lowbit.formats.int8` so training starts from the PTQ weights."""

    qn, qp = -int8_fmt.QMAX, int8_fmt.QMAX

    def __init__(self, weight: torch.Tensor, granularity: str = "channel"):
        super().__init__()
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"lowbit.qat: LSQ int8 granularity must be 'channel' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        with torch.no_grad():
            _, s = ops.int8_quantize_dynamic(weight.detach().to(torch.float32).contiguous(), granularity == "channel")
        self.scale = nn.Parameter(s.clone())
        self.per_scale = weight.shape[1] if granularity == "channel" else weight.numel()

    def step(self) -> torch.Tensor:
        """The step the forward pass and the converted layer use."""
        return self.scale.clamp(min=_MIN_STEP)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.step()
        s = s.unsqueeze(1) if s.dim() == 1 else s
        return lsq_fake_quantize(w, s, self.qn, self.qp, 1.0 / math.sqrt(self.per_scale * self.qp))

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear, config: Int8Config) -> nn.Module:
        module = handler_for(config)(linear, config)
        s = self.step().detach().to(torch.float32).expand(linear.out_features).contiguous()
        module.qweight = ops.int8_quantize_static(linear.weight.detach().to(torch.float32).contiguous(), s)
        module.scale = s.clone()
        return module


class LSQInt4WeightFakeQuant(nn.Module):
    """Learnable int4 steps per group (``[N, ceil(K / group_size)]``), initialised to the min-max
    scale of :mod:`lowbit.formats.int4`. Asymmetric groups keep their initial zero point (an
    integer code) fixed; only the step is learned. The step is rounded to the configured scale
    dtype in the forward pass (straight through), as the converted layer stores it."""

    def __init__(self, weight: torch.Tensor, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype):
        super().__init__()
        N, K = weight.shape
        self.group_size = K if group_size is None else group_size
        self.in_features, self.symmetric, self.scale_dtype = K, symmetric, scale_dtype
        with torch.no_grad():
            q = int4_fmt.quantize_weight(weight.detach(), self.group_size, symmetric, scale_dtype)
        self.scale = nn.Parameter(q.scale.to(torch.float32).clone())
        zero = torch.full_like(self.scale, int4_fmt.SYMMETRIC_ZERO) if symmetric else q.zero.to(torch.float32)
        self.register_buffer("zero", zero.clone())
        self.per_scale = self.group_size
        self.levels = 7 if symmetric else 15  # Qp of the LSQ gradient scale (positive levels)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        return int4_fmt._expand_groups(t, self.in_features, self.group_size)

    def step(self) -> torch.Tensor:
        s = self.scale.clamp(min=_MIN_STEP)
        return ste(s, s.detach().to(self.scale_dtype).to(torch.float32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        z = self._expand(self.zero)
        # codes u = clamp(round(w/s) + z, 0, 15) as the format; q = u - z lies in [-z, 15 - z].
        return lsq_fake_quantize(w, self._expand(self.step()), -z, 15.0 - z,
                                 1.0 / math.sqrt(self.per_scale * self.levels))

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear, config: Int4Config) -> nn.Module:
        module = handler_for(config)(linear, config)
        s = self.step().detach()
        z = self.zero
        codes = int4_fmt._codes_for(int4_fmt._group_view(linear.weight.detach().to(torch.float32), self.group_size),
                                    s, None if self.symmetric else z)
        codes = codes.reshape(linear.out_features, -1)[:, :self.in_features].to(torch.uint8)
        module.packed = int4_fmt.pack(codes)
        module.scale = s.to(self.scale_dtype).contiguous()
        module.zero = None if self.symmetric else z.to(self.scale_dtype).contiguous()
        return module


class LSQInt8ActivationFakeQuant(nn.Module):
    """A learnable static (per-tensor) int8 activation step, for :class:`lowbit.nn.Int8Linear`
    with ``activation="static"``: ``clamp(round(x / s), -127, 127) * s`` with LSQ gradients
    (``g = 1 / sqrt(K * 127)``, K the input features). The step starts at amax / 127 of the first
    training batch; inputs beyond ``127 s`` saturate, as in the converted layer."""

    qn, qp = -int8_fmt.QMAX, int8_fmt.QMAX

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def step(self) -> torch.Tensor:
        return self.scale.clamp(min=_MIN_STEP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                amax = x.detach().abs().amax().to(torch.float32)
                self.scale.copy_(torch.where(amax > 0, amax / int8_fmt.QMAX, torch.ones_like(amax)))
                self.initialized.fill_(True)
        x32 = x.to(torch.float32)
        y = lsq_fake_quantize(x32, self.step(), self.qn, self.qp, 1.0 / math.sqrt(self.in_features * self.qp))
        return y.to(x.dtype)

    @torch.no_grad()
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Switch the converted Int8Linear to this static activation step."""
        module.activation = "static"
        module.act_scale = self.step().detach().to(torch.float32).clone()
        return module


# ----------------------------------------------------------------------------- min-max quantizers
class MinMaxWeightFakeQuant(nn.Module):
    """Weight fake quantizer from a values function (scales from the weight's own range), STE
    gradient; converts with the config's registered handler, which applies the same rule."""

    def __init__(self, values: Callable[[torch.Tensor], torch.Tensor], description: str = ""):
        super().__init__()
        self.values = values
        self.description = description

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste(w, self.values(w))

    def quantize_linear(self, linear: nn.Linear, config: Config) -> nn.Module:
        return handler_for(config)(linear, config)

    def extra_repr(self) -> str:
        return self.description


class DynamicActivationFakeQuant(nn.Module):
    """Per-call activation fake quantizer on [M, K] rows (tokens, or conv patches), STE gradient."""

    def __init__(self, values: Callable[[torch.Tensor], torch.Tensor], description: str = ""):
        super().__init__()
        self.values = values
        self.description = description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste(x, self.values(x))

    def extra_repr(self) -> str:
        return self.description


# ----------------------------------------------------------------------------- registry
@dataclass
class FakeQuantScheme:
    """The fake quantizers of one layer: ``weight`` acts on the [N, K] weight (a Conv2d's
    ``[O, C*kh*kw]``), ``activation`` (None: not quantized) on [M, K] input rows."""

    weight: nn.Module
    activation: nn.Module | None = None


SchemeFactory = Callable[[Config, torch.Tensor, bool], FakeQuantScheme]
_FAKE_QUANT: dict[type, SchemeFactory] = {}


def register_fake_quant(config_type: type[Config]):
    """Decorator: ``fn(config, weight_2d, learnable_scales) -> FakeQuantScheme`` for configs of `config_type`."""

    def decorate(fn: SchemeFactory) -> SchemeFactory:
        _FAKE_QUANT[config_type] = fn
        return fn

    return decorate


def registered_fake_quant() -> list[str]:
    return sorted(c.__name__ for c in _FAKE_QUANT)


def fake_quant_scheme(config: Config, weight: torch.Tensor, learnable_scales: bool = False) -> FakeQuantScheme:
    """The fake quantizers for a layer with this [N, K] weight under `config`."""
    for cls in type(config).__mro__:
        if cls in _FAKE_QUANT:
            return _FAKE_QUANT[cls](config, weight, learnable_scales)
    raise TypeError(f"lowbit.qat: no fake quantizer registered for {type(config).__name__} "
                    f"(registered: {registered_fake_quant()}); see lowbit.qat.register_fake_quant")


@register_fake_quant(Int8Config)
def _int8(config: Int8Config, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    w = (LSQInt8WeightFakeQuant(weight) if learnable else
         MinMaxWeightFakeQuant(lambda t: int8_values(t, "channel"), "int8, per channel"))
    act = None if config.weight_only else DynamicActivationFakeQuant(lambda t: int8_values(t, "token"),
                                                                    "int8, per token")
    return FakeQuantScheme(w, act)


@register_fake_quant(Int4Config)
def _int4(config: Int4Config, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    K = weight.shape[1]
    group_size = K if config.group_size is None else config.group_size
    if not int4_fmt.valid_group_size(group_size, K):
        raise Unsupported(f"group_size {group_size} is not one of {int4_fmt.GROUP_SIZES} or in_features={K}")
    if config.scale_dtype is not None and config.scale_dtype not in _INT4_SCALE_DTYPES:
        raise ValueError(f"lowbit.qat: scale_dtype {config.scale_dtype!r} is not one of {sorted(_INT4_SCALE_DTYPES)}")
    scale_dtype = _INT4_SCALE_DTYPES.get(config.scale_dtype) if config.scale_dtype else None
    if learnable:
        if config.clip_search:
            raise ValueError("lowbit.qat: clip_search and learnable scales both choose the range; pick one")
        sd = scale_dtype or (weight.dtype if weight.dtype in int4_fmt.SCALE_DTYPES else torch.float32)
        return FakeQuantScheme(LSQInt4WeightFakeQuant(weight, group_size, config.symmetric, sd))
    return FakeQuantScheme(MinMaxWeightFakeQuant(
        lambda t: int4_values(t, group_size, config.symmetric, scale_dtype, config.clip_search),
        f"int4, group {group_size}, {'symmetric' if config.symmetric else 'asymmetric'}"))


@register_fake_quant(FP8Config)
def _fp8(config: FP8Config, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    if learnable:
        raise ValueError("lowbit.qat: learnable (LSQ) scales are implemented for int8 and int4; fp8 uses "
                         "min-max scales")
    if config.format not in fp8_fmt.FORMATS or config.granularity not in fp8_fmt.GRANULARITIES:
        raise ValueError(f"lowbit.qat: fp8 format/granularity must be in {fp8_fmt.FORMATS} / "
                         f"{fp8_fmt.GRANULARITIES}, got {config.format!r} / {config.granularity!r}")
    w = MinMaxWeightFakeQuant(lambda t: fp8_values(t, config.format, config.granularity),
                              f"fp8 {config.format}, {config.granularity}")
    act_granularity = {"tensor": "tensor", "row": "row", "block": "block1x128"}[config.granularity]
    act = None if config.weight_only else DynamicActivationFakeQuant(
        lambda t: fp8_values(t, config.format, act_granularity), f"fp8 {config.format}, {act_granularity}")
    return FakeQuantScheme(w, act)
