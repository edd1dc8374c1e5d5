"""Quantizers: the math that turns float tensors into integer codes plus scales.

:mod:`lowbit.quant.affine` is the pure-torch reference for affine (scale / zero-point)
quantization that the int8 and int4 formats and the PTQ tools build on.
"""

from __future__ import annotations

from . import affine  # noqa: F401
from . import nm_prune  # noqa: F401
