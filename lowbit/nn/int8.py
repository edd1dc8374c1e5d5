"""INT8 linear modules (weight format: :mod:`lowbit.formats.int8`).

* :class:`Int8Linear` (scheme ``"int8"``, W8A8): each forward quantizes the activation per token
  (:func:`lowbit.ops.int8_quantize_dynamic`) and runs :func:`lowbit.ops.int8_scaled_mm`, which
  applies both scales and the bias in its epilogue.
* :class:`Int8WeightOnlyLinear` (scheme ``"int8-weight"``): float activations,
  :func:`lowbit.ops.int8_weight_only_mm`.

Weights are buffers (``qweight``, ``scale``, ``bias``), so ``state_dict`` / ``load_state_dict``
and ``.to(device)`` work as for any module. Forward has no data-dependent Python control flow,
so both modules trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import INT8_MAX_K
from ..configs import Int8Config, register_handler
from ..formats import int8 as fmt
from .base import QuantizedLinear, check_float_linear

ACTIVATIONS = ("dynamic", "static")


class _Int8LinearBase(QuantizedLinear):
    float32_buffers = ("scale",)
    #: largest K the module accepts (None: no limit)
    max_in_features: int | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=fmt.SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear):
        check_float_linear(linear, max_in_features=cls.max_in_features)
        with torch.no_grad():
            w = fmt.quantize_weight(linear.weight)
            # Built on meta, then given the real tensors: no second full-size allocation.
            m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta", dtype=linear.weight.dtype)
            m.qweight, m.scale = w.qweight, w.scale
            if linear.bias is not None:
                m.bias = linear.bias.detach().clone()
        m.train(linear.training)
        return m

    # Not a `weight` attribute: model code that reads `layer.weight.dtype` must fail loudly
    # rather than see int8 and cast activations to it.
    def quantized_weight(self) -> fmt.Int8Weight:
        return fmt.Int8Weight(self.qweight, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float [N, K] weight this layer computes with (for inspection and debugging)."""
        return fmt.dequantize(self.quantized_weight(), dtype or self.orig_dtype)

    def bits_per_weight(self) -> float:
        return fmt.bits_per_weight(self.out_features, self.in_features)

    def weight_nbytes(self) -> int:
        return fmt.nbytes(self.out_features, self.in_features)


class Int8Linear(_Int8LinearBase):
    """W8A8 linear: int8 activations x per-channel int8 weights, int32 accumulation.

    ``activation="dynamic"`` (default): per-token scales from each input's own amax.
    ``activation="static"``: one calibrated per-tensor scale ``act_scale`` (float32 scalar, set by
    :func:`lowbit.calibrate` or given to :meth:`from_float`); inputs beyond it saturate at +-127.
    """

    scheme = "int8"
    max_in_features = INT8_MAX_K
    float32_buffers = ("scale", "act_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation: str = "dynamic",
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if activation not in ACTIVATIONS:
            raise ValueError(f"lowbit Int8Linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device)
                             if activation == "static" else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: str = "dynamic",
                   act_scale: float | torch.Tensor | None = None):
        """``activation="static"`` needs ``act_scale``: the calibrated amax / 127 of the input."""
        if activation == "static":
            s = float(act_scale) if act_scale is not None else float("nan")
            if not (0.0 < s < float("inf")):
                raise ValueError(f"lowbit Int8Linear: activation='static' needs a finite act_scale > 0 "
                                 f"(calibrated amax / 127), got {act_scale!r}")
        m = super().from_float(linear)
        if activation != "dynamic":
            m.activation = activation
            m.act_scale = torch.tensor(s, dtype=torch.float32, device=m.qweight.device)
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, self._matmul)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.activation == "static":
            q, s = ops.int8_quantize_static(x2, self.act_scale), self.act_scale
        else:
            q, s = ops.int8_quantize_dynamic(x2, True)
        return ops.int8_scaled_mm(q, self.qweight, s, self.scale, self.bias, x2.dtype)


class Int8WeightOnlyLinear(_Int8LinearBase):
    """Weight-only int8 linear: float activations, weights dequantized inside the kernel."""

    scheme = "int8-weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, lambda x2: ops.int8_weight_only_mm(x2, self.qweight, self.scale, self.bias))


@register_handler(Int8Config)
def _convert(linear: nn.Linear, config: Int8Config) -> nn.Module:
    cls = Int8WeightOnlyLinear if config.weight_only else Int8Linear
    return cls.from_float(linear)
