"""Codebook family, Triton kernels: codebook_mm and codebook_dequant.

Semantics are those of :mod:`lowbit.backends.reference.codebook`, format in
:mod:`lowbit.formats.codebook`; tests/test_triton_codebook.py runs the host functions against
it (in the interpreter on CPU, natively on a GPU).

Decode in the K loop: for a [BLOCK_K, BLOCK_N] weight tile, column k of row n is code number
``i = (k // d) * C + c`` of the row's bit stream. Its (at most 3) bytes are gathered, shifted and
masked; the codebook entry is gathered from the codebook tensor, which is a few KiB for bits <= 8
and stays resident in L1/L2 (Triton has no explicit shared-memory gather; the CUDA C++ kernel
stages codebooks in shared memory). The C entries are summed in fp32 in order, as the spec does;
the per-row scale multiplies the accumulator once in the epilogue.

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from .int8 import _INTERPRETER_BF16_VIA_FP32, autotune, _config, _gemm_grid, _k_major, _padded_k, _vector


def mm_configs():
    """fp16/bf16 x: tensor-core dot (k = 16). The decode (3 byte gathers, shifts, C codebook
    gathers per weight) is CUDA-core work on every weight of the tile, once per BLOCK_M rows, so
    small-M tiles are decode-bound; wider BLOCK_N shares each x load. Stages and warps of the
    middle two are where Triton 3.6's ptxas spills nothing (with 3 stages and 4 warps, 8 B at
    96 registers: 16x128 on sm_90 with byte-coded pq, 64x64 on sm_80 with 16-bit codes)."""
    return [
        _config(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]


def mm_fp32_configs():
    """fp32 x: the IEEE dot is FMAs on CUDA cores with both tiles in registers: small tiles.
    Measured by the AOT compile: 16x64 and 32x64 with two summed codebooks (aq2) spill 8-24 B on
    sm_80/sm_89 at 255 registers, so BLOCK_N is 32; 32x32 with 4 warps still spills 8 B under
    Triton 3.6 (scalar 4-bit codes with scales), so it takes 8."""
    return [
        _config(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
        _config(8, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
    ]


def dequant_configs():
    return [_config(4, 2, BLOCK_N=32, BLOCK_K=64), _config(4, 2, BLOCK_N=16, BLOCK_K=128)]


@triton.jit
def _decode_tile(codes_ptr, cb_ptr, offs_k, offs_n, mask_k, mask_n, N, row_bytes, stride_cn,
                 rows_per_r, vecs_per_g, G, C: tl.constexpr, E: tl.constexpr, BITS: tl.constexpr,
                 D: tl.constexpr):
    """fp32 [len(offs_k), len(offs_n)]: unscaled weights W[n, k] = sum_c codebooks[r, g, c, code]."""
    j = offs_k // D
    t = offs_k % D
    r = offs_n // rows_per_r
    g = j // vecs_per_g
    mask = mask_k[:, None] & mask_n[None, :]
    row = codes_ptr + offs_n.to(tl.int64)[None, :] * stride_cn
    w = tl.zeros((offs_k.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for c in tl.static_range(C):
        bit = (j * C + c).to(tl.int64) * BITS
        byte = (bit >> 3)[:, None]
        shift = (bit & 7)[:, None]
        v = tl.load(row + byte, mask=mask, other=0).to(tl.int32)
        if BITS > 1:  # a code of b bits at offset <= 7 spans ceil((b + 7) / 8) bytes
            v |= tl.load(row + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0).to(tl.int32) << 8
        if BITS > 9:
            v |= tl.load(row + byte + 2, mask=mask & (byte + 2 < row_bytes), other=0).to(tl.int32) << 16
        code = (v >> shift) & (E - 1)
        entry = ((r[None, :].to(tl.int64) * G + g[:, None]) * C + c) * E + code
        w += tl.load(cb_ptr + entry * D + t[:, None], mask=mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _codebook_mm_kernel(
    # pointers
    x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, c_ptr,
    # sizes: K = x's columns (x beyond K reads as 0); row_bytes = packed bytes per weight row
    M, N, K, row_bytes, rows_per_r, vecs_per_g, G,
    # strides
    stride_xm, stride_xk, stride_cn, stride_om, stride_on, stride_bias,
    # meta-parameters
    C: tl.constexpr, E: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _decode_tile(codes_ptr, cb_ptr, offs_k, offs_n, mask_k, mask_n, N, row_bytes, stride_cn,
                         rows_per_r, vecs_per_g, G, C, E, BITS, D)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            # The tensor-core operand is x's dtype: each decoded weight is rounded once (RNE) to it.
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    y = acc
    if HAS_SCALE:
        y *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_codebook_mm_tc = autotune(mm_configs(), ["M", "N", "K"])(
    _codebook_mm_kernel)
_codebook_mm_fp32 = autotune(mm_fp32_configs(), ["M", "N", "K"])(
    _codebook_mm_kernel)


@triton.jit
def _codebook_dequant_kernel(
    codes_ptr, cb_ptr, scale_ptr, out_ptr,
    N, K, row_bytes, rows_per_r, vecs_per_g, G,
    stride_cn, stride_on,
    C: tl.constexpr, E: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    w = _decode_tile(codes_ptr, cb_ptr, offs_k, offs_n, mask_k, mask_n, N, row_bytes, stride_cn,
                     rows_per_r, vecs_per_g, G, C, E, BITS, D)
    if HAS_SCALE:
        w *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_n.to(tl.int64)[None, :] * stride_on + offs_k[:, None]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


_codebook_dequant = autotune(dequant_configs(), ["N", "K"])(
    _codebook_dequant_kernel)


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _layout(codes, codebooks, K):
    R, G, C, E, d = codebooks.shape
    N = codes.shape[0]
    return dict(rows_per_r=N // R, vecs_per_g=(K // d) // G, G=G), dict(C=C, E=E, BITS=E.bit_length() - 1, D=d)


def codebook_mm(x, codes, codebooks, scale=None, bias=None):
    M, N = _checks.codebook_mm("codebook_mm", x, codes, codebooks, scale, bias)
    if _INTERPRETER_BF16_VIA_FP32 and x.dtype == torch.bfloat16:
        return codebook_mm(x.to(torch.float32), codes, codebooks, scale, bias).to(torch.bfloat16)
    K = x.shape[1]
    x = _k_major(x, _padded_k(K))
    codes = _byte_rows(codes)
    cb = codebooks.contiguous()
    scale_arg = scale.contiguous() if scale is not None else cb  # never read without HAS_SCALE
    bias_arg, stride_bias = _vector(bias) if bias is not None else (cb, 0)
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    sizes, meta = _layout(codes, cb, K)
    ieee = x.dtype == torch.float32
    kernel = _codebook_mm_fp32 if ieee else _codebook_mm_tc
    kernel[_gemm_grid(M, N)](
        x, codes, cb, scale_arg, bias_arg, c,
        M, N, K, codes.shape[1], sizes["rows_per_r"], sizes["vecs_per_g"], sizes["G"],
        x.stride(0), x.stride(1), codes.stride(0), c.stride(0), c.stride(1), stride_bias,
        **meta, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, IEEE=ieee,
    )
    return c


def codebook_dequant(codes, codebooks, scale, in_features, out_dtype=None):
    N, out_dtype = _checks.codebook_dequant("codebook_dequant", codes, codebooks, scale, in_features, out_dtype)
    K = in_features
    codes = _byte_rows(codes)
    cb = codebooks.contiguous()
    store_dtype = torch.float32 if (_INTERPRETER_BF16_VIA_FP32 and out_dtype == torch.bfloat16) else out_dtype
    out = torch.empty((N, K), dtype=store_dtype, device=codes.device)
    sizes, meta = _layout(codes, cb, K)
    scale_arg = scale.contiguous() if scale is not None else cb
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), triton.cdiv(K, META["BLOCK_K"]))  # noqa: E731
    _codebook_dequant[grid](
        codes, cb, scale_arg, out,
        N, K, codes.shape[1], sizes["rows_per_r"], sizes["vecs_per_g"], sizes["G"],
        codes.stride(0), out.stride(0),
        **meta, HAS_SCALE=scale is not None,
    )
    return out.to(out_dtype)


KERNELS = {
    "codebook_mm": codebook_mm,
    "codebook_dequant": codebook_dequant,
}
