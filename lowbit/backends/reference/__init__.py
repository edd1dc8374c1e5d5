"""Pure-torch reference implementations: the spec of every op and the test oracle.

They favour clarity over speed, run on any device, and define the exact numerics that the
optimized kernels must reproduce (see docs/ops.md).
"""

from . import fp8, int4, int8  # noqa: F401
from . import binary  # noqa: F401,E402
from . import sparse24  # noqa: F401
from . import codebook  # noqa: F401
