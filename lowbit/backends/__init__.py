"""Backends and the rule that picks one.

Backends
--------
``cpu``        C++ kernels in ``lowbit._C`` (AVX2 + threads). Serve CPU tensors.
``cuda``       CUDA C++ kernels in ``lowbit._C`` (CUTLASS main loops, sm_80+).
``triton``     Triton kernels (:mod:`lowbit.backends.triton`).
``reference``  pure torch (:mod:`lowbit.backends.reference`): the spec, runs anywhere.

Selection rule (docs/ops.md, "Backend selection")
-------------------------------------------------
* CPU tensors: ``cpu`` when the extension is built, else ``reference``.
* CUDA tensors, per op:
  1. a backend forced with :func:`use` (or the ``LOWBIT_CUDA_BACKEND`` environment variable);
  2. ``cuda`` if the extension has that op's CUDA kernel *and* it has passed on a real GPU of
     this architecture (:mod:`lowbit.backends.verified`);
  3. ``triton`` if Triton is importable and has a kernel for the op that this GPU can run;
  4. ``reference``.
  An unverified CUDA C++ kernel is therefore never the default: it runs only when forced.

The decision for (op, GPU architecture) is made once and cached; ``use`` overrides it for
the calls made inside the ``with`` block (on this thread).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
import types
from dataclasses import dataclass

import torch

from .. import _checks, _extension, _ops
from . import reference, verified

BACKEND_NAMES = ("cpu", "cuda", "triton", "reference")
CUDA_BACKENDS = ("cuda", "triton", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def triton_kernels():
    """Module holding the Triton implementations, or None when Triton is unavailable."""
    if _triton_import_error() is not None:
        return None
    return importlib.import_module("lowbit.backends.triton")


def backends() -> dict[str, BackendStatus]:
    """Which backends this machine can run, and for each missing one, why not."""
    out = {}
    if _extension.LOADED:
        out["cpu"] = BackendStatus("cpu", True, _extension.build_description())
    else:
        out["cpu"] = BackendStatus("cpu", False, f"extension lowbit._C {_extension.build_description()}")

    gpu = torch.cuda.is_available()
    if not _extension.built_with_cuda():
        why = _extension.build_description() if _extension.LOADED else f"extension {_extension.build_description()}"
        out["cuda"] = BackendStatus("cuda", False, why)
    elif not gpu:
        out["cuda"] = BackendStatus("cuda", False, "built with CUDA kernels, but no CUDA GPU is visible")
    else:
        out["cuda"] = BackendStatus("cuda", True, _extension.build_description())

    terr = _triton_import_error()
    if terr is not None:
        out["triton"] = BackendStatus("triton", False, terr)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = BackendStatus("triton", True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors")
    elif not gpu:
        out["triton"] = BackendStatus("triton", False, "triton is installed, but no CUDA GPU is visible")
    else:
        import triton

        out["triton"] = BackendStatus("triton", True, f"triton {triton.__version__}")
    out["reference"] = BackendStatus("reference", True, "pure torch, any device")
    return out


# ----------------------------------------------------------------------------- forcing
_forced = threading.local()


def forced_backend() -> str | None:
    stack = getattr(_forced, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("LOWBIT_CUDA_BACKEND")
    return env or None


@contextlib.contextmanager
def use(backend: str):
    """Force the backend for ops on CUDA tensors inside the block: "cuda", "triton" or "reference".

    >>> with lowbit.backends.use("triton"):
    ...     y = model(x)
    """
    if backend not in CUDA_BACKENDS:
        raise ValueError(f"lowbit.backends.use: backend must be one of {CUDA_BACKENDS}, got {backend!r}")
    stack = getattr(_forced, "stack", None)
    if stack is None:
        stack = _forced.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


# ----------------------------------------------------------------------------- routing
def _reference_impl(op: str):
    for module in (reference.int8, reference.int4, reference.fp8, reference.binary, reference.sparse24,
                   reference.codebook):
        fn = getattr(module, op, None)
        if fn is not None:
            return fn
    raise NotImplementedError(f"lowbit: no reference implementation for {op}")


def _cuda_cpp_impl(op: str):
    qualified = f"lowbit::{_ops.CUDA_TWIN_PREFIX}{op}"
    if not _extension.has_kernel(qualified, "CUDA"):
        return None
    return getattr(torch.ops.lowbit, _ops.CUDA_TWIN_PREFIX + op).default


def _triton_impl(op: str, device: torch.device):
    module = triton_kernels()
    if module is None:
        return None
    return module.kernel_for(op, device)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _auto_cuda_choice(op: str, capability: tuple[int, int]) -> str:
    if _cuda_cpp_impl(op) is not None and verified.is_verified("cuda", op, capability):
        return "cuda"
    if _triton_import_error() is None:
        return "triton"
    return "reference"


def cuda_backend_for(op: str, device: torch.device) -> str:
    """The backend that serves `op` on this CUDA device now (forced or by the rule)."""
    forced = forced_backend()
    if forced is not None:
        return forced
    return _auto_cuda_choice(op, _capability(device))


def _resolve_cuda(op: str, device: torch.device):
    choice = cuda_backend_for(op, device)
    if choice == "cuda":
        impl = _cuda_cpp_impl(op)
        if impl is None:
            raise RuntimeError(f"lowbit.{op}: backend 'cuda' was requested but lowbit._C has no CUDA kernel for it "
                               f"({backends()['cuda'].reason})")
        return impl
    if choice == "triton":
        impl = _triton_impl(op, device)
        if impl is None:
            # Triton cannot run this op on this chip (e.g. fp8 on sm_80): the rule falls through.
            if forced_backend() == "triton":
                raise RuntimeError(f"lowbit.{op}: backend 'triton' was requested but has no kernel for this device")
            return checked_reference(op)
        return impl
    return checked_reference(op)


def _first_tensor_device(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise RuntimeError("no tensor argument")


def _checked(op: str, impl):
    """Python kernels validate like the C++ ones do, with the same messages."""
    check = getattr(_checks, op)

    def run(*args, **kwargs):
        check(op, *args, **kwargs)
        return impl(*args, **kwargs)

    run.__name__ = f"{op}_{getattr(impl, '__name__', 'impl')}"
    return run


@functools.lru_cache(maxsize=None)
def checked_reference(op: str):
    """The reference kernel behind the same argument checks as every other backend."""
    return _checked(op, _reference_impl(op))


def _make_cuda_router(op: str):
    # No checks here: each backend the router can pick validates its own arguments (the C++
    # kernels with checks.h, the Triton host functions and checked_reference with _checks),
    # so checking here too would do it twice on every call.
    def route(*args, **kwargs):
        device = _first_tensor_device(args)
        return _resolve_cuda(op, device)(*args, **kwargs)

    route.__name__ = f"{op}_cuda_router"
    return route


_registered = False
_cpu_reference_ops: set[str] = set()


def register_implementations():
    """Give every op a kernel on every device: C++ where built, else the reference; CUDA via the router."""
    global _registered
    if _registered:
        return
    _registered = True
    for op in _ops.op_names():
        qualified = f"lowbit::{op}"
        if not _extension.has_kernel(qualified, "CPU"):
            _ops.LIB.impl(op, checked_reference(op), "CPU")
            _cpu_reference_ops.add(op)
        _ops.LIB.impl(op, _make_cuda_router(op), "CUDA")


def kernel_table() -> list[dict]:
    """Per op: which backends implement it here (used by `lowbit info` and docs)."""
    rows = []
    tk = triton_kernels()
    for op in _ops.op_names():
        rows.append({
            "op": op,
            "cpu": "reference" if op in _cpu_reference_ops else "C++",
            "cuda": ("built, " + ("verified" if verified.any_verified("cuda", op) else "unverified"))
            if _cuda_cpp_impl(op) is not None else "not built",
            "triton": "yes" if tk is not None and op in tk.KERNELS else ("not installed" if tk is None else "no"),
            "reference": "yes",
        })
    return rows


class _CallableModule(types.ModuleType):
    """`lowbit.backends()` lists the backends; `lowbit.backends.use(...)` etc. stay module attributes."""

    def __call__(self) -> dict[str, BackendStatus]:
        return backends()


sys.modules[__name__].__class__ = _CallableModule
