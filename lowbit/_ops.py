"""Every lowbit op schema, defined once, beside its fake (meta) kernel.

This file is the registry. C++ and Triton code only *implement* the ops declared here:

* ``csrc/cpu/<family>.cpp`` registers CPU kernels with ``TORCH_LIBRARY_IMPL(lowbit, CPU, m)``.
* ``csrc/cuda/<family>.cu`` registers CUDA C++ kernels for the ``_cuda_<op>`` twin of each op
  (same schema, generated below from the same string). They are reached through the CUDA
  router in :mod:`lowbit.backends`, which picks CUDA C++, Triton or the reference per the
  documented selection rule (docs/ops.md, "Backend selection").
* Where a backend is missing (extension not built, no Triton) :mod:`lowbit.backends`
  registers the pure-torch reference so that every op always has a kernel.

The fake kernels validate arguments with the same checks as the real kernels
(:mod:`lowbit._checks`), so a bad call fails identically under ``torch.compile``.
"""

from __future__ import annotations

import torch

from . import _checks

LIB = torch.library.Library("lowbit", "FRAGMENT")

#: public op name -> schema (arguments and returns, without the name)
SCHEMAS: dict[str, str] = {}

CUDA_TWIN_PREFIX = "_cuda_"


def _define(name: str, schema: str, *, cuda_twin: bool = True):
    """Declare ``lowbit::<name>`` (and its CUDA C++ twin) and return a decorator for its fake."""
    SCHEMAS[name] = schema
    LIB.define(name + schema)
    if cuda_twin:
        LIB.define(CUDA_TWIN_PREFIX + name + schema)

    def register_fake(fn):
        torch.library.register_fake(f"lowbit::{name}", fn, lib=LIB)
        if cuda_twin:
            torch.library.register_fake(f"lowbit::{CUDA_TWIN_PREFIX}{name}", fn, lib=LIB)
        return fn

    return register_fake


# --------------------------------------------------------------------------- INT8
@_define("int8_quantize_dynamic", "(Tensor x, bool per_row=True) -> (Tensor q, Tensor scale)")
def _int8_quantize_dynamic_fake(x, per_row=True):
    _checks.int8_quantize_dynamic("int8_quantize_dynamic", x)
    scale_shape = x.shape[:-1] if per_row else ()
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(scale_shape, dtype=torch.float32)


@_define("int8_quantize_static", "(Tensor x, Tensor scale) -> Tensor")
def _int8_quantize_static_fake(x, scale):
    _checks.int8_quantize_static("int8_quantize_static", x, scale)
    return x.new_empty(x.shape, dtype=torch.int8)


@_define("int8_mm", "(Tensor a, Tensor b) -> Tensor")
def _int8_mm_fake(a, b):
    M, N = _checks.int8_mm("int8_mm", a, b)
    return a.new_empty((M, N), dtype=torch.int32)


