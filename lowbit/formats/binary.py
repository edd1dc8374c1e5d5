"""The binary (±1) format, defined once: used by the quantizer, the kernels and BinaryLinear.

Values
    Every value is +1 or -1: ``sign(x)`` with **0 -> +1** (and -0.0 and NaN -> +1: the bit is
    ``not (x < 0)``, one comparison that every backend evaluates identically).

Packing (32-bit words along K, LSB first)
    ``packed`` is int32 ``[rows, ceil(K / 32)]``. Bit ``b`` (value ``1 << b``) of word ``w``
    holds column ``k = 32 w + b``: **1 means +1, 0 means -1** (XNOR-Net's convention).
    Why 32-bit words: the unit of CUDA's b1 ``mma.sync`` fragments, of ``__popc`` and of Triton's
    int32 tensors; on little-endian CPUs two consecutive words *are* one LSB-first 64-bit word,
    so the CPU kernel still runs 64-bit ``popcnt`` on the same bytes. int32 rather than uint32
    because torch supports int32 everywhere (the bits are what matter; word 0x80000000 is
    simply stored as -2**31).
    Padding bits (``K <= k < 32 * ceil(K / 32)``) are written as 0 by :func:`pack` and
    **ignored** by every kernel (each masks the last word), so they can never change a result.

Dot product
    For ±1 vectors a, b of length K: ``a . b = K - 2 * popcount(a XOR b)`` over the K real bits.

Scales (XNOR-Net)
    A binarized weight row stands for ``beta[n] * sign(w[n, :])`` with ``beta[n] = mean |w[n, :]|``
    (the L2-optimal scale for a fixed sign pattern); activations for ``alpha[m] * sign(x[m, :])``
    with ``alpha[m] = mean |x[m, :]|``. Scales are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WORD_BITS = 32
WORD_DTYPE = torch.int32
SCALE_DTYPE = torch.float32


def num_words(K: int) -> int:
    return math.ceil(K / WORD_BITS)


def _bit_weights(device) -> torch.Tensor:
    # 1 << b as int64 (1 << 31 does not fit int32); the sum is reinterpreted below.
    return (torch.ones(WORD_BITS, dtype=torch.int64, device=device) << torch.arange(WORD_BITS, device=device))


def signs_to_bits(x: torch.Tensor) -> torch.Tensor:
    """bool tensor, True where ``x`` binarizes to +1 (0, -0.0 and NaN included)."""
    return ~(x < 0)


def pack(x: torch.Tensor) -> torch.Tensor:
    """Float (or bool/±1) tensor [..., K] -> int32 [..., ceil(K/32)] of sign bits (1 = +1)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"lowbit.formats.binary.pack: x must be a tensor [..., K] with K >= 1, got "
                         f"{list(getattr(x, 'shape', []))}")
    bits = x if x.dtype == torch.bool else signs_to_bits(x)
    K = x.shape[-1]
    W = num_words(K)
    padded = torch.zeros((*x.shape[:-1], W * WORD_BITS), dtype=torch.int64, device=x.device)
    padded[..., :K] = bits.to(torch.int64)
    words = (padded.view(*x.shape[:-1], W, WORD_BITS) * _bit_weights(x.device)).sum(-1)
    # Two's complement reinterpretation of the unsigned 32-bit word.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(WORD_DTYPE).contiguous()


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """int32 [..., ceil(K/32)] -> bool [..., K] (True = +1). Padding bits are dropped."""
    if packed.dtype != WORD_DTYPE or packed.dim() < 1 or packed.shape[-1] != num_words(K):
        raise ValueError(f"lowbit.formats.binary.unpack: packed must be int32 [..., ceil(K/32)]=[..., "
                         f"{num_words(K)}] for K={K}, got {packed.dtype} {list(packed.shape)}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(-1) >> torch.arange(WORD_BITS, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :K].bool()


def unpack(packed: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int32 [..., ceil(K/32)] -> ±1 tensor [..., K] of `dtype`. ``unpack(pack(s), K) == s`` for ±1 `s`."""
    bits = unpack_bits(packed, K)
    return torch.where(bits, 1.0, -1.0).to(dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with 0 -> +1, in x's dtype (the value the packed bits stand for)."""
    return torch.where(signs_to_bits(x), 1.0, -1.0).to(x.dtype)


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """XNOR-Net scale of each row: mean |x| over the last dim, in float32 (NaN-free inputs)."""
    return x.detach().to(torch.float32).abs().mean(dim=-1)


@dataclass(frozen=True)
class BinaryWeight:
    packed: torch.Tensor  # int32 [N, ceil(K/32)]
    scale: torch.Tensor   # float32 [N]: beta = mean |w| per output channel
    in_features: int      # K

    def __post_init__(self):
        validate(self.packed, self.scale, self.in_features)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def nbytes(self) -> int:
        return nbytes(self.out_features, self.in_features)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.out_features, self.in_features)


def validate(packed: torch.Tensor, scale: torch.Tensor, K: int) -> None:
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"lowbit.formats.binary: in_features must be a positive int, got {K!r}")
    W = num_words(K)
    if not isinstance(packed, torch.Tensor) or packed.dtype != WORD_DTYPE or packed.dim() != 2 or packed.shape[1] != W:
        raise ValueError(f"lowbit.formats.binary: packed must be int32 [N, ceil(K/32)]=[N, {W}] for K={K}, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)} {list(getattr(packed, 'shape', []))}")
    N = packed.shape[0]
    if not isinstance(scale, torch.Tensor) or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != (N,):
        raise ValueError(f"lowbit.formats.binary: scale must be float32 with shape [N]=[{N}], got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} {list(getattr(scale, 'shape', []))}")
    if scale.device != packed.device:
        raise ValueError(f"lowbit.formats.binary: scale is on {scale.device} but packed is on {packed.device}")


def quantize_weight(w: torch.Tensor) -> BinaryWeight:
    """Binarize a float [N, K] weight: sign bits packed along K, beta = mean |w| per row."""
    if w.dim() != 2:
        raise ValueError(f"lowbit.formats.binary.quantize_weight: w must be 2-D [N, K], got {list(w.shape)}")
    w = w.detach()
    return BinaryWeight(pack(w), mean_abs(w).contiguous(), w.shape[1])


def dequantize(weight: BinaryWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """beta[n] * sign bits, [N, K] (computed in float32, then cast)."""
    return (unpack(weight.packed, weight.in_features) * weight.scale.unsqueeze(1)).to(dtype)


def nbytes(out_features: int, in_features: int) -> int:
    """Packed words plus one float32 scale per output channel (bias excluded)."""
    return out_features * num_words(in_features) * 4 + out_features * SCALE_DTYPE.itemsize


def bits_per_weight(out_features: int, in_features: int) -> float:
    """1 bit + padding to 32 + 32/K for the scale."""
    return 8.0 * nbytes(out_features, in_features) / (out_features * in_features)
