"""Quantized modules that replace nn.Linear, one file per family (``lowbit/nn/<family>.py``).

Each module has ``from_float(linear)``, a ``scheme`` name, ``bits_per_weight()`` and
``weight_nbytes()`` (see :class:`QuantizedLinear`); importing a family's file registers its
config handler with :mod:`lowbit.configs`.
"""

from __future__ import annotations

from .base import QuantizedLinear, check_float_linear, check_parent  # noqa: F401
from .int8 import Int8Linear, Int8WeightOnlyLinear  # noqa: F401
from .int4 import Int4Linear  # noqa: F401
from .fp8 import FP8Linear  # noqa: F401
from .conv import QuantizedConv2d, check_float_conv2d, conv_as_linear, im2col, rows_to_image  # noqa: F401
from .binary import BinaryConv2d, BinarizedConv2d, BinarizedLinear, BinaryLinear  # noqa: F401,E402
from .sparse24 import Sparse24Linear  # noqa: F401
from .codebook import CodebookLinear  # noqa: F401
# ---- int4 cutlass_sm90 (opt-in, unverified)
from .int4_sm90 import Int4LinearCutlassSm90  # noqa: F401,E402
