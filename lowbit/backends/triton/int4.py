"""INT4 family, Triton kernels.

Semantics are those of :mod:`lowbit.backends.reference.int4`, format in
:mod:`lowbit.formats.int4`; tests/test_triton_int4.py and tests/test_triton_int4_sm90.py (the
cutlass_sm90 layout's GEMM) run the host functions against it (in the interpreter on CPU,
natively on a GPU). Layout as in :mod:`.int8`: autotune configs in a
function beside the kernel, grouped kernel arguments, a host function named like the op.

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`, which compiles
it for sm_80/sm_89/sm_90 with every config returned by these config functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from ...formats import int4 as fmt
from .int8 import _INTERPRETER_BF16_VIA_FP32, autotune, _config, _gemm_grid, _k_major, _padded_k, _tile_offsets, _vector


# ============================================================================ weight-only GEMM
def weight_only_configs():
    """fp16/bf16 x: the dot runs on tensor cores (mma k=16). Each BLOCK_K step issues two dots
    of BLOCK_K/2 (low and high nibbles), so BLOCK_K >= 32.

    The dequantize (and, shift, convert, subtract, multiply, convert) costs CUDA-core work on
    every weight of the [BLOCK_K, BLOCK_N] tile, once per BLOCK_M rows: small-M tiles are
    memory-bound decode (M = 1..16), where only the weight bytes matter.

    Measured by the AOT compile: 128x128x64 with 8 warps spills on sm_80 (48-56 B of stack at
    255 registers) and 16x128x64 spills 8 B on sm_89 with per-channel fp32 scales, so the
    large tile takes BLOCK_K = 32 (186 registers or fewer) and the wide decode tile 128. Triton
    3.6's ptxas (the GPU machines' Triton) spills 8 B from 32x64x64 on sm_90 with bf16
    symmetric weights, at 72 registers, so that tile steps 32 deep."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]


