"""FP8 weight format, defined once: used by the quantizer, the kernels and FP8Linear.

``qweight`` [N, K] in torch.float8_e4m3fn ("e4m3", max 448: more precision) or
torch.float8_e5m2 ("e5m2", max 57344: more range), row-major (the nn.Linear layout).
``scale`` float32, ``w ~= qweight * scale``, with the granularity given by its shape:

* ``"tensor"``: ``[]``, one scale;
* ``"row"``: ``[N]``, one per output channel;
* ``"block"``: ``[ceil(N/128), ceil(K/128)]``, one per 128x128 tile (DeepSeek-V3 style; the last
  tiles may be partial).

scale = amax / fmax over the group (1.0 for an all-zero group), values rounded to nearest even
and saturated to +-fmax (lowbit.backends.reference.fp8). Scales stay float32 whatever the
model's dtype: a bf16 scale would shift every weight of its group by up to 2**-9 relative, on
top of the fp8 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .._checks import FP8_BLOCK, FP8_FORMATS, FP8_MAX

FORMATS = tuple(FP8_FORMATS)  # ("e4m3", "e5m2")
GRANULARITIES = ("tensor", "row", "block")
SCALE_DTYPE = torch.float32
FMAX = FP8_MAX
# The op-level granularity that quantizes a weight for each format granularity.
_OP_GRANULARITY = {"tensor": "tensor", "row": "row", "block": "block128x128"}


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def format_of(dtype: torch.dtype) -> str:
    for name, dt in FP8_FORMATS.items():
        if dt == dtype:
            return name
    raise ValueError(f"lowbit.formats.fp8: {dtype} is not an fp8 dtype (float8_e4m3fn or float8_e5m2)")


def scale_shape(granularity: str, out_features: int, in_features: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return (out_features,)
    if granularity == "block":
        return (_cdiv(out_features, FP8_BLOCK), _cdiv(in_features, FP8_BLOCK))
    raise ValueError(f"lowbit.formats.fp8: granularity must be one of {GRANULARITIES}, got {granularity!r}")


@dataclass(frozen=True)
class Fp8Weight:
    qweight: torch.Tensor  # fp8 [N, K]
    scale: torch.Tensor  # float32, [] / [N] / [ceil(N/128), ceil(K/128)]
    granularity: str

    def __post_init__(self):
        validate(self.qweight, self.scale, self.granularity)

    @property
    def format(self) -> str:
        return format_of(self.qweight.dtype)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * SCALE_DTYPE.itemsize

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)


def validate(qweight: torch.Tensor, scale: torch.Tensor, granularity: str) -> None:
    if not isinstance(qweight, torch.Tensor) or qweight.dtype not in FP8_FORMATS.values() or qweight.dim() != 2:
        raise ValueError(f"lowbit.formats.fp8: qweight must be a 2-D float8_e4m3fn or float8_e5m2 tensor [N, K], "
                         f"got {getattr(qweight, 'dtype', type(qweight).__name__)} "
                         f"{list(getattr(qweight, 'shape', []))}")
    want = scale_shape(granularity, *qweight.shape)
    if not isinstance(scale, torch.Tensor) or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != want:
        raise ValueError(f"lowbit.formats.fp8: scale must be float32 with shape {list(want)} for granularity "
                         f"{granularity!r}, got {getattr(scale, 'dtype', type(scale).__name__)} "
                         f"{list(getattr(scale, 'shape', []))}")
    if scale.device != qweight.device:
        raise ValueError(f"lowbit.formats.fp8: scale is on {scale.device} but qweight is on {qweight.device}")


def quantize_weight(w: torch.Tensor, format: str = "e4m3", granularity: str = "row") -> Fp8Weight:
    """Saturating round-to-nearest fp8 quantization of a float [N, K] weight (the op's rule)."""
    if w.dim() != 2:
        raise ValueError(f"lowbit.formats.fp8: weight must be 2-D [N, K], got shape {list(w.shape)}")
    if format not in FORMATS:
        raise ValueError(f"lowbit.formats.fp8: format must be one of {FORMATS}, got {format!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"lowbit.formats.fp8: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    q, scale = ops.fp8_quantize_dynamic(w.detach(), format, _OP_GRANULARITY[granularity], True)
    return Fp8Weight(q.contiguous(), scale.contiguous(), granularity)


def dequantize(weight: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight the fp8 one stands for (computed in float32, then cast)."""
    q = weight.qweight.to(torch.float32)
    s = weight.scale
    if weight.granularity == "block":
        N, K = q.shape
        s = s.repeat_interleave(FP8_BLOCK, 0)[:N].repeat_interleave(FP8_BLOCK, 1)[:, :K]
    elif weight.granularity == "row":
        s = s.unsqueeze(1)
    return (q * s).to(dtype)


def nbytes(out_features: int, in_features: int, granularity: str = "row") -> int:
    """Bytes of qweight plus scales for an [N, K] weight (bias not included)."""
    n_scales = 1
    for d in scale_shape(granularity, out_features, in_features):
        n_scales *= d
    return out_features * in_features + n_scales * SCALE_DTYPE.itemsize
