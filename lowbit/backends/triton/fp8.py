"""FP8 family (E4M3FN, E5M2), Triton kernels.

Semantics are those of :mod:`lowbit.backends.reference.fp8`; tests/test_triton_fp8.py runs every
host function below against it (in the interpreter on CPU, natively on a GPU). Layout as in
:mod:`.int8`: autotune configs in a function beside each kernel, grouped kernel arguments, a host
function named like the op.

What needs which chip:

* quantize: fp32 -> fp8 is integer bit arithmetic on the fp32 pattern and the codes are stored
  as bytes, so no fp8 type reaches the compiler: runs on sm_80.
* fp8_weight_only_mm: the weight is loaded as bytes and decoded with integer arithmetic to x's
  dtype (exact: both formats fit in fp16 and bf16), so the dot is an fp16/bf16/fp32 one: sm_80.
* fp8_scaled_mm: tl.dot on fp8 operands (mma on sm_89, wgmma on sm_90). Triton refuses fp8e4nv
  below sm_89, hence ``MIN_CAPABILITY`` and ``refused=(80,)`` in the AOT list.

Every kernel here is listed in :data:`lowbit.backends.triton.aot.AOT_KERNELS`, which compiles
it for sm_80/sm_89/sm_90 with every config returned by these config functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from ..reference.fp8 import fp8_scale_from_amax  # IEEE division on every device, as div_rn
from .int8 import (INTERPRET, _INTERPRETER_BF16_VIA_FP32, autotune, _config, _gemm_grid, _k_major, _padded_k,
                   _rows, _tile_offsets, _vector)

FP8_BLOCK = _checks.FP8_BLOCK

# fp8 tensor cores exist from sm_89 (Ada) on; Triton refuses fp8e4nv operands below that.
MIN_CAPABILITY = {"fp8_scaled_mm": (8, 9)}

# On sm_90 an fp8 wgmma adds its products into the accumulator with reduced precision (the
# DeepSeek-V3 report measured about 14 bits on H800), and Triton's default there never leaves
# the tensor core (max_num_imprecise_acc = 2**30). The op promises fp32 accumulation, so every
# 32 products (one mma k-step) the partial sum is added into a CUDA-core fp32 accumulator. Triton
# applies the option to sm_90 fp8 dots only; the interpreter ignores it. Unverified on a GPU:
# the cost of the promotion and whether 32 is enough for the (K + 4) * eps32 bound.
_PROMOTE_EVERY = tl.constexpr(32)


# ============================================================================ encode / decode
@triton.jit
def _encode_fp8(v, E5M2: tl.constexpr, SATURATE: tl.constexpr):
    """float32 -> fp8 code (int32 in [0, 255]): round to nearest even, subnormals included,
    lowbit's overflow policy (lowbit.backends.reference.fp8).

    Integer arithmetic on the fp32 bit pattern rather than ``v.to(tl.float8e4nv)``: the
    interpreter's cast is not round-to-nearest-even (86 of 380 e4m3 ties and near-ties came out
    differently from torch), the GPU's cvt has its own overflow rule, and no fp8 type may reach
    the compiler on sm_80. This gives the same bits in the interpreter and on every chip."""
    if E5M2:
        MBITS: tl.constexpr = 2
        BIAS: tl.constexpr = 15
        FMAX_BITS: tl.constexpr = 0x47600000  # 57344.0
        OVER_BITS: tl.constexpr = 0x47700000  # 61440.0: |v| >= it rounds past fmax
        MAX_CODE: tl.constexpr = 0x7B
        OVER_CODE: tl.constexpr = 0x7C  # +inf
        OVER_FROM: tl.constexpr = 0
    else:
        MBITS: tl.constexpr = 3
        BIAS: tl.constexpr = 7
        FMAX_BITS: tl.constexpr = 0x43E00000  # 448.0
        OVER_BITS: tl.constexpr = 0x43E80000  # 464.0: |v| > it rounds past fmax (464 ties down to 448)
        MAX_CODE: tl.constexpr = 0x7E
        OVER_CODE: tl.constexpr = 0x7F  # NaN: e4m3fn has no inf
        OVER_FROM: tl.constexpr = 1
    SHIFT: tl.constexpr = 23 - MBITS
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    # Clamped to +inf so that the rounding increments below cannot overflow int32 on NaNs.
    a = tl.minimum(bits & 0x7FFFFFFF, 0x7F800000)
    e = a >> 23
    # Normal in the format: drop SHIFT mantissa bits, round half to even (the carry may move
    # the exponent up, which is right), then rebias the exponent from 127 to BIAS.
    r = (a + ((1 << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT
    code_normal = r - ((127 - BIAS) << MBITS)
    # Subnormal in the format: the value is m * 2**(e - 150) (fp32 subnormals: e = 1 without
    # the implicit bit) and the format's unit is 2**(1 - BIAS - MBITS), so the code is m shifted
    # right by s with the same rounding. s >= 25 always rounds to 0 (m < 2**24 is below half).
    m = tl.where(e > 0, (a & 0x7FFFFF) | 0x800000, a)
    s = tl.minimum(151 - BIAS - MBITS - tl.maximum(e, 1), 25)
    code_sub = (m + ((1 << (s - 1)) - 1) + ((m >> s) & 1)) >> s
    code = tl.where(e >= 128 - BIAS, code_normal, code_sub)
    if SATURATE:
        code = tl.where(a > FMAX_BITS, MAX_CODE, code)  # +-inf included
    else:
        code = tl.where(a >= OVER_BITS + OVER_FROM, OVER_CODE, code)  # e4m3: > 464, e5m2: >= 61440
    code = tl.where(is_nan, 0x7F, code)  # NaN stays NaN, with v's sign
    return code | sign


@triton.jit
def _decode_fp8(c, E5M2: tl.constexpr):
    """fp8 code (uint8) -> float32, exactly, with torch's NaN payloads (the code's mantissa
    shifted into the fp32 one, quiet bit set, as torch's float8 -> float32 conversion gives)."""
    if E5M2:
        MBITS: tl.constexpr = 2
        BIAS: tl.constexpr = 15
    else:
        MBITS: tl.constexpr = 3
        BIAS: tl.constexpr = 7
    c = c.to(tl.int32)
    em = c & 0x7F
    exp = em >> MBITS
    normal = ((em + ((127 - BIAS) << MBITS)) << (23 - MBITS)).to(tl.float32, bitcast=True)
    # Subnormal codes are multiples of the format's unit 2**(1 - BIAS - MBITS): exact in fp32.
    sub = em.to(tl.float32) * (2.0 ** (1 - BIAS - MBITS))
    mag = tl.where(exp == 0, sub, normal).to(tl.int32, bitcast=True)
    if E5M2:
        special = exp == 31  # inf (mantissa 0) and NaNs
    else:
        special = em == 0x7F  # the only NaN; e4m3fn has no inf
    # NaNs come out quiet (bit 22 set), as a conversion through fp16 or fp32 gives.
    mant = (em & ((1 << MBITS) - 1)) << (23 - MBITS)
    mag = tl.where(special, tl.where(mant == 0, 0x7F800000, 0x7FC00000 | mant), mag)
    return (mag | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)


