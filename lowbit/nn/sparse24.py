"""2:4 structured-sparse linear module (weight format: :mod:`lowbit.formats.sparse24`).

:class:`Sparse24Linear` keeps the kept values ``[N, ceil(K/16)*8]`` and their 2-bit packed
metadata ``[N, ceil(K/16)*2]``:

* ``values_dtype`` float32/float16/bfloat16 (scheme ``"sparse24"``): float activations,
  :func:`lowbit.ops.sparse24_mm`.
* ``values_dtype=torch.int8`` (scheme ``"sparse24-int8"``): 2:4 + INT8, W8A8 like
  :class:`lowbit.nn.Int8Linear`: each forward quantizes the activation per token
  (:func:`lowbit.ops.int8_quantize_dynamic`) and runs :func:`lowbit.ops.sparse24_int8_scaled_mm`
  (exact int32 accumulation, both scales and the bias in the epilogue).

``from_float(linear, n=2, m=4, calibration=None, recovery=False)`` prunes with
:func:`lowbit.quant.nm_prune.nm_prune_mask` (magnitude, or ``|w|·‖x‖`` when calibration
activations are given) and, with ``recovery=True``, re-fits the kept weights by least squares
on those activations (:func:`lowbit.quant.nm_prune.least_squares_recovery`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import INT8_MAX_K
from ..configs import Sparse24Config, Unsupported, register_handler
from ..formats import sparse24 as fmt
from ..quant import nm_prune as pruner
from .base import QuantizedLinear, check_float_linear

_VALUES_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "int8": torch.int8}


class Sparse24Linear(QuantizedLinear):
    """2:4-sparse linear: half the weights, stored compressed; float or W8A8 int8 values."""

    scheme = "sparse24"
    float32_buffers = ("scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 values_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        if values_dtype not in fmt.VALUE_DTYPES:
            raise ValueError(f"lowbit Sparse24Linear: values_dtype must be float32, float16, bfloat16 or int8, "
                             f"got {values_dtype}")
        if values_dtype == torch.int8 and in_features > INT8_MAX_K:
            raise ValueError(f"lowbit Sparse24Linear: in_features={in_features} exceeds {INT8_MAX_K} for int8 values")
        Kp = fmt.padded_k(in_features)
        self.values_dtype = values_dtype
        self.register_buffer("values", torch.zeros(out_features, Kp // 2, dtype=values_dtype, device=device))
        # 0x44: every group keeps its columns 0 and 1 (valid metadata for the zero weight).
        self.register_buffer("meta", torch.full((out_features, Kp // 8), 0x44, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device)
                             if values_dtype == torch.int8 else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def int8(self) -> bool:
        return self.values_dtype == torch.int8

    @classmethod
    def from_float(cls, linear: nn.Linear, values_dtype: torch.dtype | None = None, n: int = 2, m: int = 4,
                   calibration: torch.Tensor | None = None, recovery: bool = False, damp: float = 0.1):
        """Prune `linear` to N:M along K (n <= 2 of every m = 4: the pattern the kernels run) and compress.

        `values_dtype`: None = the layer's dtype; ``torch.int8`` = W8A8 2:4 + INT8.
        `calibration`: activations [..., K] seen by this layer; they choose the survivors by
        ``|w|·‖x_k‖`` and, with ``recovery=True``, re-fit the kept weights by least squares.
        """
        check_float_linear(linear, max_in_features=INT8_MAX_K if values_dtype == torch.int8 else None)
        if m != fmt.GROUP or not 0 < n <= fmt.KEEP:
            raise Unsupported(f"{n}:{m} sparsity does not fit the 2:4 kernels (need m=4, n<=2)")
        if recovery and calibration is None:
            raise ValueError("lowbit Sparse24Linear.from_float: recovery=True needs calibration activations")
        values_dtype = values_dtype or linear.weight.dtype
        with torch.no_grad():
            w = linear.weight.detach()
            saliency = None if calibration is None else pruner.input_norms(calibration)
            mask = pruner.nm_prune_mask(w, n, m, saliency)
            if recovery:
                w = pruner.least_squares_recovery(w, mask, calibration, damp).to(w.dtype)
            weight = fmt.from_dense(w, mask, values_dtype)
            mod = cls(linear.in_features, linear.out_features, linear.bias is not None, values_dtype=values_dtype,
                      device="meta", dtype=linear.weight.dtype)
            mod.values, mod.meta, mod.scale = weight.values, weight.meta, weight.scale
            if linear.bias is not None:
                mod.bias = linear.bias.detach().clone()
        mod.train(linear.training)
        return mod

    def quantized_weight(self) -> fmt.Sparse24Weight:
        return fmt.Sparse24Weight(self.values, self.meta, self.in_features, self.scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [N, K] weight this layer computes with (pruned entries are 0)."""
        return fmt.dense_weight(self.quantized_weight(), dtype or self.orig_dtype)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.out_features * self.in_features)

    def weight_nbytes(self) -> int:
        return fmt.nbytes(self.out_features, self.in_features, self.values_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", values_dtype={str(self.values_dtype).replace('torch.', '')}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, self._matmul)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.int8:
            q, s = ops.int8_quantize_dynamic(x2, True)
            return ops.sparse24_int8_scaled_mm(q, self.values, self.meta, s, self.scale, self.bias, x2.dtype)
        return ops.sparse24_mm(x2, self.values, self.meta, None, self.bias)


@register_handler(Sparse24Config)
def _convert(linear: nn.Linear, config: Sparse24Config) -> nn.Module:
    values_dtype = None
    if config.values_dtype is not None:
        if config.values_dtype not in _VALUES_DTYPES:
            raise Unsupported(f"values_dtype {config.values_dtype!r} is not one of {sorted(_VALUES_DTYPES)}")
        values_dtype = _VALUES_DTYPES[config.values_dtype]
    return Sparse24Linear.from_float(linear, values_dtype, config.n, config.m)
