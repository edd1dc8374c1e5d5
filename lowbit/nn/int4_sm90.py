"""INT4 weight-only linear on the cutlass_sm90 layout (UNVERIFIED: its CUDA kernel has not run on a GPU).

:class:`Int4LinearCutlassSm90` holds the weights of an :class:`~lowbit.nn.Int4Linear` repacked
for CUTLASS's sm_90 mixed-input GEMM (:func:`lowbit.ops.int4_repack_cutlass_sm90`, layout in
:mod:`lowbit.formats.int4`) and runs :func:`lowbit.ops.int4_cutlass_sm90_mm`. It is opt-in only:
no preset or config builds it, and the op is not in ``lowbit/backends/verified.py``, so on CUDA
tensors its Triton kernel serves it (sm_80+) unless ``lowbit.backends.use("cuda")`` forces the
CUTLASS kernel.
The activations' dtype T (float16 or bfloat16) is fixed at conversion: scale and zero' are
stored in T, each weight is rounded to T (docs/ops.md, "cutlass_sm90 layout").
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats import int4 as fmt
from .base import QuantizedLinear
from .int4 import Int4Linear


class Int4LinearCutlassSm90(QuantizedLinear):
    """Int4 weights in the cutlass_sm90 layout for activations of one dtype (float16 or bfloat16)."""

    scheme = "int4-cutlass-sm90"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, dtype)
        if dtype not in fmt.CUTLASS_SM90_DTYPES:
            raise ValueError(f"lowbit Int4LinearCutlassSm90: dtype must be float16 or bfloat16, got {dtype}")
        if (in_features % fmt.CUTLASS_SM90_K_ALIGN or out_features % fmt.CUTLASS_SM90_N_ALIGN
                or not fmt.cutlass_sm90_group_ok(group_size, in_features)):
            raise ValueError(f"lowbit Int4LinearCutlassSm90: needs in_features % 32 == 0, out_features % 8 == 0 and "
                             f"group_size 64, 128 or in_features; got {in_features}, {out_features}, {group_size}")
        self.group_size = group_size
        groups = fmt.num_groups(in_features, group_size)
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("zero", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_int4(cls, layer: Int4Linear, dtype: torch.dtype | None = None) -> Int4LinearCutlassSm90:
        """Repack an Int4Linear (dtype defaults to the layer's original weight dtype)."""
        dtype = dtype or layer.orig_dtype
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, group_size=layer.group_size,
                dtype=dtype, device="meta")
        with torch.no_grad():
            m.packed, m.scale, m.zero = ops.int4_repack_cutlass_sm90(layer.packed, layer.scale, layer.zero,
                                                                     layer.group_size, layer.in_features, dtype)
            if layer.bias is not None:
                m.bias = layer.bias.detach().to(dtype).clone()
        m.train(layer.training)
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False,
                   dtype: torch.dtype | None = None) -> Int4LinearCutlassSm90:
        return cls.from_int4(Int4Linear.from_float(linear, group_size, symmetric), dtype or linear.weight.dtype)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.out_features * self.in_features)

    def weight_nbytes(self) -> int:
        return self.packed.numel() + (self.scale.numel() + self.zero.numel()) * self.scale.element_size()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, dtype={self.scale.dtype}, unverified"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dtype != self.scale.dtype:
            raise ValueError(f"lowbit Int4LinearCutlassSm90: input must have dtype {self.scale.dtype} (the layout's "
                             f"scale dtype), got {x.dtype}")
        return self._map_rows(x, lambda x2: ops.int4_cutlass_sm90_mm(x2, self.packed, self.scale, self.zero,
                                                                      self.group_size, self.bias))
