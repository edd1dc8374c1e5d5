"""INT8 family, Triton kernels.

Semantics are those of :mod:`lowbit.backends.reference.int8`; the tests run every host function
below against it (in the interpreter on CPU, natively on a GPU). Layout of this file follows the
Triton matmul tutorial: each kernel has its autotune configs in a function beside it, kernel
arguments are grouped (pointers, sizes, strides, meta-parameters), and a host function named
like the op allocates the output and launches with ``grid = lambda META: ...``.

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`, which compiles
it for sm_80/sm_89/sm_90 with every config returned by these config functions.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from ... import _checks
from ..reference.int8 import int8_scale_from_amax

# Read at import because the interpreter, too, is chosen when triton.jit runs.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The interpreter stores bf16 as raw uint16 bits: tl.dot multiplies the bit patterns, and its
# fp32 -> bf16 cast truncates (or rounds ties away from zero) instead of rounding to nearest
# even. bf16 *loads* widened to fp32 are exact there. So under the interpreter, and only
# there, bf16 GEMM operands and outputs go through fp32 on the host (exact widening, torch's
# RNE narrowing, which is what the GPU's cvt.rn.bf16.f32 does); the kernels are unchanged.
_INTERPRETER_BF16_VIA_FP32 = INTERPRET


def _first_config_when_interpreted(configs, named_args, **kwargs):
    # Under the interpreter a launch is numpy per program instance: timing configs would take
    # minutes and measure numpy, so the first config runs (the tests cover the others directly).
    return configs[:1] if INTERPRET else configs


def _timing_by_driver(kernel_call, quantiles):
    # What triton.autotune does by default, but looked up at the first launch: Triton 3.2 asks
    # for the GPU driver when the autotuner is built, so merely importing a kernel failed on a
    # machine without a GPU.
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _no_timing(kernel_call, quantiles):
    # Interpreter: the configs are pruned to one, which Triton <= 3.6 still times through the
    # GPU driver (absent on CPU machines). Equal times keep the first config.
    return [0.0] * len(quantiles)


def _decorator_passes_do_bench() -> bool:
    # Triton 3.2's decorator accepts do_bench but does not pass it on to its Autotuner. Without
    # Triton's sources (a bytecode-only install) assume a current Triton, which passes it.
    try:
        return "do_bench=do_bench" in inspect.getsource(triton.runtime.autotuner.autotune)
    except (OSError, TypeError):
        return True


_DECORATOR_PASSES_DO_BENCH = _decorator_passes_do_bench()


def autotune(configs, key, prune=_first_config_when_interpreted):
    """triton.autotune with lowbit's config pruning and timing, for every lowbit kernel."""
    kwargs = {"prune_configs_by": {"early_config_prune": prune},
              "do_bench": _no_timing if INTERPRET else _timing_by_driver}
    if _DECORATOR_PASSES_DO_BENCH:
        return triton.autotune(configs=configs, key=key, **kwargs)
    from triton.runtime.autotuner import Autotuner

    return lambda fn: Autotuner(fn, fn.arg_names, configs, key, None, None, **kwargs)


def _config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# ============================================================================ quantize
def quantize_configs():
    # Memory-bound: one program per row, BLOCK_K elements per step. Small blocks for short
    # rows (little masking waste), large ones so long rows take few loop trips.
    return [
        _config(2, 1, BLOCK_K=256),
        _config(4, 1, BLOCK_K=1024),
        _config(8, 1, BLOCK_K=4096),
    ]


