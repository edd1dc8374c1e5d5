"""SPARSE24 family, Triton kernels.

Semantics are those of :mod:`lowbit.backends.reference.sparse24`, format in
:mod:`lowbit.formats.sparse24`; tests/test_triton_sparse24.py runs the host functions against
it (in the interpreter on CPU, natively on a GPU).

One kernel consumes the compressed weight directly: every BLOCK_K step loads the kept values
``[BLOCK_K/2, BLOCK_N]`` and metadata bytes ``[BLOCK_K/8, BLOCK_N]`` (read with per-column index
vectors, so each is fetched once from memory and the repeats hit L1), decompresses the dense
``[BLOCK_K, BLOCK_N]`` tile in registers (column ``4g + p`` takes value ``2g`` if ``p == i0``,
``2g + 1`` if ``p == i1``, else 0) and feeds a dense ``tl.dot``. The dense weight never
reaches memory. (The tensor cores' own 2:4 path, ``mma.sp``, is not reachable from ``tl.dot``:
it is the CUDA C++ kernel's job, csrc/cuda/sparse24.cu.)

* ``sparse24_mm``: float x; values float or int8 (per-channel scale in the epilogue).
* ``sparse24_int8_scaled_mm``: int8 x int8 ``tl.dot`` with int32 accumulation (exact), then the
  int8_scaled_mm epilogue.

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from .int8 import _INTERPRETER_BF16_VIA_FP32, autotune, _config, _gemm_grid, _k_major, _padded_k, _tile_offsets, _vector


def float_configs():
    """fp16/bf16 x: tensor-core dots (k=16 steps); the decompress (two value loads and a metadata
    byte per group of 4 columns, two compares and selects per dense weight) runs on CUDA cores
    once per BLOCK_M rows."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]


