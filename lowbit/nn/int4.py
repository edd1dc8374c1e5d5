"""INT4 weight-only linear (W4A16; weight format: :mod:`lowbit.formats.int4`).

:class:`Int4Linear` keeps group-wise 4-bit weights packed two per byte (``packed``), with
``scale`` and ``zero`` per group, and runs :func:`lowbit.ops.int4_weight_only_mm`, which
dequantizes inside the kernel. Presets ``"int4"`` (group 128, asymmetric), ``"int4-g64"``,
``"int4-g32"``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..configs import Int4Config, Unsupported, register_handler
from ..formats import int4 as fmt
from .base import QuantizedLinear, check_float_linear

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Int4Linear(QuantizedLinear):
    """Weight-only int4 linear: float activations x group-wise int4 weights, float32 accumulation."""

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 symmetric: bool = False, scale_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        if not fmt.valid_group_size(group_size, in_features):
            raise ValueError(f"lowbit Int4Linear: group_size must be one of {fmt.GROUP_SIZES} or "
                             f"in_features={in_features}, got {group_size}")
        self.group_size = group_size
        groups = fmt.num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(out_features, fmt.padded_k(in_features) // 2,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zero", None if symmetric else
                             torch.full((out_features, groups), 8.0, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = False,
                   clip_search: bool = False, scale_dtype: torch.dtype | None = None):
        check_float_linear(linear)
        K = linear.in_features
        group_size = K if group_size is None else group_size
        if not fmt.valid_group_size(group_size, K):
            raise Unsupported(f"group_size {group_size} is not one of {fmt.GROUP_SIZES} or in_features={K}")
        with torch.no_grad():
            w = fmt.quantize_weight(linear.weight, group_size, symmetric, scale_dtype, clip_search)
            m = cls(K, linear.out_features, linear.bias is not None, group_size=group_size, symmetric=symmetric,
                    scale_dtype=w.scale.dtype, device="meta", dtype=linear.weight.dtype)
            m.packed, m.scale, m.zero = w.packed, w.scale, w.zero
            if linear.bias is not None:
                m.bias = linear.bias.detach().clone()
        m.train(linear.training)
        return m

    def quantized_weight(self) -> fmt.Int4Weight:
        return fmt.Int4Weight(self.packed, self.scale, self.zero, self.in_features, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float [N, K] weight this layer computes with (for inspection and debugging)."""
        return fmt.dequantize(self.quantized_weight()).to(dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", group_size={self.group_size}, "
                f"symmetric={self.zero is None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, lambda x2: ops.int4_weight_only_mm(x2, self.packed, self.scale, self.zero,
                                                                     self.group_size, self.bias))


@register_handler(Int4Config)
def _convert(linear: nn.Linear, config: Int4Config) -> nn.Module:
    scale_dtype = None
    if config.scale_dtype is not None:
        if config.scale_dtype not in _SCALE_DTYPES:
            raise Unsupported(f"scale_dtype {config.scale_dtype!r} is not one of {sorted(_SCALE_DTYPES)}")
        scale_dtype = _SCALE_DTYPES[config.scale_dtype]
    return Int4Linear.from_float(linear, config.group_size, config.symmetric, config.clip_search, scale_dtype)