@_define(
    "int8_scaled_mm",
    "(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
)
def _int8_scaled_mm_fake(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.int8_scaled_mm("int8_scaled_mm", a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((M, N), dtype=out_dtype)


@_define("int8_weight_only_mm", "(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor")
def _int8_weight_only_mm_fake(x, w, scale, bias=None):
    M, N = _checks.int8_weight_only_mm("int8_weight_only_mm", x, w, scale, bias)
    return x.new_empty((M, N), dtype=x.dtype)


# --------------------------------------------------------------------------- INT4
@_define(
    "int4_weight_only_mm",
    "(Tensor x, Tensor packed_w, Tensor scale, Tensor? zero, int group_size, Tensor? bias=None) -> Tensor",
)
def _int4_weight_only_mm_fake(x, packed_w, scale, zero, group_size, bias=None):
    M, N = _checks.int4_weight_only_mm("int4_weight_only_mm", x, packed_w, scale, zero, group_size, bias)
    return x.new_empty((M, N), dtype=x.dtype)


# --------------------------------------------------------------------------- FP8
def _fp8_scale_shape(x, granularity):
    K = x.shape[-1]
    kb = (K + _checks.FP8_BLOCK - 1) // _checks.FP8_BLOCK
    if granularity == "tensor":
        return ()
    if granularity == "row":
        return tuple(x.shape[:-1])
    if granularity == "block1x128":
        return (*x.shape[:-1], kb)
    return ((x.shape[0] + _checks.FP8_BLOCK - 1) // _checks.FP8_BLOCK, kb)


@_define(
    "fp8_quantize_dynamic",
    "(Tensor x, str format=\"e4m3\", str granularity=\"row\", bool saturate=True) -> (Tensor q, Tensor scale)",
)
def _fp8_quantize_dynamic_fake(x, format="e4m3", granularity="row", saturate=True):
    _checks.fp8_quantize_dynamic("fp8_quantize_dynamic", x, format, granularity, saturate)
    q = x.new_empty(x.shape, dtype=_checks.FP8_FORMATS[format])
    return q, x.new_empty(_fp8_scale_shape(x, granularity), dtype=torch.float32)


@_define("fp8_quantize_static", "(Tensor x, Tensor scale, str format=\"e4m3\", bool saturate=True) -> Tensor")
def _fp8_quantize_static_fake(x, scale, format="e4m3", saturate=True):
    _checks.fp8_quantize_static("fp8_quantize_static", x, scale, format, saturate)
    return x.new_empty(x.shape, dtype=_checks.FP8_FORMATS[format])


@_define(
    "fp8_scaled_mm",
    "(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
)
def _fp8_scaled_mm_fake(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.fp8_scaled_mm("fp8_scaled_mm", a, b, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((M, N), dtype=out_dtype)


@_define("fp8_weight_only_mm", "(Tensor x, Tensor w, Tensor scale, Tensor? bias=None) -> Tensor")
def _fp8_weight_only_mm_fake(x, w, scale, bias=None):
    M, N = _checks.fp8_weight_only_mm("fp8_weight_only_mm", x, w, scale, bias)
    return x.new_empty((M, N), dtype=x.dtype)


# --------------------------------------------------------------------------- binary
@_define("binary_quantize", "(Tensor x) -> (Tensor packed, Tensor scale)")
def _binary_quantize_fake(x):
    M, words = _checks.binary_quantize("binary_quantize", x)
    return x.new_empty((M, words), dtype=torch.int32), x.new_empty((M,), dtype=torch.float32)


@_define("binary_mm", "(Tensor a, Tensor b, int K) -> Tensor")
def _binary_mm_fake(a, b, K):
    M, N = _checks.binary_mm("binary_mm", a, b, K)
    return a.new_empty((M, N), dtype=torch.int32)


@_define(
    "binary_scaled_mm",
    "(Tensor a, Tensor b, int K, Tensor scale_a, Tensor scale_b, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
)
def _binary_scaled_mm_fake(a, b, K, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.binary_scaled_mm("binary_scaled_mm", a, b, K, scale_a, scale_b, bias, out_dtype)
    return a.new_empty((M, N), dtype=out_dtype)


# --------------------------------------------------------------------------- codebook
@_define("codebook_mm", "(Tensor x, Tensor codes, Tensor codebooks, Tensor? scale=None, Tensor? bias=None) -> Tensor")
def _codebook_mm_fake(x, codes, codebooks, scale=None, bias=None):
    M, N = _checks.codebook_mm("codebook_mm", x, codes, codebooks, scale, bias)
    return x.new_empty((M, N), dtype=x.dtype)


@_define(
    "codebook_dequant",
    "(Tensor codes, Tensor codebooks, Tensor? scale, int in_features, ScalarType? out_dtype=None) -> Tensor",
)
def _codebook_dequant_fake(codes, codebooks, scale, in_features, out_dtype=None):
    N, out_dtype = _checks.codebook_dequant("codebook_dequant", codes, codebooks, scale, in_features, out_dtype)
    return codebooks.new_empty((N, in_features), dtype=out_dtype)


def op_names() -> list[str]:
    """The public ops, in registration order."""
    return list(SCHEMAS)


# --------------------------------------------------------------------------- SPARSE24
@_define("sparse24_mm", "(Tensor x, Tensor values, Tensor meta, Tensor? scale=None, Tensor? bias=None) -> Tensor")
def _sparse24_mm_fake(x, values, meta, scale=None, bias=None):
    M, N = _checks.sparse24_mm("sparse24_mm", x, values, meta, scale, bias)
    return x.new_empty((M, N), dtype=x.dtype)


@_define(
    "sparse24_int8_scaled_mm",
    "(Tensor a, Tensor values, Tensor meta, Tensor scale_a, Tensor scale_b, Tensor? bias=None, "
    "ScalarType? out_dtype=None) -> Tensor",
)
def _sparse24_int8_scaled_mm_fake(a, values, meta, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, out_dtype = _checks.sparse24_int8_scaled_mm("sparse24_int8_scaled_mm", a, values, meta, scale_a, scale_b,
                                                      bias, out_dtype)
    return a.new_empty((M, N), dtype=out_dtype)


# ---- int4 cutlass_sm90 (unverified on a GPU: not in backends/verified.py)
@_define(
    "int4_repack_cutlass_sm90",
    "(Tensor packed_w, Tensor scale, Tensor? zero, int group_size, int K, ScalarType dtype) "
    "-> (Tensor packed, Tensor scale_t, Tensor zero_t)",
)
def _int4_repack_cutlass_sm90_fake(packed_w, scale, zero, group_size, K, dtype):
    N, groups = _checks.int4_repack_cutlass_sm90("int4_repack_cutlass_sm90", packed_w, scale, zero, group_size, K,
                                                 dtype)
    return (packed_w.new_empty((N, K // 2)), scale.new_empty((groups, N), dtype=dtype),
            scale.new_empty((groups, N), dtype=dtype))


@_define(
    "int4_cutlass_sm90_mm",
    "(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size, Tensor? bias=None) -> Tensor",
)
def _int4_cutlass_sm90_mm_fake(x, packed, scale, zero, group_size, bias=None):
    M, N = _checks.int4_cutlass_sm90_mm("int4_cutlass_sm90_mm", x, packed, scale, zero, group_size, bias)
    return x.new_empty((M, N), dtype=x.dtype)
