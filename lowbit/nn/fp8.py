"""FP8 linear module (weight format: :mod:`lowbit.formats.fp8`).

:class:`FP8Linear` stores fp8 weights (``qweight``) with float32 scales per tensor, per output
channel or per 128x128 tile, and runs one of:

* ``activation="dynamic"`` (default): each forward quantizes the input to fp8 with scales from
  its own amax (per token for "row", per 1x128 block for "block", per tensor for "tensor") and
  runs :func:`lowbit.ops.fp8_scaled_mm`, which applies both scales and the bias;
* ``activation="static"``: the same with one calibrated per-tensor activation scale
  (``act_scale``), given at conversion and widened with :meth:`FP8Linear.calibrate`;
* ``activation="none"``: weight-only, :func:`lowbit.ops.fp8_weight_only_mm` on float inputs.

Presets: ``"fp8"`` (e4m3, row-wise, dynamic), ``"fp8-e5m2"``, ``"fp8-block"``, ``"fp8-weight"``.
Forward has no data-dependent Python control flow, so it traces under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import FP8_BLOCK
from ..configs import FP8Config, Unsupported, register_handler
from ..formats import fp8 as fmt
from .base import QuantizedLinear, check_float_linear

ACTIVATIONS = ("dynamic", "static", "none")
# Activation scales that pair with each weight granularity in fp8_scaled_mm.
_ACT_GRANULARITY = {"tensor": "tensor", "row": "row", "block": "block1x128"}


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"lowbit FP8Linear: {what} must be one of {allowed}, got {value!r}")


class FP8Linear(QuantizedLinear):
    """fp8 weights x (fp8 or float) activations, float32 accumulation."""

    scheme = "fp8"
    float32_buffers = ("scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "e4m3",
                 granularity: str = "row", activation: str = "dynamic", act_format: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        _check_choice("format", format, fmt.FORMATS)
        _check_choice("granularity", granularity, fmt.GRANULARITIES)
        _check_choice("activation", activation, ACTIVATIONS)
        act_format = format if act_format is None else act_format
        _check_choice("act_format", act_format, fmt.FORMATS)
        self.format, self.granularity, self.activation, self.act_format = format, granularity, activation, act_format
        qdtype = fmt.FP8_FORMATS[format]
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=qdtype, device=device))
        self.register_buffer("scale", torch.ones(fmt.scale_shape(granularity, out_features, in_features),
                                                 dtype=fmt.SCALE_DTYPE, device=device))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device)
                             if activation == "static" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, format: str = "e4m3", granularity: str = "row",
                   activation: str = "dynamic", act_format: str | None = None,
                   act_scale: float | torch.Tensor | None = None) -> FP8Linear:
        """Quantize `linear`'s weight to fp8. ``activation="static"`` needs ``act_scale``: the
        calibrated activation scale, amax / fmax of the activation format (448 for e4m3)."""
        check_float_linear(linear)
        if activation == "static":
            scale = float(act_scale) if act_scale is not None else float("nan")
            if not (0.0 < scale < float("inf")):
                raise ValueError(f"lowbit FP8Linear: activation='static' needs a finite act_scale > 0 "
                                 f"(calibrated amax / fmax), got {act_scale!r}")
        with torch.no_grad():
            w = fmt.quantize_weight(linear.weight, format, granularity)
            m = cls(linear.in_features, linear.out_features, linear.bias is not None, format=format,
                    granularity=granularity, activation=activation, act_format=act_format, device="meta",
                    dtype=linear.weight.dtype)
            m.qweight, m.scale = w.qweight, w.scale
            if activation == "static":
                m.act_scale = torch.tensor(scale, dtype=torch.float32, device=linear.weight.device)
            if linear.bias is not None:
                m.bias = linear.bias.detach().clone()
        m.train(linear.training)
        return m

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Static activations: widen ``act_scale`` to cover `x` (running max of amax / fmax)."""
        if self.activation != "static":
            raise ValueError(f"lowbit FP8Linear: calibrate() is for activation='static', not {self.activation!r}")
        self._check_input(x)
        x32 = x.detach().to(torch.float32)
        amax = torch.where(torch.isfinite(x32), x32.abs(), torch.zeros_like(x32)).amax()
        self.act_scale.copy_(torch.maximum(self.act_scale, amax / fmt.FMAX[self.act_format]))

    def _apply(self, fn, recurse=True):
        # fp8 is a floating dtype to torch, so model.half() would turn the codes into float16
        # numbers; the weight keeps its format (only its device may change).
        old = self._buffers.get("qweight")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("qweight")
        if old is not None and new is not None and new.dtype != old.dtype:
            self._buffers["qweight"] = old.to(device=new.device)
        return out

    def quantized_weight(self) -> fmt.Fp8Weight:
        return fmt.Fp8Weight(self.qweight, self.scale, self.granularity)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float [N, K] weight this layer computes with (for inspection and debugging)."""
        return fmt.dequantize(self.quantized_weight(), dtype or self.orig_dtype)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.out_features * self.in_features)

    def weight_nbytes(self) -> int:
        return fmt.nbytes(self.out_features, self.in_features, self.granularity)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", format={self.format!r}, granularity={self.granularity!r}, "
                f"activation={self.activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, self._matmul)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.activation == "none":
            return ops.fp8_weight_only_mm(x2, self.qweight, self.scale, self.bias)
        if self.activation == "dynamic":
            q, s = ops.fp8_quantize_dynamic(x2, self.act_format, _ACT_GRANULARITY[self.granularity], True)
        else:
            q = ops.fp8_quantize_static(x2, self.act_scale, self.act_format, True)
            s = self.act_scale
            if self.granularity == "block":  # block-scaled GEMM takes a scale per 1x128 block
                s = s.expand(x2.shape[0], (self.in_features + FP8_BLOCK - 1) // FP8_BLOCK)
        return ops.fp8_scaled_mm(q, self.qweight, s, self.scale, self.bias, x2.dtype)


@register_handler(FP8Config)
def _convert(linear: nn.Linear, config: FP8Config) -> nn.Module:
    if config.format not in fmt.FORMATS:
        raise Unsupported(f"format {config.format!r} is not one of {fmt.FORMATS}")
    if config.granularity not in fmt.GRANULARITIES:
        raise Unsupported(f"granularity {config.granularity!r} is not one of {fmt.GRANULARITIES}")
    return FP8Linear.from_float(linear, config.format, config.granularity, "none" if config.weight_only else "dynamic")
