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
from .codebook import CodebookLinear  # noqa: F401
