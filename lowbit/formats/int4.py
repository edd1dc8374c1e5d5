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
