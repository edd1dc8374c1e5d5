"""The INT4 weight format, defined once: used by the quantizer, the kernels and Int4Linear.

Values
    Every weight is an unsigned nibble ``u`` in [0, 15], quantized group-wise along K:
    ``w ≈ (u - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``. Symmetric weights
    have no stored zero: their zero is 8 (``u = q + 8`` for a signed ``q`` in [-8, 7]).
    Group sizes: 32, 64, 128, or K (one group per output channel). The last group may be
    partial when K is not a multiple of the group size; its scale covers only real columns.

Packing (two nibbles per byte, blocks of 32 along K)
    ``packed`` is uint8 ``[N, Kp // 2]`` with ``Kp = ceil(K / 32) * 32``. In block ``b``
    (columns ``32b .. 32b+31``) byte ``16b + j`` holds column ``32b + j`` in its low nibble and
    column ``32b + 16 + j`` in its high nibble. Why: one 16-byte load, an AND and a shift
    give two vectors of 16 *consecutive* columns with no shuffle, on AVX2 and in Triton alike.
    Padding columns (``K <= k < Kp``) hold code 0; kernels treat them as absent (they never
    read activations beyond K, or multiply the padding by zeros), so padding cannot change a
    result.

Scales and zeros: ``[N, ceil(K / group_size)]`` in float32, float16 or bfloat16 (one dtype for
both). Kernels compute in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import INT4_GROUP_SIZES

PACK_BLOCK = 32
GROUP_SIZES = INT4_GROUP_SIZES
SYMMETRIC_ZERO = 8
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def padded_k(K: int) -> int:
    return math.ceil(K / PACK_BLOCK) * PACK_BLOCK


def num_groups(K: int, group_size: int) -> int:
    return math.ceil(K / group_size)


def valid_group_size(group_size: int, K: int) -> bool:
    return group_size in GROUP_SIZES or group_size == K


@dataclass
class Int4Weight:
    packed: torch.Tensor          # uint8 [N, padded_k(K) // 2]
    scale: torch.Tensor           # [N, G]
    zero: torch.Tensor | None     # [N, G], same dtype as scale; None = symmetric (zero 8)
    in_features: int              # K
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        n = self.packed.numel() + self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    def bits_per_weight(self) -> float:
        """Storage per real weight, including scales, zeros and padding."""
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15] -> packed uint8 [N, padded_k(K) // 2]."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"lowbit.formats.int4.pack: codes must be a 2-D uint8 tensor, got {codes.dtype} "
                         f"{list(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("lowbit.formats.int4.pack: codes must be in [0, 15]")
    N, K = codes.shape
    Kp = padded_k(K)
    padded = torch.zeros((N, Kp), dtype=torch.uint8, device=codes.device)
    padded[:, :K] = codes
    blocks = padded.view(N, Kp // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(N, Kp // 2).contiguous()


def unpack(packed: torch.Tensor, K: int) -> torch.Tensor:
    """packed uint8 [N, padded_k(K) // 2] -> codes uint8 [N, K]. Exact inverse of pack."""
    N = packed.shape[0]
    Kp = padded_k(K)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != Kp // 2:
        raise ValueError(f"lowbit.formats.int4.unpack: packed must be uint8 [N, {Kp // 2}] for K={K}, got "
                         f"{packed.dtype} {list(packed.shape)}")
    blocks = packed.view(N, Kp // PACK_BLOCK, 1, PACK_BLOCK // 2)
    codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(N, Kp)
    return codes[:, :K].contiguous()


def _expand_groups(t: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """[N, G] -> [N, K]: each group's value repeated over its columns."""
    return t.repeat_interleave(group_size, dim=1)[:, :K]


def dequantize(weight: Int4Weight) -> torch.Tensor:
    """float32 [N, K]: the weight the kernels multiply by (the reference path)."""
    K, gs = weight.in_features, weight.group_size
    codes = unpack(weight.packed, K).to(torch.float32)
    scale = _expand_groups(weight.scale.to(torch.float32), K, gs)
    zero = (torch.full_like(codes, SYMMETRIC_ZERO) if weight.zero is None
            else _expand_groups(weight.zero.to(torch.float32), K, gs))
    return (codes - zero) * scale


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [N, K] -> [N, G, group_size], the partial last group padded with NaN."""
    N, K = w.shape
    G = num_groups(K, group_size)
    padded = torch.full((N, G * group_size), float("nan"), dtype=torch.float32, device=w.device)
    padded[:, :K] = w
    return padded.view(N, G, group_size)


def _scales_for(groups: torch.Tensor, symmetric: bool, clip: torch.Tensor | float, scale_dtype):
    """Per-group (scale, zero) in float32, after rounding the scale (and zero) to scale_dtype."""
    if symmetric:
        amax = torch.nan_to_num(groups.abs(), nan=0.0).amax(dim=-1) * clip
        scale = amax / 7.0
        zero = None
    else:
        lo = torch.nan_to_num(groups, nan=0.0).amin(dim=-1).clamp(max=0.0) * clip
        hi = torch.nan_to_num(groups, nan=0.0).amax(dim=-1).clamp(min=0.0) * clip
        scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype).to(torch.float32)
    if not symmetric:
        zero = torch.clamp(torch.round(-lo / scale), 0, 15).to(scale_dtype).to(torch.float32)
    return scale, zero


def _codes_for(groups, scale, zero):
    z = SYMMETRIC_ZERO if zero is None else zero.unsqueeze(-1)
    return torch.clamp(torch.round(groups / scale.unsqueeze(-1)) + z, 0, 15)


def quantize_weight(
    w: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    clip_search: bool = False,
    clip_ratios: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(10)),
) -> Int4Weight:
    """Round-to-nearest group-wise int4 quantization of a [N, K] weight.

    With ``clip_search=True`` each group's range is shrunk by the ratio (from `clip_ratios`)
    that minimizes that group's squared reconstruction error: clipping a few outliers buys a
    finer grid for the rest, and the search never does worse than ratio 1.0 (RTN), which is
    always a candidate.
    """
    if w.dim() != 2:
        raise ValueError(f"lowbit.formats.int4.quantize_weight: w must be 2-D [N, K], got {list(w.shape)}")
    N, K = w.shape
    if not valid_group_size(group_size, K):
        raise ValueError(f"lowbit.formats.int4.quantize_weight: group_size must be one of {GROUP_SIZES} or "
                         f"K={K}, got {group_size}")
    scale_dtype = scale_dtype or (w.dtype if w.dtype in SCALE_DTYPES else torch.float32)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"lowbit.formats.int4.quantize_weight: scale_dtype must be float32, float16 or "
                         f"bfloat16, got {scale_dtype}")
    groups = _group_view(w.detach().to(torch.float32), group_size)
    valid = ~torch.isnan(groups)
    ratios = clip_ratios if clip_search else (1.0,)
    if 1.0 not in ratios:
        ratios = (1.0, *ratios)
    best = None
    for ratio in ratios:
        scale, zero = _scales_for(groups, symmetric, ratio, scale_dtype)
        codes = _codes_for(groups, scale, zero)
        z = SYMMETRIC_ZERO if zero is None else zero.unsqueeze(-1)
        err = torch.where(valid, ((codes - z) * scale.unsqueeze(-1) - groups) ** 2, 0.0).sum(-1)
        if best is None:
            best = [err, scale, zero, codes]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero is not None:
            best[2] = torch.where(better, zero, best[2])
        best[3] = torch.where(better.unsqueeze(-1), codes, best[3])
    _, scale, zero, codes = best
    codes = torch.nan_to_num(codes, nan=float(SYMMETRIC_ZERO)).reshape(N, -1)[:, :K].to(torch.uint8)
    return Int4Weight(
        packed=pack(codes),
        scale=scale.to(scale_dtype).contiguous(),
        zero=None if zero is None else zero.to(scale_dtype).contiguous(),
        in_features=K,
        group_size=group_size,
    )


# --------------------------------------------------------------------------- cutlass_sm90 layout
# The layout CUTLASS's sm_90 mixed-input GEMM reads (the collective behind CUTLASS example
# 55_hopper_mixed_dtype_gemm, `cute::tuple<int4b_t, T, T>` as operand A). It is an inference-time
# copy of an Int4Weight, made once by `to_cutlass_sm90` (or the op lowbit.int4_repack_cutlass_sm90),
# and read only by lowbit.int4_cutlass_sm90_mm. Unverified on a GPU (docs/gpu-pending.md).
#
#   packed  uint8 [N, K // 2], K-major, natural order: byte k // 2 of row n holds column k in
#           its low nibble when k is even and in its high nibble when k is odd. The nibble is the
#           *signed* 4-bit two's-complement q = u - 8 in [-8, 7] (cutlass::int4b_t), whose bit
#           pattern is u XOR 8.
#   scale   T [G, N] (T = float16 or bfloat16, the activations' dtype): scale[n, g] rounded to T,
#           transposed because CUTLASS wants scales MN-major (contiguous along N).
#   zero    T [G, N]: CUTLASS's zero mode computes scale * q + zero, so the stored zero is the
#           *offset* zero'[g, n] = round_T(scale_T[g, n] * (8 - zero[n, g])) (the product taken in
#           float32); symmetric weights have zero' = 0 exactly.
#
# The weight the kernel multiplies by (`dequantize_cutlass_sm90`, the spec of the op):
#     w[n, k] = round_T(round_T(q[n, k] * scale_T[g, n]) + zero'[g, n]),   g = k // group_size
# q * scale_T and the sum are each rounded to T (cutlass::half_t / bfloat16_t arithmetic); the
# device compiler may contract them into one fused multiply-add, i.e. round once: the GPU tests
# allow for that difference (tests/test_int4_sm90.py).
#
# Against the float32 weight (u - zero) * scale of `dequantize`, for integer zeros (which
# `quantize_weight` produces) and scales already in T, each weight is off by at most
#     (|q| + |8 - zero|) |s| u + |w| u   (+ O(u^2)),
# u = 2^-11 (float16) or 2^-8 (bfloat16), the unit roundoff: q*s rounds (u |q s|), zero' rounds
# (u |(8 - zero) s|) and the sum rounds (u |w|). A float32 scale first rounds to T, adding
# u |w| more. Symmetric weights (zero' = 0) only round q*s_T.
#
# Shapes CUTLASS takes (refused otherwise, before any launch): K % 32 == 0 (TMA reads whole
# 16-byte rows of int4), N % 8 == 0 (16-byte scale/zero rows and output rows), group_size 64, 128
# or K: groups must be whole multiples of the kernel's K tile of 64 (a group of 32 would need a
# scale change inside one tile, which the collective does not do).
CUTLASS_SM90_K_ALIGN = 32
CUTLASS_SM90_N_ALIGN = 8
CUTLASS_SM90_K_TILE = 64
CUTLASS_SM90_GROUP_SIZES = (64, 128)
CUTLASS_SM90_DTYPES = (torch.float16, torch.bfloat16)


def cutlass_sm90_group_ok(group_size: int, K: int) -> bool:
    return group_size == K or (group_size in CUTLASS_SM90_GROUP_SIZES and group_size % CUTLASS_SM90_K_TILE == 0)


def cutlass_sm90_offset_zero(scale_t: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """zero' = round_T(scale_T * (8 - zero)) in T, same shape as scale_t (already in T)."""
    if zero is None:
        return torch.zeros_like(scale_t, dtype=dtype)
    return (scale_t.to(torch.float32) * (SYMMETRIC_ZERO - zero.to(torch.float32))).to(dtype)


def to_cutlass_sm90(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                    K: int, dtype: torch.dtype):
    """lowbit int4 format -> (packed [N, K//2], scale [G, N], zero' [G, N]) in the cutlass_sm90 layout."""
    codes = unpack(packed, K)                                      # uint8 u in [0, 15]
    N = codes.shape[0]
    signed_bits = (codes ^ SYMMETRIC_ZERO).view(N, K // 2, 2)     # q = u - 8 as a two's-complement nibble
    packed_sm90 = (signed_bits[:, :, 0] | (signed_bits[:, :, 1] << 4)).contiguous()
    scale_t = scale.to(dtype)
    zero_t = cutlass_sm90_offset_zero(scale_t, zero, dtype)
    return packed_sm90, scale_t.t().contiguous(), zero_t.t().contiguous()


def signed_codes_cutlass_sm90(packed_sm90: torch.Tensor) -> torch.Tensor:
    """packed [N, K//2] -> int8 q [N, K] in [-8, 7]."""
    N = packed_sm90.shape[0]
    nib = torch.stack([packed_sm90 & 0x0F, packed_sm90 >> 4], dim=-1).reshape(N, -1)
    return nib.to(torch.int8) - ((nib >= 8).to(torch.int8) << 4)


def from_cutlass_sm90(packed_sm90: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor, symmetric: bool):
    """Inverse of `to_cutlass_sm90` -> (packed, scale [N, G] in T, zero [N, G] in T or None).

    Exact for the codes and for scales that were already in T. The zero is recovered as
    8 - round(zero' / scale): exact for integer zeros in [0, 15] (what `quantize_weight` makes),
    since zero' is off by at most 8|scale| u < |scale| / 2 before the division.
    """
    codes = (signed_codes_cutlass_sm90(packed_sm90).to(torch.int16) + SYMMETRIC_ZERO).to(torch.uint8)
    scale = scale_t.t().contiguous()
    if symmetric:
        return pack(codes), scale, None
    ratio = zero_t.t().to(torch.float32) / scale.to(torch.float32)
    zero = (SYMMETRIC_ZERO - torch.round(ratio)).to(scale.dtype).contiguous()
    return pack(codes), scale, zero


def dequantize_cutlass_sm90(packed_sm90: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """[N, K] in T: the weight the cutlass_sm90 kernel multiplies by (see the layout notes above)."""
    K = packed_sm90.shape[1] * 2
    dtype = scale_t.dtype
    q = signed_codes_cutlass_sm90(packed_sm90).to(dtype)
    s = scale_t.t().repeat_interleave(group_size, dim=1)[:, :K]
    z = zero_t.t().repeat_interleave(group_size, dim=1)[:, :K]
    return (q * s) + z   # each op in T: torch rounds q*s and the sum to T, as cutlass::half_t does