@autotune(quantize_configs(), ["K"])
@triton.jit
def _int8_quantize_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    K,
    # strides (stride_s == 0 broadcasts one scale to every row)
    stride_xr, stride_xk, stride_qr, stride_qk, stride_s,
    # meta-parameters
    DYNAMIC: tl.constexpr,  # compute the row's scale from its amax and store it, else load it
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    q_row = q_ptr + row * stride_qr
    offs = tl.arange(0, BLOCK_K)

    if DYNAMIC:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            x = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax_row = tl.max(amax, axis=0)
        # div_rn: plain `/` lowers to an approximate division on the GPU; the reference
        # divides in IEEE round-to-nearest.
        scale = tl.where(amax_row > 0, tl.math.div_rn(amax_row, 127.0), 1.0)
        tl.store(scale_ptr + row * stride_s, scale)
    else:
        scale = tl.load(scale_ptr + row * stride_s)

    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        mask = k < K
        x = tl.load(x_row + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, scale)
        # Clamping before rounding gives the same result as rounding first (the bounds are
        # integers and rounding is monotone) and keeps |y| < 2**23 for the rounding below.
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        # Round half to even, exactly, with floor only: libdevice.rint would do it on the GPU
        # but the interpreter has no libdevice, and one code path is what the tests prove.
        f = tl.floor(y)
        d = y - f  # exact: f and y are within one unit of each other and |y| < 2**23
        f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        r = tl.where((d > 0.5) | ((d == 0.5) & f_odd), f + 1.0, f)
        tl.store(q_row + k * stride_qk, r.to(tl.int8), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # A 1-D or 2-D x keeps its strides (no copy); higher ranks are flattened to rows, which
    # copies only when the leading dimensions cannot be merged into one stride.
    return x.reshape(-1, x.shape[-1])


def _launch_quantize(x2, q2, scale_buf, stride_s, dynamic):
    R, K = x2.shape
    grid = lambda META: (R,)  # noqa: E731
    _int8_quantize_kernel[grid](
        x2, q2, scale_buf,
        K,
        x2.stride(0), x2.stride(1), q2.stride(0), q2.stride(1), stride_s,
        DYNAMIC=dynamic,
    )


def int8_quantize_dynamic(x: torch.Tensor, per_row: bool = True):
    _checks.int8_quantize_dynamic("int8_quantize_dynamic", x, per_row)
    x2 = _rows(x)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    q2 = q.view(-1, x.shape[-1])
    if per_row:
        scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        _launch_quantize(x2, q2, scale, 1, True)
        return q, scale
    # One amax for the whole tensor: a per-row pass would need a grid-wide reduction first,
    # so the amax comes from torch and the scale from the reference's own formula.
    scale = int8_scale_from_amax(x.abs().amax().to(torch.float32))
    _launch_quantize(x2, q2, scale, 0, False)
    return q, scale


def int8_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _checks.int8_quantize_static("int8_quantize_static", x, scale)
    x2 = _rows(x)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if scale.numel() == 1:
        s, stride_s = scale.reshape(()), 0
    else:
        s = scale.reshape(-1)
        stride_s = s.stride(0)
    _launch_quantize(x2, q.view(-1, x.shape[-1]), s, stride_s, False)
    return q


# ============================================================================ GEMM
# Shared pieces of the three GEMM kernels: the tile order and the K loop.
@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order (the tutorial's "L2 cache optimisation"): GROUP_M row-tiles share each
    # column-tile of B while it is hot in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _dot_k_loop(a_ptr, b_ptr, m0, n0, M, N, K,
                stride_am, stride_ak, stride_bn, stride_bk,
                ACC_DTYPE: tl.constexpr, B_AS_A: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = A[m0:, :] @ B[n0:, :].T, with B stored [N, K] (nn.Linear)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit base offsets: m0 * stride_am can pass 2**31 on large activations; the offsets
    # inside a tile stay 32-bit.
    a_ptrs = a_ptr + m0.to(tl.int64) * stride_am + (offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak)
    # B^T tile [BLOCK_K, BLOCK_N] read straight from the [N, K] layout through its strides.
    b_ptrs = b_ptr + n0.to(tl.int64) * stride_bn + (offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)
    mask_m = (m0 + offs_m)[:, None] < M
    mask_n = (n0 + offs_n)[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        # Zero-filled K tail: zeros add nothing to the dot product.
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n, other=0)
        if B_AS_A:
            # int8 -> fp16/bf16/fp32 is exact, so the weight joins x's tensor-core dot.
            b = b.to(a.dtype)
        # out_dtype names the accumulator's type: Triton <= 3.6 asserts it equals acc's (its
        # default, fp32, fails for the int32 accumulator of int8 operands).
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def gemm_configs():
    # int8 tensor cores take k=32 per mma, so BLOCK_K >= 64 keeps each step busy. Small-M
    # tiles serve decode (M = 1..16); the others serve prefill. Measured by the AOT compile:
    # 128x256 tiles (either way round) spill on sm_80/sm_89 (255 registers + ~550 B of stack),
    # so the largest tile is 128x128x128 with 8 warps (242 registers on sm_80, no spill).
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _config(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
    ]


@autotune(gemm_configs(), ["M", "N", "K"])
@triton.jit
def _int8_mm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # sizes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # int32 accumulation is exact: the router caps K so that K * 128 * 128 < 2**31.
    acc = _dot_k_loop(a_ptr, b_ptr, m0, n0, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                      tl.int32, False, False, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotune(gemm_configs(), ["M", "N", "K"])
@triton.jit
def _int8_scaled_mm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides (stride_sa / stride_sb == 0 broadcast a scalar scale)
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sa, stride_sb, stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _dot_k_loop(a_ptr, b_ptr, m0, n0, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                      tl.int32, False, False, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    sa = tl.load(scale_a_ptr + offs_m * stride_sa, mask=mask_m, other=0.0)
    sb = tl.load(scale_b_ptr + offs_n * stride_sb, mask=mask_n, other=0.0)
    # Same order as the reference: (acc * scale_a) * scale_b, then bias, all in fp32.
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def weight_only_configs():
    """fp16/bf16 x: the dot runs on tensor cores (mma k=16)."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]


def weight_only_fp32_configs():
    """fp32 x: an IEEE fp32 dot has no tensor-core form, so it runs as FMAs on CUDA cores with
    both operand tiles in registers. The tensor-core tiles spill there (152 B to 6.4 KB of
    stack), so these keep BLOCK_K = 16 and at most 64x64 outputs per 4 warps."""
    return [
        _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
        _config(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
        _config(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
        _config(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
    ]


@triton.jit
def _int8_weight_only_mm_kernel(
    # pointers
    x_ptr, w_ptr, c_ptr, scale_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn, stride_s, stride_bias,
    # meta-parameters
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,  # IEEE: fp32 x, no TF32 rounding of x
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _dot_k_loop(x_ptr, w_ptr, m0, n0, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                      tl.float32, True, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # The per-channel scale factors out of the K sum, so it is applied once per output.
    s = tl.load(scale_ptr + offs_n * stride_s, mask=mask_n, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# One kernel, two tuning spaces: the fp32 (CUDA-core) dot needs far smaller tiles.
_int8_weight_only_mm_tc = autotune(
    weight_only_configs(), ["M", "N", "K"])(_int8_weight_only_mm_kernel)
_int8_weight_only_mm_fp32 = autotune(
    weight_only_fp32_configs(), ["M", "N", "K"])(_int8_weight_only_mm_kernel)


def _gemm_grid(M, N):
    return lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)


def _k_major(t: torch.Tensor, Kp: int) -> torch.Tensor:
    """t [rows, K] as the GEMM kernels are compiled for it (lowbit.backends.triton.aot):
    K-contiguous, 16-byte aligned, row stride and K multiples of 16.

    Anything else (transposed or sliced views, odd K) is copied into a zero-padded [rows, Kp]
    tensor: zeros add nothing to a dot product, while an unaligned int8 tile would be loaded
    byte by byte and spill (300 B to 4.5 KB of stack per thread in the AOT check)."""
    if t.shape[1] == Kp and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = torch.zeros((t.shape[0], Kp), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _padded_k(K: int) -> int:
    return (K + 15) // 16 * 16


def _vector(t: torch.Tensor):
    """(tensor, stride) for a per-row/column vector: stride 1, or stride 0 to broadcast a scalar."""
    if t.numel() == 1:
        return t.reshape(()), 0
    return t.contiguous(), 1


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    M, N = _checks.int8_mm("int8_mm", a, b)
    Kp = _padded_k(a.shape[1])
    a, b = _k_major(a, Kp), _k_major(b, Kp)
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    _int8_mm_kernel[_gemm_grid(M, N)](
        a, b, c,
        M, N, Kp,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
    )
    return c


def int8_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.int8_scaled_mm("int8_scaled_mm", a, b, scale_a, scale_b, bias, out_dtype)
    Kp = _padded_k(a.shape[1])
    a, b = _k_major(a, Kp), _k_major(b, Kp)
    store_dtype = out_dtype
    if _INTERPRETER_BF16_VIA_FP32 and out_dtype == torch.bfloat16:
        store_dtype = torch.float32
    c = torch.empty((M, N), dtype=store_dtype, device=a.device)
    sa, stride_sa = _vector(scale_a)
    sb, stride_sb = _vector(scale_b)
    # Without bias the kernel never reads bias_ptr (HAS_BIAS is a constexpr); any pointer will do.
    bias_arg, stride_bias = _vector(bias) if bias is not None else (sb, 0)
    _int8_scaled_mm_kernel[_gemm_grid(M, N)](
        a, b, c, sa, sb, bias_arg,
        M, N, Kp,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        stride_sa, stride_sb, stride_bias,
        HAS_BIAS=bias is not None,
    )
    return c.to(out_dtype)


def int8_weight_only_mm(x, w, scale, bias=None):
    M, N = _checks.int8_weight_only_mm("int8_weight_only_mm", x, w, scale, bias)
    if _INTERPRETER_BF16_VIA_FP32 and x.dtype == torch.bfloat16:
        return int8_weight_only_mm(x.to(torch.float32), w, scale, bias).to(torch.bfloat16)
    Kp = _padded_k(x.shape[1])
    x, w = _k_major(x, Kp), _k_major(w, Kp)
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    scale, stride_s = _vector(scale)
    bias_arg, stride_bias = _vector(bias) if bias is not None else (scale, 0)
    ieee = x.dtype == torch.float32
    kernel = _int8_weight_only_mm_fp32 if ieee else _int8_weight_only_mm_tc
    kernel[_gemm_grid(M, N)](
        x, w, c, scale, bias_arg,
        M, N, Kp,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        stride_s, stride_bias,
        HAS_BIAS=bias is not None, IEEE=ieee,
    )
    return c


KERNELS = {
    "int8_quantize_dynamic": int8_quantize_dynamic,
    "int8_quantize_static": int8_quantize_static,
    "int8_mm": int8_mm,
    "int8_scaled_mm": int8_scaled_mm,
    "int8_weight_only_mm": int8_weight_only_mm,
}
