"""Triton implementations, one module per family with the same names as the ops.

`KERNELS` maps op name -> host function (checks, allocation, launch). `kernel_for` returns
the host function when this device can run it (e.g. fp8 needs sm_89+), else None, and the
backend-selection rule falls through. Every @triton.jit kernel is listed in
`lowbit.backends.triton.aot.AOT_KERNELS` so that CI compiles it for sm_80/sm_89/sm_90.
"""

from __future__ import annotations

import torch

from . import fp8, int4, int8
from . import sparse24

KERNELS = {}
MIN_CAPABILITY = {}
for _module in (int8, int4, fp8, sparse24):
    KERNELS.update(_module.KERNELS)
    MIN_CAPABILITY.update(getattr(_module, "MIN_CAPABILITY", {}))
# ---- binary
from . import binary  # noqa: E402

KERNELS.update(binary.KERNELS)

# ---- codebook
from . import codebook  # noqa: E402

KERNELS.update(codebook.KERNELS)


def kernel_for(op: str, device: torch.device):
    fn = KERNELS.get(op)
    if fn is None:
        return None
    if device.type == "cuda":
        need = MIN_CAPABILITY.get(op, (8, 0))
        if torch.cuda.get_device_capability(device) < need:
            return None
    return fn
