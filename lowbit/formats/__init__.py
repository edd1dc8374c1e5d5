"""Weight formats: how each family lays out its quantized weights, defined once.

The quantizer that produces a format, the kernels that consume it and the module that stores
it all import it from here (one file per family: ``lowbit/formats/<family>.py``), so a layout
or an overhead figure can never disagree between them.
"""

from __future__ import annotations

from . import fp8, int4, int8  # noqa: F401
from .int8 import Int8Weight  # noqa: F401
from .int4 import Int4Weight  # noqa: F401
from .fp8 import Fp8Weight  # noqa: F401
from . import binary  # noqa: F401,E402
from .binary import BinaryWeight  # noqa: F401,E402
from . import sparse24  # noqa: F401
from .sparse24 import Sparse24Weight  # noqa: F401