def weight_only_fp32_configs():
    """fp32 x: the IEEE fp32 dot runs as FMAs on CUDA cores with both tiles in registers, so
    BLOCK_K stays at its minimum (32: two 16-deep dots). Measured by the AOT compile: 64x64
    outputs per 4 warps spill (~300 B of stack on sm_80/89/90), so the largest tile is 32x64."""
    return [
        _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _config(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ]


@triton.jit
def _per_byte(v, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K // 32, BLOCK_N] per-block values -> [BLOCK_K // 2, BLOCK_N], one row per byte."""
    v = tl.broadcast_to(v[:, None, :], (BLOCK_K // 32, 16, BLOCK_N))
    return tl.reshape(v, (BLOCK_K // 2, BLOCK_N))


@triton.jit
def _store_with_bias(acc, c_ptr, bias_ptr, m0, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, stride_bias,
                     HAS_BIAS: tl.constexpr):
    """The fp32 tile (+ bias, in fp32) rounded once to the output dtype: both int4 kernels' epilogue."""
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    offs_cm = m0 + offs_m
    c_ptrs = c_ptr + offs_cm.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_weight_only_mm_kernel(
    # pointers
    x_ptr, w_ptr, c_ptr, scale_ptr, zero_ptr, bias_ptr,
    # sizes: K = x's columns (x beyond K reads as 0), KB = packed bytes per weight row
    # (ceil(K/32)*16), group_size = columns per scale (a multiple of 32)
    M, N, K, KB, group_size,
    # strides (scale and zero share theirs)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn, stride_sn, stride_sg, stride_bias,
    # meta-parameters
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,  # IEEE: fp32 x and weights
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = (m0 + offs_m) < M
    mask_n = offs_n < N
    # A BLOCK_K step covers BLOCK_K // 32 packed blocks = BLOCK_K // 2 bytes per weight row.
    # Byte c of the step holds column 32*(c//16) + c%16 in its low nibble and that column + 16
    # in its high nibble (lowbit.formats.int4): x is loaded in those two column orders, so the
    # nibble tiles need no shuffle and each half is an ordinary dot over BLOCK_K // 2.
    offs_c = tl.arange(0, BLOCK_K // 2)
    offs_b = tl.arange(0, BLOCK_K // 32)
    col_lo = (offs_c // 16) * 32 + offs_c % 16
    x_rows = x_ptr + m0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    # Weight tile read transposed ([bytes, BLOCK_N]) straight from the [N, KB] layout.
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    s_cols = offs_n[None, :] * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, KB, BLOCK_K // 2):
        byte = kb0 + offs_c
        # Bytes past the row are also scales past the last group: a 32-block starting below K
        # lies in group <= (K - 1) // group_size.
        w_mask = (byte < KB)[:, None] & mask_n[None, :]
        packed = tl.load(w_cols + byte[:, None] * stride_wk, mask=w_mask, other=0)
        k_lo = 2 * kb0 + col_lo
        # Every 32-column block lies inside one group (group sizes are multiples of 32), so a
        # block's 16 bytes share one scale and zero: load them per block ([BLOCK_K // 32,
        # BLOCK_N], a few hundred bytes) and broadcast. Loading them per byte instead made the
        # pipeliner stage full [BLOCK_K // 2, BLOCK_N] fp32 tiles in shared memory (120 KB per
        # block for per-channel fp32 scales, over sm_89's limit) and spill.
        blk = kb0 // 16 + offs_b
        s_off = s_cols + ((32 * blk) // group_size)[:, None] * stride_sg
        s_mask = (16 * blk < KB)[:, None] & mask_n[None, :]
        s = _per_byte(tl.load(scale_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32), BLOCK_K, BLOCK_N)
        if HAS_ZERO:
            z = _per_byte(tl.load(zero_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32), BLOCK_K, BLOCK_N)
        else:
            z = 8.0
        # Dequantized exactly as the reference does, in fp32: (u - zero) * scale.
        w_lo = ((packed & 0xF).to(tl.float32) - z) * s
        w_hi = ((packed >> 4).to(tl.float32) - z) * s
        # Zero-filled x beyond K: padding nibbles (code 0) dequantize to finite values, which
        # zeros cancel.
        x_lo = tl.load(x_rows + k_lo[None, :] * stride_xk, mask=mask_m[:, None] & (k_lo < K)[None, :], other=0.0)
        k_hi = k_lo + 16
        x_hi = tl.load(x_rows + k_hi[None, :] * stride_xk, mask=mask_m[:, None] & (k_hi < K)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x_lo, w_lo, acc, input_precision="ieee")
            acc = tl.dot(x_hi, w_hi, acc, input_precision="ieee")
        else:
            # The tensor-core operand is x's dtype: each weight is rounded once (RNE) to it.
            acc = tl.dot(x_lo, w_lo.to(x_ptr.dtype.element_ty), acc)
            acc = tl.dot(x_hi, w_hi.to(x_ptr.dtype.element_ty), acc)
    _store_with_bias(acc, c_ptr, bias_ptr, m0, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, stride_bias,
                     HAS_BIAS)


# One kernel, two tuning spaces: the fp32 (CUDA-core) dot needs far smaller tiles.
_int4_weight_only_mm_tc = autotune(
    weight_only_configs(), ["M", "N", "K"])(_int4_weight_only_mm_kernel)
_int4_weight_only_mm_fp32 = autotune(
    weight_only_fp32_configs(), ["M", "N", "K"])(_int4_weight_only_mm_kernel)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """packed_w as the kernel is compiled for it (byte-contiguous rows, 16-byte aligned; the
    row length ceil(K/32)*16 is a multiple of 16 already). Other views are copied."""
    if t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def int4_weight_only_mm(x, packed_w, scale, zero, group_size, bias=None):
    M, N = _checks.int4_weight_only_mm("int4_weight_only_mm", x, packed_w, scale, zero, group_size, bias)
    if _INTERPRETER_BF16_VIA_FP32 and x.dtype == torch.bfloat16:
        return int4_weight_only_mm(x.to(torch.float32), packed_w, scale, zero, group_size, bias).to(torch.bfloat16)
    K = x.shape[1]
    # Per channel (group_size == K) is one group of ceil(K/32)*32 columns: a multiple of 32
    # like every other group size, so the kernel's k // group_size is 0 on the whole row.
    gs = fmt.padded_k(K) if group_size == K else group_size
    x = _k_major(x, _padded_k(K))
    w = _aligned_rows(packed_w)
    # contiguous: scale and zero then share strides.
    scale = scale.contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale  # never read without HAS_ZERO
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg, stride_bias = _vector(bias) if bias is not None else (scale, 0)
    ieee = x.dtype == torch.float32
    kernel = _int4_weight_only_mm_fp32 if ieee else _int4_weight_only_mm_tc
    kernel[_gemm_grid(M, N)](
        x, w, c, scale, zero_arg, bias_arg,
        M, N, x.shape[1], w.shape[1], gs,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        scale.stride(0), scale.stride(1), stride_bias,
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, IEEE=ieee,
    )
    return c


# ============================================================================ cutlass_sm90 layout GEMM
def cutlass_sm90_configs():
    """fp16/bf16 x, tensor-core dot in T. BLOCK_K divides 64 (the layout's K tile,
    fmt.CUTLASS_SM90_K_TILE), which divides every allowed group size, so each K step lies in one
    group: one [BLOCK_N] row of scale and zero' per step, broadcast over the tile.

    The first three are for decode (M = 1..32, memory-bound: weight bytes in flight matter, so
    deep pipelines); the last two for prefill / large M, where the dequantize is paid once per
    BLOCK_M rows. 16x64 steps 32 deep: at 64, Triton 3.6's ptxas spills 8 B (fp16, bias)."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ]


@triton.jit
def _round_to(v, T: tl.constexpr):
    """fp32 v rounded to nearest even in T (fp16 or bf16), returned as fp32 (exact in T).

    bf16 rounds with integer ops on the fp32 bits (add half an ulp minus one, plus the kept
    lsb for ties-to-even; finite inputs): the interpreter's fp32 -> bf16 cast neither rounds
    ties to even nor carries into the exponent, and one code path is what the interpreter
    tests prove. fp16 casts are RNE everywhere (cvt.rn.f16.f32; numpy's astype)."""
    if T == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(T).to(tl.float32)


@triton.jit
def _int4_cutlass_sm90_mm_kernel(
    # pointers
    x_ptr, w_ptr, c_ptr, scale_ptr, zero_ptr, bias_ptr,
    # sizes: K = x's columns (a multiple of 32; the weight has K // 2 bytes per row);
    # group_size = columns per scale row (a multiple of 64: per channel is passed as K rounded up)
    M, N, K, group_size,
    # strides (scale and zero share theirs)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn, stride_sg, stride_sn, stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # T, the dtype every weight is rounded to, is the scale's (float16 or bfloat16). x is T too,
    # except under the interpreter for bf16, where the host widens x to fp32 (exactly) because
    # the interpreter's bf16 dot multiplies raw bit patterns.
    T: tl.constexpr = scale_ptr.dtype.element_ty
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_K // 2)
    mask_m = (m0 + offs_m) < M
    mask_n = offs_n < N
    x_rows = x_ptr + m0.to(tl.int64) * stride_xm + offs_m[:, None] * stride_xm
    # The weight tile is read as stored, [BLOCK_N, BLOCK_K // 2] bytes along K, straight from
    # the [N, K/2] layout (no host repacking).
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_cols = offs_n * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // 2 + offs_c
        packed = tl.load(w_rows + byte[None, :] * stride_wk, mask=mask_n[:, None] & (byte < K // 2)[None, :],
                         other=0)
        # One group per K step (BLOCK_K divides group_size); k0 < K, so the row exists.
        s_off = (k0 // group_size) * stride_sg + s_cols
        s = tl.load(scale_ptr + s_off, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        z = tl.load(zero_ptr + s_off, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        # Each nibble is the two's-complement q in [-8, 7]: its bits XOR 8 are q + 8.
        q_lo = ((packed & 0xF) ^ 8).to(tl.float32) - 8.0
        q_hi = ((packed >> 4) ^ 8).to(tl.float32) - 8.0
        # The spec (fmt.dequantize_cutlass_sm90) is T arithmetic: w = round_T(round_T(q s) + z').
        # It is computed in fp32 with an explicit rounding to T after each op, which gives the
        # same bits: q s is exact in fp32 (4-bit q, 11- or 8-bit significand of s), and the fp32
        # sum of two T values rounded again to T is the correctly rounded T sum (double rounding
        # is innocuous when the wider format has >= 2p + 2 bits: 24 >= 2*11 + 2). CUTLASS's
        # half_t arithmetic may fuse the two into one FMA; this kernel is launched without FP
        # contraction (CUTLASS_SM90_LAUNCH_OPTIONS), so it never does.
        w_lo = _round_to(_round_to(q_lo * s, T) + z, T)
        w_hi = _round_to(_round_to(q_hi * s, T) + z, T)
        # Byte j holds column 2j in its low nibble, 2j + 1 in its high one: interleaving the
        # two halves along K restores column order, [BLOCK_N, BLOCK_K], then [BLOCK_K, BLOCK_N].
        w = tl.trans(tl.interleave(w_lo, w_hi))
        k = k0 + offs_k
        # x beyond K reads as 0 (a partial last K step when K % 64 == 32); the weight there is
        # z', finite, so it adds nothing.
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            # w is exact in T, so this cast is exact: the tensor cores multiply the spec's weight.
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    _store_with_bias(acc, c_ptr, bias_ptr, m0, offs_m, offs_n, mask_m, mask_n, stride_cm, stride_cn, stride_bias,
                     HAS_BIAS)


# No floating-point contraction: Triton fuses a multiply and an add into an FMA by default, and
# LLVM narrows the fp32 ops above to fp16 ones (exact: see the kernel), so the fp16 dequantize
# compiled to one fma.rn.f16 (a single rounding of q s + z'), not the spec's two. The AOT
# compile (lowbit.backends.triton.aot) uses the same options, and tests/test_triton_int4_sm90.py
# checks its PTX for FMAs.
CUTLASS_SM90_LAUNCH_OPTIONS = {"enable_fp_fusion": False}

_int4_cutlass_sm90_mm = autotune(
    cutlass_sm90_configs(), ["M", "N", "K"])(_int4_cutlass_sm90_mm_kernel)


def int4_cutlass_sm90_mm(x, packed, scale, zero, group_size, bias=None):
    M, N = _checks.int4_cutlass_sm90_mm("int4_cutlass_sm90_mm", x, packed, scale, zero, group_size, bias)
    K = x.shape[1]
    out_dtype = x.dtype
    if _INTERPRETER_BF16_VIA_FP32 and x.dtype == torch.bfloat16:
        x = x.to(torch.float32)  # exact; scale and zero stay bf16 (T), the output narrows below
    # Per channel (group_size == K, any multiple of 32) is one group: K rounded up to the K
    # tile keeps k0 // group_size at 0 on the whole row, as every BLOCK_K divides 64.
    gs = -(-K // fmt.CUTLASS_SM90_K_TILE) * fmt.CUTLASS_SM90_K_TILE if group_size == K else group_size
    x = _k_major(x, K)  # K % 32 == 0: already a multiple of 16
    w = _aligned_rows(packed)  # rows of K/2 bytes, a multiple of 16
    # contiguous: scale and zero then share strides ([G, N], stride 1 along N).
    scale = scale.contiguous()
    zero = zero.contiguous()
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg, stride_bias = _vector(bias) if bias is not None else (scale, 0)
    _int4_cutlass_sm90_mm[_gemm_grid(M, N)](
        x, w, c, scale, zero, bias_arg,
        M, N, K, gs,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        scale.stride(0), scale.stride(1), stride_bias,
        HAS_BIAS=bias is not None, **CUTLASS_SM90_LAUNCH_OPTIONS,
    )
    return c.to(out_dtype)


KERNELS = {
    "int4_weight_only_mm": int4_weight_only_mm,
    "int4_cutlass_sm90_mm": int4_cutlass_sm90_mm,
}