# ============================================================================ quantize
def quantize_configs():
    # Memory-bound: one program per scale group (a row, or 128 columns of one), BLOCK_K
    # elements per step. 128 serves 128-wide block groups; the larger ones long rows.
    return [
        _config(1, 1, BLOCK_K=128),
        _config(4, 1, BLOCK_K=1024),
        _config(8, 1, BLOCK_K=4096),
    ]


def _prune_quantize(configs, named_args, **kwargs):
    # A step wider than the group only masks lanes off (a 128-wide block group with
    # BLOCK_K = 4096 would idle 97% of them). Under the interpreter, the first config that fits
    # (see int8._first_config_when_interpreted).
    limit = max(128, triton.next_power_of_2(int(named_args["GROUP_K"])))
    fit = [c for c in configs if c.kwargs["BLOCK_K"] <= limit] or configs[:1]
    return fit[:1] if INTERPRET else fit


@autotune(quantize_configs(), ["GROUP_K"], _prune_quantize)
@triton.jit
def _fp8_quantize_kernel(
    # pointers (q_ptr: the fp8 output seen as bytes)
    x_ptr, q_ptr, scale_ptr,
    # sizes: program (r, g) quantizes row r, columns [g * GROUP_K, (g + 1) * GROUP_K) with the
    # scale at (r // ROWS_PER_SCALE, g)
    K, GROUP_K, ROWS_PER_SCALE,
    # strides (0 broadcasts one scale)
    stride_xr, stride_xk, stride_qr, stride_qk, stride_sr, stride_sg,
    # meta-parameters
    DYNAMIC: tl.constexpr,  # compute the group's scale from its amax and store it, else load it
    E5M2: tl.constexpr, SATURATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    x_row = x_ptr + row * stride_xr
    q_row = q_ptr + row * stride_qr
    s_ptr = scale_ptr + (row // ROWS_PER_SCALE) * stride_sr + g * stride_sg
    k_start = g * GROUP_K
    k_end = tl.minimum(k_start + GROUP_K, K)
    offs = tl.arange(0, BLOCK_K)

    if DYNAMIC:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs
            x = tl.abs(tl.load(x_row + k * stride_xk, mask=k < k_end, other=0.0).to(tl.float32))
            # Finite values only (NaN compares false): one inf must not zero its whole group.
            amax = tl.maximum(amax, tl.where(x < float("inf"), x, 0.0))
        if E5M2:
            scale = tl.math.div_rn(tl.max(amax, axis=0), 57344.0)
        else:
            scale = tl.math.div_rn(tl.max(amax, axis=0), 448.0)
        # Tested on the quotient, as the reference does: a subnormal amax can underflow to 0.
        scale = tl.where(scale > 0, scale, 1.0)
        tl.store(s_ptr, scale)
    else:
        scale = tl.load(s_ptr)

    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs
        mask = k < k_end
        x = tl.load(x_row + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        # div_rn: `/` lowers to an approximate division on the GPU; the reference's is IEEE.
        code = _encode_fp8(tl.math.div_rn(x, scale), E5M2, SATURATE)
        tl.store(q_row + k * stride_qk, code.to(tl.uint8), mask=mask)


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    a = x.to(torch.float32).abs()
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a))


def _launch_quantize(x2, q_bytes, scale, stride_sr, stride_sg, group_k, rows_per_scale, dynamic, format, saturate):
    R, K = x2.shape
    groups = triton.cdiv(K, group_k)
    grid = lambda META: (R, groups)  # noqa: E731
    _fp8_quantize_kernel[grid](
        x2, q_bytes, scale,
        K, group_k, rows_per_scale,
        x2.stride(0), x2.stride(1), q_bytes.stride(0), q_bytes.stride(1), stride_sr, stride_sg,
        DYNAMIC=dynamic, E5M2=format == "e5m2", SATURATE=saturate,
    )


def fp8_quantize_dynamic(x: torch.Tensor, format: str = "e4m3", granularity: str = "row", saturate: bool = True):
    _checks.fp8_quantize_dynamic("fp8_quantize_dynamic", x, format, granularity, saturate)
    x2 = _rows(x)
    R, K = x2.shape
    kb = triton.cdiv(K, FP8_BLOCK)
    q = torch.empty(x.shape, dtype=_checks.FP8_FORMATS[format], device=x.device)
    q_bytes = q.view(torch.uint8).view(R, K)
    if granularity == "row":
        scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        _launch_quantize(x2, q_bytes, scale, 1, 0, K, 1, True, format, saturate)
    elif granularity == "block1x128":
        scale = torch.empty((*x.shape[:-1], kb), dtype=torch.float32, device=x.device)
        _launch_quantize(x2, q_bytes, scale, kb, 1, FP8_BLOCK, 1, True, format, saturate)
    elif granularity == "tensor":
        # A whole-tensor (or 128-row) amax would need a reduction across programs first: it
        # comes from torch (max is exact, so the bits equal the kernel's), the codes from the
        # kernel.
        scale = fp8_scale_from_amax(_finite_amax(x).amax(), format)
        _launch_quantize(x2, q_bytes, scale, 0, 0, K, 1, False, format, saturate)
    else:  # block128x128, x is 2-D
        rb = triton.cdiv(R, FP8_BLOCK)
        a = torch.zeros((rb * FP8_BLOCK, kb * FP8_BLOCK), dtype=torch.float32, device=x.device)
        a[:R, :K] = _finite_amax(x)
        amax = a.view(rb, FP8_BLOCK, kb, FP8_BLOCK).amax(dim=(1, 3))
        scale = fp8_scale_from_amax(amax, format)
        _launch_quantize(x2, q_bytes, scale, kb, 1, FP8_BLOCK, FP8_BLOCK, False, format, saturate)
    return q, scale


def fp8_quantize_static(x: torch.Tensor, scale: torch.Tensor, format: str = "e4m3", saturate: bool = True):
    _checks.fp8_quantize_static("fp8_quantize_static", x, scale, format, saturate)
    x2 = _rows(x)
    R, K = x2.shape
    q = torch.empty(x.shape, dtype=_checks.FP8_FORMATS[format], device=x.device)
    q_bytes = q.view(torch.uint8).view(R, K)
    if scale.numel() == 1 and scale.dim() <= 1:
        _launch_quantize(x2, q_bytes, scale.reshape(()), 0, 0, K, 1, False, format, saturate)
    elif list(scale.shape) == list(x.shape[:-1]):
        s = scale.reshape(-1)
        _launch_quantize(x2, q_bytes, s, s.stride(0), 0, K, 1, False, format, saturate)
    else:  # per 1x128 block: [*x.shape[:-1], ceil(K/128)]
        s = scale.reshape(R, -1)
        _launch_quantize(x2, q_bytes, s, s.stride(0), s.stride(1), FP8_BLOCK, 1, False, format, saturate)
    return q


# ============================================================================ GEMM
@triton.jit
def _fp8_k_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, m0, n0, M, N, K,
                stride_am, stride_ak, stride_bn, stride_bk, stride_sam, stride_sak, stride_sbn, stride_sbk,
                BLOCK_SCALES: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 acc[BLOCK_M, BLOCK_N] = A[m0:, :] @ B[n0:, :].T on fp8 tensor cores (B stored [N, K],
    nn.Linear).

    With block scales, each BLOCK_K step (BLOCK_K divides 128, so a step lies in one scale
    block) is a partial dot scaled by scale_a[m, k // 128] * scale_b[n // 128, k // 128]
    and added in fp32."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + m0.to(tl.int64) * stride_am + (offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + n0.to(tl.int64) * stride_bn + (offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn)
    mask_m = (m0 + offs_m) < M
    mask_n = (n0 + offs_n) < N
    sa_ptrs = sa_ptr + (m0 + offs_m) * stride_sam
    sb_ptrs = sb_ptr + ((n0 + offs_n) // 128) * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Zero-filled K tail: zeros add nothing to the dot product. (`other` is a float: the
        # interpreter cannot cast an int 0 to fp8.)
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        part = tl.dot(a, b, max_num_imprecise_acc=_PROMOTE_EVERY)
        if BLOCK_SCALES:
            kb = k0 // 128
            sa = tl.load(sa_ptrs + kb * stride_sak, mask=mask_m, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sbk, mask=mask_n, other=0.0)
            acc += part * (sa[:, None] * sb[None, :])
        else:
            acc += part
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def scaled_mm_configs():
    # fp8 tensor cores take k=32 per mma; BLOCK_K must divide 128 (one scale block per step).
    # Small-M tiles serve decode, the others prefill. Measured by the AOT compile: with the
    # fp32 promotion (_PROMOTE_EVERY) a tile holds two fp32 accumulators, so 64x128x128 with 4
    # warps spills on sm_90 (72-80 B of stack at 255 registers) and 128x128x64 with 8 warps
    # spills with block scales on sm_90 (48 B); 8 warps on 64x128 and 128x64 tiles do not
    # (130-194 registers).
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
    ]


@autotune(scaled_mm_configs(), ["M", "N", "K"])
@triton.jit
def _fp8_scaled_mm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides (vector scales: stride_sak = stride_sbk = 0, and 0 for a broadcast scalar too)
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_sam, stride_sak, stride_sbn, stride_sbk, stride_bias,
    # meta-parameters
    BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _fp8_k_loop(a_ptr, b_ptr, scale_a_ptr, scale_b_ptr, m0, n0, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_sam, stride_sak, stride_sbn, stride_sbk,
                      BLOCK_SCALES, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    y = acc
    if not BLOCK_SCALES:
        sa = tl.load(scale_a_ptr + offs_m * stride_sam, mask=mask_m, other=0.0)
        sb = tl.load(scale_b_ptr + offs_n * stride_sbn, mask=mask_n, other=0.0)
        # Same order as the reference: (acc * scale_a) * scale_b, then bias, all in fp32.
        y = y * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def weight_only_configs():
    """fp16/bf16 x: the dot runs on fp16/bf16 tensor cores (mma k=16) after the byte decode
    (integer ops on every weight of the [BLOCK_K, BLOCK_N] tile, once per BLOCK_M rows)."""
    return [
        _config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
        _config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ]


def weight_only_fp32_configs():
    """fp32 x: IEEE fp32 dot as FMAs on CUDA cores with both tiles in registers: small tiles
    (int8.weight_only_fp32_configs measured the same limits)."""
    return [
        _config(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
        _config(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
    ]


@triton.jit
def _fp8_weight_only_mm_kernel(
    # pointers (w_ptr: the fp8 weight seen as bytes)
    x_ptr, w_ptr, c_ptr, scale_ptr, bias_ptr,
    # sizes
    M, N, K,
    # strides (per-channel scale: stride_sk = 0; a scalar: both 0)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn, stride_sn, stride_sk, stride_bias,
    # meta-parameters
    E5M2: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,  # IEEE: fp32 x, no TF32 rounding of x
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    m0, n0 = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = m0 + rm
    offs_n = n0 + rn
    mask_m = offs_m < M
    mask_n = offs_n < N
    # 64-bit base offsets, 32-bit offsets inside the tile (as int8._dot_k_loop).
    x_ptrs = x_ptr + m0.to(tl.int64) * stride_xm + (rm[:, None] * stride_xm + offs_k[None, :] * stride_xk)
    # Weight tile read transposed ([BLOCK_K, BLOCK_N] bytes) straight from the [N, K] layout.
    w_ptrs = w_ptr + n0.to(tl.int64) * stride_wn + (offs_k[:, None] * stride_wk + rn[None, :] * stride_wn)
    s_ptrs = scale_ptr + (offs_n // 128) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # Zero-filled K tail: code 0 decodes to 0.0.
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        w = _decode_fp8(tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0), E5M2)
        # Exact: every fp8 value is an fp16, a bf16 and an fp32 value, so the tensor-core operand
        # is the weight itself and only the fp32 accumulation rounds.
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE:
            part = tl.dot(x, w, input_precision="ieee")
        else:
            part = tl.dot(x, w)
        if BLOCK_SCALES:
            # A 128x128 block scale: each BLOCK_K step (BLOCK_K divides 128) lies in one block.
            acc += part * tl.load(s_ptrs + (k0 // 128) * stride_sk, mask=mask_n, other=0.0)[None, :]
        else:
            acc += part
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    y = acc
    if not BLOCK_SCALES:
        # A per-channel scale factors out of the K sum: applied once per output.
        y = y * tl.load(scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# One kernel, two tuning spaces: the fp32 (CUDA-core) dot needs far smaller tiles.
_fp8_weight_only_mm_tc = autotune(
    weight_only_configs(), ["M", "N", "K"])(_fp8_weight_only_mm_kernel)
_fp8_weight_only_mm_fp32 = autotune(
    weight_only_fp32_configs(), ["M", "N", "K"])(_fp8_weight_only_mm_kernel)


def _gemm_scales(scale: torch.Tensor, block: bool):
    """(tensor, stride along M or N, stride along K blocks) for a GEMM scale."""
    if block:
        s = scale.contiguous()
        return s, s.stride(0), s.stride(1)
    s, stride = _vector(scale)
    return s, stride, 0


def fp8_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.fp8_scaled_mm("fp8_scaled_mm", a, b, scale_a, scale_b, bias, out_dtype)
    Kp = _padded_k(a.shape[1])
    a, b = _k_major(a, Kp), _k_major(b, Kp)
    store_dtype = out_dtype
    if _INTERPRETER_BF16_VIA_FP32 and out_dtype == torch.bfloat16:
        store_dtype = torch.float32
    c = torch.empty((M, N), dtype=store_dtype, device=a.device)
    block = scale_a.dim() == 2
    sa, stride_sam, stride_sak = _gemm_scales(scale_a, block)
    sb, stride_sbn, stride_sbk = _gemm_scales(scale_b, block)
    # Without bias the kernel never reads bias_ptr (HAS_BIAS is a constexpr); any pointer will do.
    bias_arg, stride_bias = _vector(bias) if bias is not None else (sb, 0)
    _fp8_scaled_mm_kernel[_gemm_grid(M, N)](
        a, b, c, sa, sb, bias_arg,
        M, N, Kp,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        stride_sam, stride_sak, stride_sbn, stride_sbk, stride_bias,
        BLOCK_SCALES=block, HAS_BIAS=bias is not None,
    )
    return c.to(out_dtype)


def fp8_weight_only_mm(x, w, scale, bias=None):
    M, N = _checks.fp8_weight_only_mm("fp8_weight_only_mm", x, w, scale, bias)
    if _INTERPRETER_BF16_VIA_FP32 and x.dtype == torch.bfloat16:
        return fp8_weight_only_mm(x.to(torch.float32), w, scale, bias).to(torch.bfloat16)
    e5m2 = w.dtype == torch.float8_e5m2
    Kp = _padded_k(x.shape[1])
    x, w = _k_major(x, Kp), _k_major(w, Kp).view(torch.uint8)
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block = scale.dim() == 2
    s, stride_sn, stride_sk = _gemm_scales(scale, block)
    bias_arg, stride_bias = _vector(bias) if bias is not None else (s, 0)
    ieee = x.dtype == torch.float32
    kernel = _fp8_weight_only_mm_fp32 if ieee else _fp8_weight_only_mm_tc
    kernel[_gemm_grid(M, N)](
        x, w, c, s, bias_arg,
        M, N, Kp,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        stride_sn, stride_sk, stride_bias,
        E5M2=e5m2, BLOCK_SCALES=block, HAS_BIAS=bias is not None, IEEE=ieee,
    )
    return c


KERNELS = {
    "fp8_quantize_dynamic": fp8_quantize_dynamic,
    "fp8_quantize_static": fp8_quantize_static,
    "fp8_scaled_mm": fp8_scaled_mm,
    "fp8_weight_only_mm": fp8_weight_only_mm,
}
