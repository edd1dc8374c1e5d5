"""Affine quantization in pure torch: the reference math for scales and zero points.

    x ~= (q - zero_point) * scale

Granularity follows the last dimension (K, the reduction dimension of an [N, K] weight, or the
features of an activation):

* ``"tensor"``: one scale for the whole tensor, shape ``[]``;
* ``"channel"``: one per row, shape ``x.shape[:-1]`` (per output channel / per token);
* ``"group"``: one per run of ``group_size`` consecutive elements of a row, shape
  ``x.shape[:-1] + (K // group_size,)``.

Symmetric: codes in [-(2**(b-1) - 1), 2**(b-1) - 1], ``scale = amax / qmax``, no zero point.
The most negative code is left out so that the grid is symmetric (this is exactly the int8 rule
of :func:`lowbit.ops.int8_quantize_dynamic`, which the tests check bit for bit).
Asymmetric: codes in [0, 2**b - 1], ``scale = (hi - lo) / (2**b - 1)`` with the range widened to
include 0, so that 0.0 (padding, ReLU outputs) is represented exactly.

Rounding is round-half-to-even of the true quotient ``x / scale`` in float32, and a zero range
gives ``scale = 1`` so an all-zero row stays finite. Inputs must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class AffineParams:
    """How a tensor was quantized: enough to dequantize it or to quantize more data the same way."""

    scale: torch.Tensor  # float32, shape set by the granularity
    zero_point: torch.Tensor | None  # int32 like scale; None when symmetric
    bits: int
    symmetric: bool
    granularity: str
    group_size: int | None = None

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 1 <= bits <= 16 or (symmetric and bits < 2):
        raise ValueError(f"lowbit.quant.affine: bits must be in [2, 16] (symmetric) or [1, 16], got {bits}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """The narrowest torch integer dtype that holds every code."""
    if bits <= 8:
        return torch.int8 if symmetric else torch.uint8
    return torch.int32


def _grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View `x` so that each scale covers exactly the last dimension of the view."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"lowbit.quant.affine: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"lowbit.quant.affine: x must be non-empty with at least 1 dimension, got {list(x.shape)}")
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x
    K = x.shape[-1]
    if group_size is None or group_size <= 0 or K % group_size != 0:
        raise ValueError(f"lowbit.quant.affine: group_size must be a positive divisor of K={K}, got {group_size}")
    return x.reshape(*x.shape[:-1], K // group_size, group_size)


def _scale_shape(x: torch.Tensor, granularity: str, group_size: int | None) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "channel":
        return tuple(x.shape[:-1])
    return (*x.shape[:-1], x.shape[-1] // group_size)


def choose_qparams(
    x: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
) -> AffineParams:
    """Min/max (absmax when symmetric) scales and zero points for `x`."""
    g = _grouped(x, granularity, group_size).to(torch.float32)
    shape = _scale_shape(x, granularity, group_size)
    return params_from_range(g.amin(dim=-1).reshape(shape), g.amax(dim=-1).reshape(shape), bits,
                             symmetric=symmetric, granularity=granularity, group_size=group_size)


def params_from_range(
    lo: torch.Tensor,
    hi: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
) -> AffineParams:
    """Scales and zero points that cover [lo, hi] (shaped like the scale; observers and clipping
    searches choose the range, this turns it into parameters by the rule above)."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=lo.device)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(amax > 0, amax / qmax, one)
        zero_point = None
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        span = hi - lo
        scale = torch.where(span > 0, span / (qmax - qmin), one)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return AffineParams(scale, zero_point, bits, symmetric, granularity, group_size)


def _expand(t: torch.Tensor, x: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """Broadcast a per-scale tensor over `x` grouped as `p` says."""
    if p.granularity == "tensor":
        return t.reshape(())
    if p.granularity == "channel":
        return t.unsqueeze(-1)
    return t.unsqueeze(-1).expand(*t.shape, p.group_size).reshape(x.shape)


def quantize(x: torch.Tensor, p: AffineParams) -> torch.Tensor:
    """Integer codes of `x` under `p` (dtype from :func:`code_dtype`)."""
    scale = _expand(p.scale, x, p)
    q = torch.round(x.to(torch.float32) / scale)
    if p.zero_point is not None:
        q = q + _expand(p.zero_point, x, p).to(torch.float32)
    return torch.clamp(q, p.qmin, p.qmax).to(code_dtype(p.bits, p.symmetric))


def dequantize(q: torch.Tensor, p: AffineParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, cast to `dtype`."""
    v = q.to(torch.float32)
    if p.zero_point is not None:
        v = v - _expand(p.zero_point, q, p).to(torch.float32)
    return (v * _expand(p.scale, q, p)).to(dtype)


def quantize_affine(
    x: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
) -> tuple[torch.Tensor, AffineParams]:
    """:func:`choose_qparams` then :func:`quantize`: ``(codes, params)``."""
    p = choose_qparams(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    return quantize(x, p), p


def fake_quantize(x: torch.Tensor, bits: int = 8, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x))`` in `x`'s dtype: what a layer sees after quantization."""
    q, p = quantize_affine(x, bits, **kwargs)
    return dequantize(q, p, x.dtype)
