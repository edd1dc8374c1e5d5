"""Binary (XNOR-popcount) family, Triton kernels (spec: lowbit/backends/reference/binary.py).

There is no 1-bit ``tl.dot``, so the GEMM is integer work on CUDA cores: a [BLOCK_M, BLOCK_N,
BLOCK_W] broadcast of ``a XOR b`` over BLOCK_W words, a popcount, and a sum over the words.
The popcount is ``libdevice.popc`` (one ``popc.b32``) when compiled for a GPU and the classic
SWAR bit trick in plain tl ops under TRITON_INTERPRET (the interpreter has no libdevice); both
count the same bits. The last word of a row is masked (padding bits never count).

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from .int8 import INTERPRET, autotune, _config

if not INTERPRET:
    from triton.language.extra import libdevice
else:  # pragma: no cover - the interpreter never calls it (USE_POPC is False there)
    libdevice = None


@triton.jit
def _popcount32(v, USE_POPC: tl.constexpr):
    """Set bits of each uint32 element, as int32."""
    if USE_POPC:
        return libdevice.popc(v.to(tl.int32, bitcast=True))
    # SWAR: 2-, 4-, 8-bit partial counts, then the byte sum via a multiply (logical shifts: uint32).
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _real_bits(w, K):
    """Mask of the bits of word index w (int32 tensor) that lie inside K, as uint32."""
    real = K - w * 32
    shift = tl.minimum(tl.maximum(real, 0), 31).to(tl.uint32)
    partial = (tl.full(w.shape, 1, tl.uint32) << shift) - 1
    return tl.where(real >= 32, tl.full(w.shape, 0xFFFFFFFF, tl.uint32), partial)


# ============================================================================ GEMM
def gemm_configs():
    # The [BLOCK_M, BLOCK_N, BLOCK_W] xor/popc tile lives in registers: 2048-4096 words per program.
    return [
        _config(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_W=4),
        _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_W=4),
        _config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_W=2),
    ]


@autotune(gemm_configs(), ["M", "N", "W"])
@triton.jit
def _binary_mm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, bias_ptr,
    # sizes
    M, N, K, W,
    # strides (a scale stride of 0 broadcasts a scalar scale)
    stride_am, stride_aw, stride_bn, stride_bw, stride_cm, stride_cn, stride_sa, stride_sb, stride_bias,
    # meta-parameters
    SCALED: tl.constexpr,  # False: int32 dot products; True: dot * scale_a * scale_b (+ bias)
    HAS_BIAS: tl.constexpr,
    USE_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_W)
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + rn[:, None].to(tl.int64) * stride_bn
    count = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + rw
        real = _real_bits(w, K)
        a = tl.load(a_rows + w[None, :] * stride_aw, mask=(rm[:, None] < M) & (w[None, :] < W), other=0)
        b = tl.load(b_rows + w[None, :] * stride_bw, mask=(rn[:, None] < N) & (w[None, :] < W), other=0)
        a = a.to(tl.uint32, bitcast=True) & real[None, :]
        b = b.to(tl.uint32, bitcast=True) & real[None, :]
        x = a[:, None, :] ^ b[None, :, :]
        count += tl.sum(_popcount32(x, USE_POPC), axis=2)
    dot = K - 2 * count
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SCALED:
        sa = tl.load(scale_a_ptr + rm * stride_sa, mask=rm < M, other=0.0)
        sb = tl.load(scale_b_ptr + rn * stride_sb, mask=rn < N, other=0.0)
        # The reference's order: float(dot) * scale_a, then * scale_b, then + bias.
        y = dot.to(tl.float32) * sa[:, None]
        y = y * sb[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn * stride_bias, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, dot, mask=c_mask)


def _launch_gemm(a, b, K, out, scale_a=None, scale_b=None, bias=None):
    M, N, W = a.shape[0], b.shape[0], a.shape[1]
    scaled = scale_a is not None
    dummy = out  # never read when SCALED / HAS_BIAS is False
    sa = scale_a.reshape(-1) if scaled else dummy
    sb = scale_b.reshape(-1) if scaled else dummy
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"]))  # noqa: E731
    _binary_mm_kernel[grid](
        a, b, out, sa, sb, bias if bias is not None else dummy,
        M, N, K, W,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        (sa.stride(0) if sa.numel() > 1 else 0) if scaled else 0,
        (sb.stride(0) if sb.numel() > 1 else 0) if scaled else 0,
        bias.stride(0) if bias is not None else 0,
        SCALED=scaled, HAS_BIAS=bias is not None, USE_POPC=not INTERPRET,
    )
    return out


def binary_mm(a, b, K):
    M, N = _checks.binary_mm("binary_mm", a, b, K)
    out = torch.empty((M, N), dtype=torch.int32, device=a.device)
    return _launch_gemm(a, b, K, out)


def binary_scaled_mm(a, b, K, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.binary_scaled_mm("binary_scaled_mm", a, b, K, scale_a, scale_b, bias, out_dtype)
    # The interpreter narrows fp32 -> bf16 by truncation; there (only) the kernel writes fp32 and
    # torch rounds to nearest even, which is what the GPU's cvt.rn does.
    via_fp32 = INTERPRET and out_dtype == torch.bfloat16
    out = torch.empty((M, N), dtype=torch.float32 if via_fp32 else out_dtype, device=a.device)
    _launch_gemm(a, b, K, out, scale_a, scale_b, bias)
    return out.to(out_dtype) if via_fp32 else out


# ============================================================================ quantize
def quantize_configs():
    return [
        _config(1, 1, BLOCK_W=4),
        _config(4, 1, BLOCK_W=32),
    ]


@autotune(quantize_configs(), ["K"])
@triton.jit
def _binary_quantize_kernel(
    # pointers
    x_ptr, packed_ptr, scale_ptr,
    # sizes
    K, W,
    # strides
    stride_xm, stride_xk, stride_pm,
    # meta-parameters
    BLOCK_W: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    rw = tl.arange(0, BLOCK_W)
    rb = tl.arange(0, 32)
    total = tl.zeros((BLOCK_W, 32), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        w = w0 + rw
        k = w[:, None] * 32 + rb[None, :]
        valid = k < K
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=valid, other=0.0).to(tl.float32)
        # 1 = +1: not (x < 0), so 0, -0.0 and NaN are +1; columns past K are 0 bits.
        bit = tl.where(valid & (x >= 0) | (valid & (x != x)), 1, 0)
        # Distinct powers of two: the int32 sum is the OR (bit 31 wraps to the sign, as stored).
        word = tl.sum(bit << rb[None, :], axis=1)
        tl.store(packed_ptr + row * stride_pm + w, word, mask=w < W)
        total += tl.abs(x)
    tl.store(scale_ptr + row, tl.sum(tl.sum(total, axis=1), axis=0) / K)


def binary_quantize(x):
    M, W = _checks.binary_quantize("binary_quantize", x)
    K = x.shape[1]
    packed = torch.empty((M, W), dtype=torch.int32, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    _binary_quantize_kernel[(M,)](x, packed, scale, K, W, x.stride(0), x.stride(1), packed.stride(0))
    return packed, scale


KERNELS = {
    "binary_quantize": binary_quantize,
    "binary_mm": binary_mm,
    "binary_scaled_mm": binary_scaled_mm,
}
