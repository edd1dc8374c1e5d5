"""FP8 family, reference semantics (OCP E4M3FN and E5M2; torch.float8_e4m3fn / float8_e5m2).

Quantization: ``x ~= q * scale`` with float32 scales.
    amax  = max |x| over the finite elements of the scale's group, in float32
            (a group is the tensor, a row, a 1x128 block of a row, or a 128x128 tile)
    scale = amax / fmax           (fmax 448 for e4m3, 57344 for e5m2; 1.0 where that is 0,
                                   so all-zero groups give zeros, never NaN or inf)
    v     = float32(x) / scale    (IEEE division)
    q     = round_to_nearest_even(v) in the format, subnormals included, with the overflow policy:
        saturate=True  (default): |v| > fmax -> +-fmax, +-inf included; NaN -> NaN
        saturate=False: e4m3: |v| > 464 (rounds past 448) and +-inf -> NaN (e4m3fn has no inf)
                        e5m2: |v| >= 61440 (rounds past 57344) -> +-inf; NaN -> NaN
        (a NaN keeps the sign of v: codes 0x7f / 0xff)
    Infinities do not enter amax, so one inf does not zero the rest of its group.

GEMMs (nn.Linear layout, a [M, K], b [N, K]) decode fp8 exactly to float32 and accumulate in
float32, in an order of the kernel's choosing:
    per-tensor / per-row scales: out = (sum_k a*b) * scale_a[m] * scale_b[n] + bias[n]
    block scales:                out = sum_k (a*scale_a[m, k//128]) * (b*scale_b[n//128, k//128]) + bias[n]
"""

from __future__ import annotations

import torch

from ..._checks import FP8_BLOCK, FP8_FORMATS, FP8_MAX

FMAX = FP8_MAX
# Smallest magnitude that rounds past the largest finite value (ties go to the even code above).
OVERFLOW = {"e4m3": 464.0, "e5m2": 61440.0}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pad_to_blocks(t: torch.Tensor, dim: int) -> torch.Tensor:
    size = t.shape[dim]
    pad = _cdiv(size, FP8_BLOCK) * FP8_BLOCK - size
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def fp8_amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """max |x| over the finite elements of each scale group, float32, shaped like the scale."""
    a = x.to(torch.float32)
    a = torch.where(torch.isfinite(a), a.abs(), torch.zeros_like(a))
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.amax(dim=-1)
    a = _pad_to_blocks(a, -1)
    if granularity == "block1x128":
        return a.reshape(*a.shape[:-1], -1, FP8_BLOCK).amax(dim=-1)
    a = _pad_to_blocks(a, 0)
    return a.reshape(a.shape[0] // FP8_BLOCK, FP8_BLOCK, -1, FP8_BLOCK).amax(dim=(1, 3))


def fp8_scale_from_amax(amax: torch.Tensor, format: str) -> torch.Tensor:
    # tensor / tensor: on CUDA, tensor / python-scalar is a multiply by the reciprocal, not the
    # IEEE division the spec and every kernel use (see reference/int8.py).
    scale = amax / torch.full_like(amax, FMAX[format])
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def expand_scale(scale: torch.Tensor, shape) -> torch.Tensor:
    """A scale (scalar, per row, per 1x128 block or per 128x128 tile) broadcast to `shape`."""
    shape = list(shape)
    if scale.numel() == 1 and scale.dim() <= 1:
        return scale.reshape(())
    if list(scale.shape) == shape[:-1]:
        return scale.unsqueeze(-1)
    s = scale.repeat_interleave(FP8_BLOCK, dim=-1)[..., : shape[-1]]
    if list(scale.shape[:-1]) == shape[:-1]:  # 1x128 blocks
        return s
    return s.repeat_interleave(FP8_BLOCK, dim=0)[: shape[0]]  # 128x128 tiles


def fp8_encode(v: torch.Tensor, format: str, saturate: bool) -> torch.Tensor:
    """float32 -> fp8 with lowbit's overflow policy (independent of how this torch converts overflow)."""
    fmax = FMAX[format]
    if saturate:
        v = torch.clamp(v, -fmax, fmax)  # NaN stays NaN
    elif format == "e4m3":
        v = torch.where(v.abs() > OVERFLOW["e4m3"], torch.copysign(torch.full_like(v, float("nan")), v), v)
    else:
        v = torch.where(v.abs() >= OVERFLOW["e5m2"], torch.copysign(torch.full_like(v, float("inf")), v), v)
    return v.to(FP8_FORMATS[format])


def fp8_quantize_static(x: torch.Tensor, scale: torch.Tensor, format: str = "e4m3", saturate: bool = True):
    x32 = x.to(torch.float32)
    return fp8_encode(x32 / expand_scale(scale, x.shape), format, saturate)


def fp8_quantize_dynamic(x: torch.Tensor, format: str = "e4m3", granularity: str = "row", saturate: bool = True):
    scale = fp8_scale_from_amax(fp8_amax(x, granularity), format)
    return fp8_quantize_static(x, scale, format, saturate), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * expand_scale(scale, q.shape)


def _vector_scale(s: torch.Tensor, shape) -> torch.Tensor:
    """A scalar or per-row/per-column scale, broadcastable against an [M, N] result."""
    return s.reshape(shape) if s.numel() > 1 else s.reshape(())


def fp8_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    out_dtype = out_dtype or torch.float32
    # Contiguous first: BLAS picks a different summation order for a transposed operand.
    a32, b32 = a.contiguous().to(torch.float32), b.contiguous().to(torch.float32)
    if scale_a.dim() == 2:
        y = (a32 * expand_scale(scale_a, a.shape)) @ (b32 * expand_scale(scale_b, b.shape)).T
    else:
        y = (a32 @ b32.T) * _vector_scale(scale_a, (-1, 1)) * _vector_scale(scale_b, (1, -1))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def fp8_weight_only_mm(x, w, scale, bias=None):
    x32, w32 = x.contiguous().to(torch.float32), w.contiguous().to(torch.float32)
    if scale.dim() == 2:
        y = x32 @ (w32 * expand_scale(scale, w.shape)).T
    else:
        y = (x32 @ w32.T) * _vector_scale(scale, (1, -1))
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
