"""lowbit: low-bit inference kernels for PyTorch.

    import lowbit
    lowbit.quantize(model, "int8")        # swap nn.Linear layers for int8 kernels
    print(lowbit.summary(model))

Ops live in ``torch.ops.lowbit.*`` (typed wrappers in :mod:`lowbit.ops`); backends and the
rule that picks one in :mod:`lowbit.backends`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ops  # noqa: F401  (schemas and fake kernels first)
from . import _extension  # noqa: F401  (then the compiled kernels, if built)
from . import backends  # noqa: E402  (callable: lowbit.backends() lists them; lowbit.backends.use(...) forces one)

backends.register_implementations()

from . import ops  # noqa: E402,F401

from . import nn  # noqa: E402,F401
from .api import last_report, quantize, summary  # noqa: E402,F401
from .configs import PRESETS, FP8Config, Int4Config, Int8Config  # noqa: E402,F401
from .configs import Sparse24Config  # noqa: E402,F401
from .configs import CodebookConfig  # noqa: E402,F401
from .serialization import load, save  # noqa: E402,F401
from .qat import convert, prepare_qat  # noqa: E402,F401
# ---- ptq: calibration, GPTQ, SmoothQuant, sensitivity and mixed precision
from .calibrate import calibrate  # noqa: E402,F401
from .quant.gptq import gptq  # noqa: E402,F401
from .quant.smooth import smooth_quant  # noqa: E402,F401
from .sensitivity import mixed_precision, sensitivity  # noqa: E402,F401

# ---- compress: pruning, low-rank, Tucker/CP, Huffman storage, distillation, slimmable width
from . import compress  # noqa: E402,F401
from .configs import BinaryConfig  # noqa: E402,F401
# ---- ptq: AWQ (activation-aware int4 / int8 weight-only scaling)
from .quant.awq import awq  # noqa: E402,F401
# ---- validation cache: data checks (2:4 metadata) run once per tensor version; clear after raw writes
from .validation_cache import clear_validation_cache  # noqa: E402,F401
