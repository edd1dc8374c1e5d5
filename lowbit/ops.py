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


# --------------------------------------------------------------------------- FP8
def fp8_quantize_dynamic(
    x: torch.Tensor, format: str = "e4m3", granularity: str = "row", saturate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization with scales from `x` itself: ``x ~= q * scale`` (scale = amax / fmax).

    `format`: ``"e4m3"`` (torch.float8_e4m3fn, max 448) or ``"e5m2"`` (torch.float8_e5m2, max
    57344). `granularity` and the float32 scale's shape: ``"tensor"`` ``[]``; ``"row"``
    ``x.shape[:-1]`` (per token / per output channel); ``"block1x128"`` ``x.shape[:-1] +
    [ceil(K/128)]`` (activations, DeepSeek-style); ``"block128x128"`` ``[ceil(R/128),
    ceil(K/128)]`` for a 2-D `x` (weights). Round to nearest even; out-of-range values saturate
    to +-max unless ``saturate=False`` (then e4m3 gives NaN and e5m2 inf); NaN stays NaN; all-zero
    groups get scale 1.
    """
    return _lowbit.fp8_quantize_dynamic(x, format, granularity, saturate)


def fp8_quantize_static(x: torch.Tensor, scale: torch.Tensor, format: str = "e4m3", saturate: bool = True) -> torch.Tensor:
    """FP8 quantization with a given (calibrated) float32 scale: scalar, per row, or per 1x128 block."""
    return _lowbit.fp8_quantize_static(x, scale, format, saturate)


def fp8_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """FP8 GEMM ``dequant(a) @ dequant(b).T + bias`` with float32 accumulation.

    `a` [M, K] and `b` [N, K] are float8_e4m3fn or float8_e5m2 (each either). Scales (float32)
    select the granularity: ``scale_a`` scalar or [M] with ``scale_b`` scalar or [N]; or block
    scaling with ``scale_a`` [M, ceil(K/128)] and ``scale_b`` [ceil(N/128), ceil(K/128)].
    Output ``out_dtype``: float32 (default), float16 or bfloat16.
    """
    return _lowbit.fp8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)


def fp8_weight_only_mm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only FP8 GEMM: float `x` [M, K] times fp8 `w` [N, K] decoded in the kernel.

    `scale` float32: scalar, [N] (per channel) or [ceil(N/128), ceil(K/128)] (128x128 blocks).
    Accumulation float32; output in `x.dtype`.
    """
    return _lowbit.fp8_weight_only_mm(x, w, scale, bias)


# --------------------------------------------------------------------------- binary
def binary_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binarize float `x` [M, K] for the XNOR GEMM, fused: sign bits and the XNOR-Net scale.

    Returns ``(packed, scale)``: ``packed`` int32 [M, ceil(K/32)] in the layout of
    lowbit/formats/binary.py (bit 1 = +1, sign(0) = +1, LSB-first along K, padding 0);
    ``scale`` float32 [M] = mean |x| per row. ``x ~= scale[:, None] * unpack(packed)``.
    """
    return _lowbit.binary_quantize(x)


def binary_mm(a: torch.Tensor, b: torch.Tensor, K: int) -> torch.Tensor:
    """Exact ±1 GEMM: packed `a` [M, ceil(K/32)] times packed `b` [N, ceil(K/32)] -> int32 [M, N].

    ``out[m, n] = K - 2 * popcount(a[m] XOR b[n])`` over the K real bits: the dot product of the
    ±1 vectors (nn.Linear layout, ``a @ b.T``). Padding bits are ignored.
    """
    return _lowbit.binary_mm(a, b, K)


def binary_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    K: int,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """XNOR-Net GEMM: ``binary_mm(a, b, K) * scale_a[:, None] * scale_b[None, :] + bias``, fused.

    ``scale_a`` float32 [M] (alpha, per row of activations) or scalar; ``scale_b`` float32 [N]
    (beta, per output channel) or scalar; ``bias`` [N]; output ``out_dtype`` (float32 default,
    float16, bfloat16). Computed in float32 in that order, then rounded once to out_dtype.
    """
    return _lowbit.binary_scaled_mm(a, b, K, scale_a, scale_b, bias, out_dtype)



# --------------------------------------------------------------------------- SPARSE24
def sparse24_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """2:4-sparse GEMM: ``(x @ W.T) * scale + bias`` with W the dense form of (`values`, `meta`).

    `values` [N, ceil(K/16)*8] float32/float16/bfloat16, or int8 with the float32 per-channel
    `scale` [N] required; `meta` uint8 [N, ceil(K/16)*2] (lowbit/formats/sparse24.py); `x` float
    [M, K]. Accumulation float32; output in `x.dtype`.
    """
    return _lowbit.sparse24_mm(x, values, meta, scale, bias)


def sparse24_int8_scaled_mm(
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """2:4 + INT8 (W8A8): exact int32 ``a @ W.T`` for int8 `a` [M, K] and int8 2:4 `values`, then
    ``* scale_a[:, None] * scale_b[None, :] + bias`` in the epilogue (as :func:`int8_scaled_mm`)."""
    return _lowbit.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, out_dtype)


# --------------------------------------------------------------------------- codebook
def codebook_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a codebook-coded weight W, decoded inside the kernel (never whole).

    `codes` (packed uint8 [N, ceil(J*C*bits/8)]), `codebooks` ([R, G, C, 2**bits, d]) and
    `scale` ([N] or None) follow lowbit/formats/codebook.py; ``W[n, j*d:(j+1)*d] = scale[n] *
    sum_c codebooks[n // (N/R), j // (J/G), c, code(n, j, c)]``. `x` float [M, K]; output in x.dtype.
    """
    return _lowbit.codebook_mm(x, codes, codebooks, scale, bias)


def codebook_dequant(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scale: torch.Tensor | None,
    in_features: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The decoded weight [N, in_features] of a codebook-coded layer (out_dtype, default float32)."""
    return _lowbit.codebook_dequant(codes, codebooks, scale, in_features, out_dtype)


# ---- int4 cutlass_sm90 (unverified on a GPU)
def int4_repack_cutlass_sm90(
    packed_w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    K: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lowbit int4 weights -> the cutlass_sm90 layout (lowbit/formats/int4.py) for activations of `dtype`.

    Returns ``(packed [N, K/2] uint8, scale [G, N], zero' [G, N])``, scale and zero' in `dtype`
    (float16 or bfloat16). Needs K % 32 == 0, N % 8 == 0, group_size 64, 128 or K.
    """
    return _lowbit.int4_repack_cutlass_sm90(packed_w, scale, zero, group_size, K, dtype)


def int4_cutlass_sm90_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 GEMM on weights in the cutlass_sm90 layout (from :func:`int4_repack_cutlass_sm90`).

    ``out = x @ w.T + bias`` with ``w = round(round(q * scale) + zero')`` in `x.dtype` (float16 or
    bfloat16), accumulation float32, output in `x.dtype`. On an sm_90 GPU with the CUDA backend
    forced this runs CUTLASS's TMA + wgmma mixed-input GEMM, which has not run on a GPU yet
    (unverified, never picked by default).
    """
    return _lowbit.int4_cutlass_sm90_mm(x, packed, scale, zero, group_size, bias)
