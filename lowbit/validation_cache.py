"""The cache of tensors whose contents a compiled kernel has already validated.

Some ops must check a weight's *data*, not only its shape: a 2:4 ``meta`` tensor with an invalid
nibble would be undefined behaviour in the sparse tensor-core instruction. On CUDA that check
costs a device-to-host read (a synchronization per call, and impossible under CUDA-graph
capture), so the compiled kernels validate a tensor once and remember it, keyed on the tensor
object, its version counter (``tensor._version``) and its data pointer, offset, sizes, strides
and dtype (csrc/include/lowbit/validated_once.h). Any in-place write made through torch bumps the
version, so the next call validates again.

Writes that bypass the version counter are not seen: through ``tensor.data``, ``tensor.numpy()``,
``tensor.untyped_storage()``, DLPack or a raw pointer. After such a write call
:func:`clear_validation_cache`; or set ``LOWBIT_VALIDATION_CACHE=0`` in the environment (before
the process starts) or call ``set_validation_cache_enabled(False)`` to validate on every call.
Tensors created under ``torch.inference_mode`` have no version counter and are always validated.

Without the compiled extension there is no cache (the reference checks every call): these
functions then do nothing and :func:`validation_cache_stats` returns ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension


@dataclass(frozen=True)
class ValidationCacheStats:
    hits: int       # calls that skipped the data check
    misses: int     # calls that ran it (cacheable tensors only)
    entries: int    # tensors remembered now
    enabled: bool


_C_MODULE = None


def _lib():
    global _C_MODULE
    if _C_MODULE is None and _extension.LOADED:  # once: check_once runs on every sparse24 call
        from . import _C

        _C_MODULE = _C
    return _C_MODULE


def clear_validation_cache() -> None:
    """Forget every validated tensor: the next call of each op checks its data again."""
    lib = _lib()
    if lib is not None:
        lib._validation_cache_clear()


def set_validation_cache_enabled(enabled: bool) -> None:
    """Turn the cache off (validate on every call; also clears it) or back on."""
    lib = _lib()
    if lib is not None:
        lib._validation_cache_set_enabled(bool(enabled))


def validation_cache_stats(reset: bool = False) -> ValidationCacheStats | None:
    """Hit and miss counts since the last reset; ``reset=True`` zeroes them after reading."""
    lib = _lib()
    if lib is None:
        return None
    stats = ValidationCacheStats(*lib._validation_cache_stats())
    if reset:
        lib._validation_cache_reset_stats()
    return stats


def check_once(tensor: torch.Tensor, tag: str, validate: Callable[[], None]) -> bool:
    """Run ``validate()`` (which raises on bad data) unless `tensor`, in its current state, already
    passed the check named `tag`; remember it when it passes. True when the check was skipped.

    Shared with the C++ kernels: a tensor validated here is not validated again by them, nor the
    reverse. `tag` must be one the extension knows (``"sparse24.meta"``). Without the extension
    ``validate()`` runs every time.
    """
    lib = _lib()
    if lib is None:
        validate()
        return False
    return lib._validation_cache_check_once(tensor, tag, validate)
