"""What every quantized linear module shares: the interface :mod:`lowbit.api` relies on and the
rules for which float layers may be replaced at all."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._checks import FLOAT_DTYPES
from ..configs import Unsupported


def check_float_linear(linear: nn.Module, *, max_in_features: int | None = None) -> None:
    """Raise :class:`Unsupported` unless swapping `linear` for a quantized module keeps the model right."""
    if not isinstance(linear, nn.Linear):
        raise Unsupported(f"{type(linear).__name__} is not an nn.Linear")
    if isinstance(linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise Unsupported("out_proj of nn.MultiheadAttention, which reads .weight directly instead of calling forward")
    if type(linear).forward is not nn.Linear.forward:
        raise Unsupported(f"{type(linear).__name__} overrides nn.Linear.forward")
    if parametrize.is_parametrized(linear):
        raise Unsupported("weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first")
    if linear._forward_hooks or linear._forward_pre_hooks:
        # e.g. accelerate's offloading hooks: a swapped module would silently drop them.
        raise Unsupported("has forward hooks, which replacing the module would drop")
    w, b = linear.weight, linear.bias
    if type(w) not in (torch.Tensor, nn.Parameter):
        raise Unsupported(f"weight is a {type(w).__name__} tensor subclass")
    if w.is_meta:
        raise Unsupported("weight is on the meta device; load or materialize the weights first")
    if w.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"weight dtype {str(w.dtype).replace('torch.', '')} is not float32, float16 or bfloat16")
    if b is not None and b.dtype not in FLOAT_DTYPES:
        raise Unsupported(f"bias dtype {str(b.dtype).replace('torch.', '')} is not float32, float16 or bfloat16")
    if w.numel() == 0:
        raise Unsupported(f"weight has a zero-sized dimension {list(w.shape)}")
    if max_in_features is not None and linear.in_features > max_in_features:
        raise Unsupported(f"in_features={linear.in_features} exceeds {max_in_features}, "
                          "beyond which int32 accumulation could overflow")
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()):
            raise Unsupported("weight has inf or NaN values, which have no int8 code")


# Parents whose forward reads these children's `.weight` directly (torch's fused inference fast
# path), so a swapped child would either break them or be bypassed.
_WEIGHT_READING_PARENTS: dict[type, tuple[str, ...]] = {
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}


def check_parent(parent: nn.Module, child_name: str) -> None:
    """Raise :class:`Unsupported` if `parent` uses its child `child_name` other than by calling it."""
    for cls, names in _WEIGHT_READING_PARENTS.items():
        if isinstance(parent, cls) and child_name in names:
            raise Unsupported(f"{cls.__name__} reads {child_name}.weight directly on its inference fast path")


class QuantizedLinear(nn.Module):
    """Base of lowbit's nn.Linear replacements.

    Subclasses set ``scheme`` and implement ``forward`` and ``from_float``; those whose weight is one
    format dataclass implement ``quantized_weight`` and get ``bits_per_weight`` and
    ``weight_nbytes`` from it (the format counts its own bytes), the others override both. ``orig_dtype`` is the float layer's weight dtype (what the bias is stored
    in, and what :func:`lowbit.summary` counts as "bytes before").
    """

    scheme: ClassVar[str] = ""
    #: buffers that stay float32 under ``model.half()`` / ``model.to(torch.bfloat16)``: the
    #: kernels take float32 scales, and rounding them to 16 bits would add error as large as the
    #: quantization's own.
    float32_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.orig_dtype = dtype

    @classmethod
    def from_float(cls, linear: nn.Linear) -> QuantizedLinear:
        raise NotImplementedError

    def quantized_weight(self):
        """The layer's weight as its format's dataclass (``lowbit.formats.<family>``)."""
        raise NotImplementedError

    def bits_per_weight(self) -> float:
        return self.quantized_weight().bits_per_weight()

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight and its scales (bias excluded)."""
        return self.quantized_weight().nbytes()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={getattr(self, 'bias', None) is not None}, scheme={self.scheme!r}")

    def _check_input(self, x: torch.Tensor) -> None:
        # Without this, reshape(-1, K) would silently regroup a wrong-width input into rows.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"lowbit {type(self).__name__}: input must have shape [..., {self.in_features}], "
                             f"got {list(x.shape)}")

    def _map_rows(self, x: torch.Tensor, matmul) -> torch.Tensor:
        """nn.Linear's shape contract around a kernel on 2-D rows: x [..., K] -> [..., N]. An
        empty x gives an empty result without a call: the ops reject empty inputs, nn.Linear
        returns an empty output."""
        self._check_input(x)
        if x.numel() == 0:
            return x.new_empty((*x.shape[:-1], self.out_features))
        return matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in self.float32_buffers if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                # Re-derive from the float32 original: casting `new` back would keep the rounding.
                self._buffers[name] = old.to(device=new.device)
        return out
