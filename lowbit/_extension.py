"""Loads the compiled extension `lowbit._C` if it is there, and remembers why not otherwise.

Importing lowbit never fails because of the extension: without it the reference (and, on
CUDA tensors, Triton) implementations serve every op.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("lowbit")

LOADED = False
LOAD_ERROR: str | None = None
BUILD_CONFIG = None

try:
    from . import _C  # noqa: F401  (static initializers register the kernels)

    LOADED = True
except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    log.info("lowbit: compiled extension not loaded (%s); using reference/Triton backends", LOAD_ERROR)

try:
    from . import _build_config as BUILD_CONFIG  # noqa: N812
except ImportError:
    BUILD_CONFIG = None


def has_kernel(qualified_op: str, dispatch_key: str) -> bool:
    """Whether `lowbit::op` has a kernel registered for `dispatch_key` (e.g. CPU, CUDA)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_op, dispatch_key)
    except RuntimeError:
        return False


def built_with_cuda() -> bool:
    return bool(LOADED and BUILD_CONFIG is not None and BUILD_CONFIG.BUILT_WITH_CUDA)


def build_description() -> str:
    if not LOADED:
        return f"not loaded: {LOAD_ERROR}"
    if BUILD_CONFIG is None:
        return "loaded (no build record)"
    cuda = (f"CUDA kernels for {', '.join('sm_' + a.replace('.', '') for a in BUILD_CONFIG.CUDA_ARCHS)}"
            if BUILD_CONFIG.BUILT_WITH_CUDA else f"no CUDA kernels ({BUILD_CONFIG.CUDA_REASON})")
    return f"built against torch {BUILD_CONFIG.TORCH_VERSION}; {cuda}"
