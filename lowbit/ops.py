"""The public op API: typed, documented wrappers over ``torch.ops.lowbit.*``.

Each function is a thin call into the dispatcher, so it works on every device and under
``torch.compile``; the contract of every op (layouts, numerics, errors, backends) is in
docs/ops.md. Libraries that use lowbit as a backend may call ``torch.ops.lowbit.<op>``
directly: the semantics are identical.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (defines the schemas)

_lowbit = torch.ops.lowbit


# --------------------------------------------------------------------------- INT8
def int8_quantize_dynamic(x: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with the scale taken from `x` itself.

    Returns ``(q, scale)``: ``q`` int8 like `x`, values in [-127, 127]; ``scale`` float32 with
    shape ``x.shape[:-1]`` (one per row: per-token for activations, per-channel for an
    [N, K] weight) or ``[]`` when ``per_row=False`` (per-tensor). ``x ~= q * scale[..., None]``.
    """
    return _lowbit.int8_quantize_dynamic(x, per_row)


def int8_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantization with a given (calibrated) float32 scale: a scalar or one per row."""
    return _lowbit.int8_quantize_static(x, scale)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` [M, K] and int8 ``b`` [N, K] (nn.Linear layout) -> int32 [M, N]."""
    return _lowbit.int8_mm(a, b)


def int8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A8 GEMM: ``(a @ b.T) * scale_a[:, None] * scale_b[None, :] + bias``, fused.

    ``scale_a`` float32 [M] (per token) or scalar; ``scale_b`` float32 [N] (per channel) or
    scalar; ``bias`` [N]; output ``out_dtype`` (float32 default, float16, bfloat16).
    """
    return _lowbit.int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)


def int8_weight_only_mm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only int8 GEMM: ``(x @ w.T) * scale + bias`` with float `x` [M, K], int8 `w` [N, K], `scale` [N].

    The weight is dequantized inside the kernel (never materialized in float); accumulation
    is float32; the output has `x`'s dtype.
    """
    return _lowbit.int8_weight_only_mm(x, w, scale, bias)


# --------------------------------------------------------------------------- INT4
def int4_weight_only_mm(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 GEMM: ``x @ dequantize(w).T + bias`` with group-wise int4 weights, dequantized in the kernel.

    `packed_w`, `scale`, `zero` follow lowbit/formats/int4.py (``zero=None``: symmetric);
    `x` float32/float16/bfloat16 [M, K]; accumulation float32; output in `x.dtype`.
    """
    return _lowbit.int4_weight_only_mm(x, packed_w, scale, zero, group_size, bias)
