"""INT8 weight format.

``qweight`` int8 [N, K], row-major: the nn.Linear layout, so the GEMMs read ``a @ qweight.T``
without a transpose and a checkpoint keeps the float layer's shape.
``scale`` float32 [N]: one symmetric scale per output channel, ``w[n, :] ~= qweight[n, :] * scale[n]``.
Values lie in [-127, 127] (never -128) so the grid is symmetric around zero.

The scale is float32 whatever the model's dtype: a bf16 scale would add up to 2**-9 relative
error per channel, as large as the int8 rounding itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops

QMAX = 127
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class Int8Weight:
    qweight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    def __post_init__(self):
        validate(self.qweight, self.scale)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.out_features, self.in_features)

    def nbytes(self) -> int:
        return nbytes(self.out_features, self.in_features)


def validate(qweight: torch.Tensor, scale: torch.Tensor) -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"lowbit.formats.int8: qweight must be a 2-D int8 tensor [N, K], got "
                         f"{getattr(qweight, 'dtype', type(qweight).__name__)} {list(getattr(qweight, 'shape', []))}")
    N = qweight.shape[0]
    if not isinstance(scale, torch.Tensor) or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != (N,):
        raise ValueError(f"lowbit.formats.int8: scale must be float32 with shape [N]=[{N}], got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} {list(getattr(scale, 'shape', []))}")
    if scale.device != qweight.device:
        raise ValueError(f"lowbit.formats.int8: scale is on {scale.device} but qweight is on {qweight.device}")


def quantize_weight(w: torch.Tensor) -> Int8Weight:
    """Per-output-channel symmetric int8 quantization of a float [N, K] weight (same rule as the ops)."""
    if w.dim() != 2:
        raise ValueError(f"lowbit.formats.int8: weight must be 2-D [N, K], got shape {list(w.shape)}")
    q, scale = ops.int8_quantize_dynamic(w.detach(), per_row=True)
    # Row-major is part of the format (kernels read qweight rows as K-contiguous runs).
    return Int8Weight(q.contiguous(), scale.contiguous())


def dequantize(weight: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight the int8 one stands for (computed in float32, then cast)."""
    return (weight.qweight.to(torch.float32) * weight.scale.unsqueeze(1)).to(dtype)


def nbytes(out_features: int, in_features: int) -> int:
    """Bytes of qweight plus scales for an [N, K] weight (bias not included)."""
    return out_features * in_features + out_features * SCALE_DTYPE.itemsize


def bits_per_weight(out_features: int, in_features: int) -> float:
    """Storage cost per weight including the per-channel scale: 8 + 32/K."""
    return 8.0 * nbytes(out_features, in_features) / (out_features * in_features)