def fp32_configs():
    """fp32 x: IEEE fp32 dots as FMAs on CUDA cores, both tiles in registers: small tiles (32x64
    with 4 warps takes 255 registers and spills 24 B under Triton 3.8, hence 8 warps)."""
    return [
        _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _config(8, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ]


def int8_configs():
    """int8 x int8 -> int32 tensor-core dots (k=32 steps). Measured by the AOT compile on sm_80:
    a 64x128 tile with BLOCK_K = 64 spills under one Triton or the other (8 warps: 8 B under
    3.8; 4 warps: 16-40 B under 3.6), so it steps 32 deep."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ]


@triton.jit
def _sparse24_mm_kernel(
    # pointers (scale_a_ptr only with INT8_DOT, scale_ptr only with HAS_SCALE or INT8_DOT)
    x_ptr, v_ptr, meta_ptr, c_ptr, scale_ptr, scale_a_ptr, bias_ptr,
    # sizes: K = x's columns (zero-padded to a multiple of 16), KP = dense columns of the
    # compressed weight (ceil(K0/16)*16 = 2 * values per row)
    M, N, K, KP,
    # strides
    stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mk, stride_cm, stride_cn,
    stride_s, stride_sa, stride_bias,
    # meta-parameters
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, INT8_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = (m0 + offs_m) < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, BLOCK_K // 4)     # groups of the step
    pos = tl.arange(0, 4)[None, :, None]    # column within a group
    x_rows = x_ptr + m0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    v_cols = v_ptr + offs_n.to(tl.int64)[None, :] * stride_vn
    m_cols = meta_ptr + offs_n.to(tl.int64)[None, :] * stride_mn
    if INT8_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        # k0 is a multiple of 16: groups and metadata bytes start at the step's first column.
        kk = k0 + offs_k
        g = k0 // 4 + offs_g
        g_mask = (4 * g < KP)[:, None] & mask_n[None, :]
        # One element per group (not per dense column) of the values and metadata, then the
        # dense tile as [groups, 4, BLOCK_N] reshaped: loading them per dense column, as this
        # kernel first did, kept four copies of each live and spilled (Triton 3.6: 255
        # registers and 888 B of stack at 16x128x64 on sm_90).
        v0 = tl.load(v_cols + (2 * g)[:, None] * stride_vk, mask=g_mask, other=0)
        v1 = tl.load(v_cols + (2 * g + 1)[:, None] * stride_vk, mask=g_mask, other=0)
        byte = tl.load(m_cols + (g // 2)[:, None] * stride_mk, mask=g_mask, other=0x44)
        nibble = (byte.to(tl.int32) >> ((g % 2) * 4)[:, None]) & 0xF
        i0 = (nibble & 3)[:, None, :]
        i1 = (nibble >> 2)[:, None, :]
        zero = tl.zeros_like(v0)[:, None, :]
        w = tl.where(pos == i0, v0[:, None, :], tl.where(pos == i1, v1[:, None, :], zero))  # [groups, 4, BLOCK_N]
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & (kk < K)[None, :], other=0)
        if INT8_DOT:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # Triton <= 3.6 needs the int32 named
        elif IEEE:
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
        else:
            # The tensor-core operand is x's dtype: a wider value is rounded once (RNE) to it.
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    if INT8_DOT:
        # float(acc) * scale_a * scale_b + bias, each step rounded as in int8_scaled_mm.
        sa = tl.load(scale_a_ptr + (m0 + offs_m) * stride_sa, mask=mask_m, other=0.0)
        sb = tl.load(scale_ptr + offs_n * stride_s, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * sa[:, None]
        y = y * sb[None, :]
    else:
        y = acc
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + offs_n * stride_s, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_cm = m0 + offs_m
    c_ptrs = c_ptr + offs_cm.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# One kernel, three tuning spaces.
_sparse24_mm_tc = autotune(float_configs(), ["M", "N", "K"])(
    _sparse24_mm_kernel)
_sparse24_mm_fp32 = autotune(fp32_configs(), ["M", "N", "K"])(
    _sparse24_mm_kernel)
_sparse24_mm_int8 = autotune(int8_configs(), ["M", "N", "K"])(
    _sparse24_mm_kernel)


def _launch(kernel, x, values, meta, c, scale, scale_a, bias, *, int8_dot):
    M, N = c.shape
    values, meta = values.contiguous(), meta.contiguous()
    scale_arg, stride_s = _vector(scale) if scale is not None else (values, 0)
    sa_arg, stride_sa = _vector(scale_a) if scale_a is not None else (values, 0)
    bias_arg, stride_bias = _vector(bias) if bias is not None else (values, 0)
    kernel[_gemm_grid(M, N)](
        x, values, meta, c, scale_arg, sa_arg, bias_arg,
        M, N, x.shape[1], 2 * values.shape[1],
        x.stride(0), x.stride(1), values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
        c.stride(0), c.stride(1), stride_s, stride_sa, stride_bias,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, INT8_DOT=int8_dot,
    )
    return c


def sparse24_mm(x, values, meta, scale=None, bias=None):
    M, N = _checks.sparse24_mm("sparse24_mm", x, values, meta, scale, bias)
    if _INTERPRETER_BF16_VIA_FP32 and (x.dtype == torch.bfloat16 or values.dtype == torch.bfloat16):
        v32 = values.to(torch.float32) if values.dtype == torch.bfloat16 else values
        return sparse24_mm(x.to(torch.float32), v32, meta, scale, bias).to(x.dtype)
    x = _k_major(x, _padded_k(x.shape[1]))
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    kernel = _sparse24_mm_fp32 if x.dtype == torch.float32 else _sparse24_mm_tc
    return _launch(kernel, x, values, meta, c, scale, None, bias, int8_dot=False)


def sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.sparse24_int8_scaled_mm("sparse24_int8_scaled_mm", a, values, meta, scale_a, scale_b,
                                                      bias, out_dtype)
    if _INTERPRETER_BF16_VIA_FP32 and out_dtype == torch.bfloat16:
        return sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, torch.float32).to(torch.bfloat16)
    a = _k_major(a, _padded_k(a.shape[1]))
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    return _launch(_sparse24_mm_int8, a, values, meta, c, scale_b, scale_a, bias, int8_dot=True)


KERNELS = {
    "sparse24_mm": sparse24_mm,
    "sparse24_int8_scaled_mm": sparse24_int8_scaled_mm,
}
