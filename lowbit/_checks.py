"""Argument checks at the op boundary, shared by the fake kernels and the Python backends.

The C++ kernels apply the same checks (csrc/include/lowbit/checks.h) with the same
messages, so every backend rejects a bad call with a ValueError that names the op, the
argument and the constraint. Kernels then trust their inputs.

Each check returns the sizes the caller needs (M, N, ...), so shape logic lives here once.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = FLOAT_DTYPES

# K * 128 * 128 must stay below 2**31 so that int32 accumulation of int8 products can never
# overflow, whatever the values: this is what makes the int8 kernels exact.
INT8_MAX_K = (2**31 - 1) // (128 * 128)


class LowbitArgumentError(ValueError):
    """A lowbit op was called with an argument that breaks its contract."""


def fail(op: str, message: str):
    raise LowbitArgumentError(f"lowbit.{op}: {message}")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def tensor(op: str, name: str, t, *, dtypes=None, dim=None, min_dim=None):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, f"{name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        fail(op, f"{name} must be {dim}-D, got shape {_shape(t)}")
    if min_dim is not None and t.dim() < min_dim:
        fail(op, f"{name} must have at least {min_dim} dimension(s), got shape {_shape(t)}")


def same_device(op: str, **tensors):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device")


def nonempty(op: str, name: str, t: torch.Tensor):
    if t.numel() == 0:
        fail(op, f"{name} must not have a zero-sized dimension, got shape {_shape(t)}")


def scale_vector(op: str, name: str, s, length: int, length_name: str, *, dtypes=(torch.float32,)):
    """A scale is a scalar (shape [] or [1]) or one value per row/column (shape [length])."""
    tensor(op, name, s, dtypes=dtypes)
    if s.dim() == 0 or (s.dim() == 1 and s.shape[0] in (1, length)):
        return
    fail(op, f"{name} must have shape [{length_name}]=[{length}] or be a scalar ([] or [1]), got {_shape(s)}")


def out_dtype_arg(op: str, out_dtype):
    if out_dtype is None:
        return torch.float32
    if out_dtype not in OUT_DTYPES:
        fail(op, f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    return out_dtype


def int8_k(op: str, K: int):
    if K > INT8_MAX_K:
        fail(op, f"K={K} exceeds {INT8_MAX_K}, beyond which int32 accumulation could overflow")


# --------------------------------------------------------------------------- INT8
def int8_quantize_dynamic(op, x, per_row=True):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    nonempty(op, "x", x)


def int8_quantize_static(op, x, scale):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    nonempty(op, "x", x)
    rows = x.numel() // x.shape[-1]
    tensor(op, "scale", scale, dtypes=(torch.float32,))
    same_device(op, x=x, scale=scale)
    ok = scale.numel() == 1 and scale.dim() <= 1
    ok = ok or tuple(scale.shape) == tuple(x.shape[:-1])
    if not ok:
        fail(op, f"scale must be a scalar ([] or [1]) or have shape x.shape[:-1]={list(x.shape[:-1])} "
                 f"(one scale per row of {rows}), got {_shape(scale)}")


def int8_mm(op, a, b):
    tensor(op, "a", a, dtypes=(torch.int8,), dim=2)
    tensor(op, "b", b, dtypes=(torch.int8,), dim=2)
    same_device(op, a=a, b=b)
    if a.shape[1] != b.shape[1]:
        fail(op, f"a is [M, K]={_shape(a)} and b is [N, K]={_shape(b)}: their K must match")
    nonempty(op, "a", a)
    nonempty(op, "b", b)
    int8_k(op, a.shape[1])
    return a.shape[0], b.shape[0]


def bias_arg(op, bias, N, device_ref, ref_name):
    if bias is None:
        return
    tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, dim=1)
    if bias.shape[0] != N:
        fail(op, f"bias must have shape [N]=[{N}], got {_shape(bias)}")
    same_device(op, **{ref_name: device_ref, "bias": bias})


def int8_scaled_mm(op, a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N = int8_mm(op, a, b)
    scale_vector(op, "scale_a", scale_a, M, "M")
    scale_vector(op, "scale_b", scale_b, N, "N")
    same_device(op, a=a, scale_a=scale_a, scale_b=scale_b)
    bias_arg(op, bias, N, a, "a")
    return M, N, out_dtype_arg(op, out_dtype)


def int8_weight_only_mm(op, x, w, scale, bias=None):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    tensor(op, "w", w, dtypes=(torch.int8,), dim=2)
    same_device(op, x=x, w=w)
    if x.shape[1] != w.shape[1]:
        fail(op, f"x is [M, K]={_shape(x)} and w is [N, K]={_shape(w)}: their K must match")
    nonempty(op, "x", x)
    nonempty(op, "w", w)
    N = w.shape[0]
    tensor(op, "scale", scale, dtypes=FLOAT_DTYPES, dim=1)
    if scale.shape[0] != N:
        fail(op, f"scale must have shape [N]=[{N}], got {_shape(scale)}")
    same_device(op, x=x, scale=scale)
    bias_arg(op, bias, N, x, "x")
    return x.shape[0], N


# --------------------------------------------------------------------------- INT4
INT4_GROUP_SIZES = (32, 64, 128)


def int4_weight_only_mm(op, x, packed_w, scale, zero, group_size, bias=None):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    tensor(op, "packed_w", packed_w, dtypes=(torch.uint8,), dim=2)
    same_device(op, x=x, packed_w=packed_w)
    nonempty(op, "x", x)
    nonempty(op, "packed_w", packed_w)
    K, N = x.shape[1], packed_w.shape[0]
    if group_size not in INT4_GROUP_SIZES and group_size != K:
        fail(op, f"group_size must be 32, 64, 128 or K={K} (per channel), got {group_size}")
    row_bytes = (K + 31) // 32 * 16
    if packed_w.shape[1] != row_bytes:
        fail(op, f"packed_w must have shape [N, ceil(K/32)*16]=[{N}, {row_bytes}] for K={K}, got {_shape(packed_w)}")
    groups = (K + group_size - 1) // group_size
    tensor(op, "scale", scale, dtypes=FLOAT_DTYPES, dim=2)
    if tuple(scale.shape) != (N, groups):
        fail(op, f"scale must have shape [N, ceil(K/group_size)]=[{N}, {groups}], got {_shape(scale)}")
    same_device(op, x=x, scale=scale)
    if zero is not None:
        tensor(op, "zero", zero, dtypes=(scale.dtype,), dim=2)
        if tuple(zero.shape) != (N, groups):
            fail(op, f"zero must have shape [N, ceil(K/group_size)]=[{N}, {groups}], got {_shape(zero)}")
        same_device(op, x=x, zero=zero)
    bias_arg(op, bias, N, x, "x")
    return x.shape[0], N


# --------------------------------------------------------------------------- FP8
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_DTYPES = tuple(FP8_FORMATS.values())
# Scales come in blocks of 128 along K (and along N for 128x128 weight blocks), DeepSeek-style.
FP8_BLOCK = 128
#: largest finite value of each format (the saturation bound)
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def fp8_format(op, format):
    if format not in FP8_FORMATS:
        fail(op, f"format must be 'e4m3' or 'e5m2', got '{format}'")


def fp8_quantize_dynamic(op, x, format="e4m3", granularity="row", saturate=True):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    nonempty(op, "x", x)
    fp8_format(op, format)
    if granularity not in FP8_GRANULARITIES:
        fail(op, f"granularity must be 'tensor', 'row', 'block1x128' or 'block128x128', got '{granularity}'")
    if granularity == "block128x128" and x.dim() != 2:
        fail(op, f"x must be 2-D for granularity 'block128x128', got shape {_shape(x)}")


def fp8_quantize_static(op, x, scale, format="e4m3", saturate=True):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1)
    nonempty(op, "x", x)
    fp8_format(op, format)
    tensor(op, "scale", scale, dtypes=(torch.float32,))
    same_device(op, x=x, scale=scale)
    rows = list(x.shape[:-1])
    blocks = rows + [_cdiv(x.shape[-1], FP8_BLOCK)]
    if (scale.numel() == 1 and scale.dim() <= 1) or _shape(scale) in (rows, blocks):
        return
    fail(op, f"scale must be a scalar ([] or [1]), have shape x.shape[:-1]={rows} (per row) or "
             f"x.shape[:-1]+[ceil(K/128)]={blocks} (per 1x128 block), got {_shape(scale)}")


def fp8_operand(op, name, t):
    tensor(op, name, t, dtypes=FP8_DTYPES, dim=2)


def _fp8_mm_shapes(op, a, b, a_name="a", b_name="b"):
    same_device(op, **{a_name: a, b_name: b})
    if a.shape[1] != b.shape[1]:
        fail(op, f"{a_name} is [M, K]={_shape(a)} and {b_name} is [N, K]={_shape(b)}: their K must match")
    nonempty(op, a_name, a)
    nonempty(op, b_name, b)
    return a.shape[0], b.shape[0], a.shape[1]


def fp8_scaled_mm(op, a, b, scale_a, scale_b, bias=None, out_dtype=None):
    fp8_operand(op, "a", a)
    fp8_operand(op, "b", b)
    M, N, K = _fp8_mm_shapes(op, a, b)
    tensor(op, "scale_a", scale_a, dtypes=(torch.float32,))
    tensor(op, "scale_b", scale_b, dtypes=(torch.float32,))
    same_device(op, a=a, scale_a=scale_a, scale_b=scale_b)
    kb = _cdiv(K, FP8_BLOCK)
    if scale_a.dim() == 2 or scale_b.dim() == 2:
        # Block scaling: both operands, or the scale shapes would be ambiguous.
        if _shape(scale_a) != [M, kb]:
            fail(op, f"scale_a must have shape [M, ceil(K/128)]=[{M}, {kb}] for block scaling, got {_shape(scale_a)}")
        if _shape(scale_b) != [_cdiv(N, FP8_BLOCK), kb]:
            fail(op, f"scale_b must have shape [ceil(N/128), ceil(K/128)]=[{_cdiv(N, FP8_BLOCK)}, {kb}] "
                     f"for block scaling, got {_shape(scale_b)}")
    else:
        scale_vector(op, "scale_a", scale_a, M, "M")
        scale_vector(op, "scale_b", scale_b, N, "N")
    bias_arg(op, bias, N, a, "a")
    return M, N, out_dtype_arg(op, out_dtype)


def fp8_weight_only_mm(op, x, w, scale, bias=None):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    fp8_operand(op, "w", w)
    M, N, K = _fp8_mm_shapes(op, x, w, "x", "w")
    tensor(op, "scale", scale, dtypes=(torch.float32,))
    same_device(op, x=x, scale=scale)
    blocks = [_cdiv(N, FP8_BLOCK), _cdiv(K, FP8_BLOCK)]
    if not ((scale.numel() == 1 and scale.dim() <= 1) or _shape(scale) in ([N], blocks)):
        fail(op, f"scale must be a scalar ([] or [1]), have shape [N]=[{N}] (per channel) or "
                 f"[ceil(N/128), ceil(K/128)]={blocks} (per 128x128 block), got {_shape(scale)}")
    bias_arg(op, bias, N, x, "x")
    return M, N


# --------------------------------------------------------------------------- binary
# Format: lowbit/formats/binary.py (sign bits, 1 = +1, LSB-first in int32 words along K).
BINARY_WORD_BITS = 32
# |dot| <= K must fit int32, and so must K itself on every backend.
BINARY_MAX_K = 2**31 - 1


def binary_k(op, K):
    if K < 1 or K > BINARY_MAX_K:
        fail(op, f"K must be an int in [1, {BINARY_MAX_K}], got {K}")
    return _cdiv(K, BINARY_WORD_BITS)


def binary_packed(op, name, t, rows_name, K, words):
    tensor(op, name, t, dtypes=(torch.int32,), dim=2)
    if t.shape[1] != words:
        fail(op, f"{name} must have shape [{rows_name}, ceil(K/32)]=[{t.shape[0]}, {words}] for K={K}, "
                 f"got {_shape(t)}")
    nonempty(op, name, t)


def binary_mm(op, a, b, K):
    words = binary_k(op, K)
    binary_packed(op, "a", a, "M", K, words)
    binary_packed(op, "b", b, "N", K, words)
    same_device(op, a=a, b=b)
    return a.shape[0], b.shape[0]


def binary_scaled_mm(op, a, b, K, scale_a, scale_b, bias=None, out_dtype=None):
    M, N = binary_mm(op, a, b, K)
    scale_vector(op, "scale_a", scale_a, M, "M")
    scale_vector(op, "scale_b", scale_b, N, "N")
    same_device(op, a=a, scale_a=scale_a, scale_b=scale_b)
    bias_arg(op, bias, N, a, "a")
    return M, N, out_dtype_arg(op, out_dtype)


def binary_quantize(op, x):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    nonempty(op, "x", x)
    return x.shape[0], _cdiv(x.shape[1], BINARY_WORD_BITS)


# --------------------------------------------------------------------------- SPARSE24
# Format: lowbit/formats/sparse24.py (values [N, Kp/2], meta uint8 [N, Kp/8], Kp = ceil(K/16)*16).
SPARSE24_K_ALIGN = 16
SPARSE24_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
#: the 6 valid metadata nibbles (two 2-bit column indices, strictly increasing)
SPARSE24_VALID_NIBBLES = (0x4, 0x8, 0x9, 0xC, 0xD, 0xE)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


#: ValidationCache tag (csrc/include/lowbit/sparse24_layout.h, kMetaNibblesValid)
SPARSE24_META_TAG = "sparse24.meta"


def sparse24_meta_data(op, meta):
    """Data check: every nibble names two distinct columns in increasing order (skipped for fake tensors).

    Once per meta tensor version where lowbit._C is built (lowbit/validation_cache.py): on CUDA
    the scan ends in a sync, which the Triton backend would otherwise pay on every call."""
    if _is_fake(meta):
        return
    from .validation_cache import check_once

    check_once(meta, SPARSE24_META_TAG, lambda: _sparse24_meta_scan(op, meta))


def _sparse24_meta_scan(op, meta):
    if meta.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"lowbit.{op}: meta has not been validated in its current state (new, modified in place, an inference "
            "tensor, or the validation cache was cleared or disabled), and validating it needs a device sync, which "
            "CUDA-graph capture forbids: run the op once with this meta before capturing")
    table = torch.zeros(16, dtype=torch.bool, device=meta.device)
    table[list(SPARSE24_VALID_NIBBLES)] = True
    m = meta.to(torch.int64)
    ok = table[m & 0xF] & table[m >> 4]
    if bool(ok.all()):
        return
    r, b = (int(v) for v in (~ok).nonzero()[0])
    fail(op, f"meta[{r}, {b}]=0x{int(meta[r, b]):02x} holds a group whose two 2-bit column indices are not "
             f"strictly increasing (valid nibbles: 0x4, 0x8, 0x9, 0xc, 0xd, 0xe)")


def _sparse24_weight(op, K, values, meta, ref, ref_name):
    tensor(op, "values", values, dtypes=SPARSE24_VALUE_DTYPES, dim=2)
    tensor(op, "meta", meta, dtypes=(torch.uint8,), dim=2)
    same_device(op, **{ref_name: ref, "values": values, "meta": meta})
    nonempty(op, "values", values)
    N = values.shape[0]
    Kp = _cdiv(K, SPARSE24_K_ALIGN) * SPARSE24_K_ALIGN
    if values.shape[1] != Kp // 2:
        fail(op, f"values must have shape [N, ceil(K/16)*8]=[{N}, {Kp // 2}] for K={K}, got {_shape(values)}")
    if _shape(meta) != [N, Kp // 8]:
        fail(op, f"meta must have shape [N, ceil(K/16)*2]=[{N}, {Kp // 8}] for K={K}, got {_shape(meta)}")
    return N


def sparse24_mm(op, x, values, meta, scale=None, bias=None):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    nonempty(op, "x", x)
    N = _sparse24_weight(op, x.shape[1], values, meta, x, "x")
    if scale is None:
        if values.dtype == torch.int8:
            fail(op, "scale (float32 [N]) is required when values are int8")
    else:
        tensor(op, "scale", scale, dtypes=(torch.float32,), dim=1)
        if scale.shape[0] != N:
            fail(op, f"scale must have shape [N]=[{N}], got {_shape(scale)}")
        same_device(op, x=x, scale=scale)
    bias_arg(op, bias, N, x, "x")
    sparse24_meta_data(op, meta)
    return x.shape[0], N


def sparse24_int8_scaled_mm(op, a, values, meta, scale_a, scale_b, bias=None, out_dtype=None):
    tensor(op, "a", a, dtypes=(torch.int8,), dim=2)
    nonempty(op, "a", a)
    N = _sparse24_weight(op, a.shape[1], values, meta, a, "a")
    if values.dtype != torch.int8:
        fail(op, f"values must have dtype int8, got {str(values.dtype).replace('torch.', '')}")
    int8_k(op, a.shape[1])
    M = a.shape[0]
    scale_vector(op, "scale_a", scale_a, M, "M")
    scale_vector(op, "scale_b", scale_b, N, "N")
    same_device(op, a=a, scale_a=scale_a, scale_b=scale_b)
    bias_arg(op, bias, N, a, "a")
    out_dtype = out_dtype_arg(op, out_dtype)
    sparse24_meta_data(op, meta)
    return M, N, out_dtype


# --------------------------------------------------------------------------- codebook
# Format: lowbit/formats/codebook.py. codebooks [R, G, C, 2**bits, d]; packed codes uint8
# [N, ceil(J*C*bits/8)], J = K/d. E == 2**bits makes every packed code in range, so these O(1)
# shape checks are all a kernel needs.
CODEBOOK_DIMS = (1, 2, 4, 8)
CODEBOOK_MAX_BITS = 16


def codebook_args(op, codes, codebooks, scale, K, ref, ref_name):
    """Checks shared by codebook_mm and codebook_dequant; returns (N, R, G, C, bits, d)."""
    tensor(op, "codes", codes, dtypes=(torch.uint8,), dim=2)
    tensor(op, "codebooks", codebooks, dtypes=FLOAT_DTYPES, dim=5)
    same_device(op, **{ref_name: ref, "codes": codes, "codebooks": codebooks})
    nonempty(op, "codes", codes)
    nonempty(op, "codebooks", codebooks)
    R, G, C, E, d = codebooks.shape
    if E < 2 or E > 2**CODEBOOK_MAX_BITS or E & (E - 1):
        fail(op, f"codebooks must have 2**bits entries (bits 1..{CODEBOOK_MAX_BITS}) in dim 3, got shape "
                 f"{_shape(codebooks)}")
    bits = E.bit_length() - 1
    if d not in CODEBOOK_DIMS:
        fail(op, f"codebooks must have a sub-vector dimension (dim 4) of 1, 2, 4 or 8, got shape {_shape(codebooks)}")
    if K % d:
        k_name = "x" if ref_name == "x" else "in_features"
        fail(op, f"{k_name} must have K a multiple of the sub-vector dimension d={d}, got K={K}")
    J = K // d
    if J % G:
        fail(op, f"codebooks has G={G} column groups, which must divide the J=K/d={J} sub-vectors per row")
    N = codes.shape[0]
    if N % R:
        fail(op, f"codebooks has R={R} row groups, which must divide N={N}")
    nbytes = (J * C * bits + 7) // 8
    if codes.shape[1] != nbytes:
        fail(op, f"codes must have shape [N, ceil(J*C*bits/8)]=[{N}, {nbytes}] for J={J}, C={C}, bits={bits}, "
                 f"got {_shape(codes)}")
    if scale is not None:
        tensor(op, "scale", scale, dtypes=FLOAT_DTYPES, dim=1)
        if scale.shape[0] != N:
            fail(op, f"scale must have shape [N]=[{N}], got {_shape(scale)}")
        same_device(op, **{ref_name: ref, "scale": scale})
    return N, R, G, C, bits, d


def codebook_mm(op, x, codes, codebooks, scale=None, bias=None):
    tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    nonempty(op, "x", x)
    N, *_ = codebook_args(op, codes, codebooks, scale, x.shape[1], x, "x")
    bias_arg(op, bias, N, x, "x")
    return x.shape[0], N


def codebook_dequant(op, codes, codebooks, scale, in_features, out_dtype=None):
    if in_features < 1:
        fail(op, f"in_features must be positive, got {in_features}")
    N, *_ = codebook_args(op, codes, codebooks, scale, in_features, codes, "codes")
    return N, out_dtype_arg(op, out_dtype)


# ---- int4 cutlass_sm90 (layout: lowbit/formats/int4.py, "cutlass_sm90 layout")
INT4_SM90_GROUP_SIZES = (64, 128)
INT4_SM90_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def int4_sm90_shape(op, N, K, group_size):
    """The shapes CUTLASS's sm_90 mixed-input GEMM takes: K % 32, N % 8, groups of 64, 128 or K."""
    if K < 1 or K % 32 != 0:
        fail(op, f"K must be a positive multiple of 32 (16-byte rows of int4 for TMA), got K={K}")
    if N % 8 != 0:
        fail(op, f"N must be a multiple of 8 (16-byte rows of scale, zero and output), got N={N}")
    if group_size not in INT4_SM90_GROUP_SIZES and group_size != K:
        fail(op, f"group_size must be 64, 128 or K={K} (a multiple of the kernel's K tile of 64, or one "
                 f"group per row), got {group_size}")
    return (K + group_size - 1) // group_size


def int4_repack_cutlass_sm90(op, packed_w, scale, zero, group_size, K, dtype):
    tensor(op, "packed_w", packed_w, dtypes=(torch.uint8,), dim=2)
    nonempty(op, "packed_w", packed_w)
    if dtype not in INT4_SM90_DTYPES:
        fail(op, f"dtype must be float16 or bfloat16, got {_dtype_name(dtype)}")
    N = packed_w.shape[0]
    groups = int4_sm90_shape(op, N, K, group_size)
    if packed_w.shape[1] != K // 2:
        fail(op, f"packed_w must have shape [N, K/2]=[{N}, {K // 2}] for K={K}, got {_shape(packed_w)}")
    tensor(op, "scale", scale, dtypes=FLOAT_DTYPES, dim=2)
    if tuple(scale.shape) != (N, groups):
        fail(op, f"scale must have shape [N, ceil(K/group_size)]=[{N}, {groups}], got {_shape(scale)}")
    same_device(op, packed_w=packed_w, scale=scale)
    if zero is not None:
        tensor(op, "zero", zero, dtypes=(scale.dtype,), dim=2)
        if tuple(zero.shape) != (N, groups):
            fail(op, f"zero must have shape [N, ceil(K/group_size)]=[{N}, {groups}], got {_shape(zero)}")
        same_device(op, packed_w=packed_w, zero=zero)
    return N, groups


def int4_cutlass_sm90_mm(op, x, packed, scale, zero, group_size, bias=None):
    tensor(op, "x", x, dtypes=INT4_SM90_DTYPES, dim=2)
    tensor(op, "packed", packed, dtypes=(torch.uint8,), dim=2)
    same_device(op, x=x, packed=packed)
    nonempty(op, "x", x)
    nonempty(op, "packed", packed)
    K, N = x.shape[1], packed.shape[0]
    groups = int4_sm90_shape(op, N, K, group_size)
    if packed.shape[1] != K // 2:
        fail(op, f"packed must have shape [N, K/2]=[{N}, {K // 2}] for K={K}, got {_shape(packed)}")
    for name, t in (("scale", scale), ("zero", zero)):
        tensor(op, name, t, dtypes=(x.dtype,), dim=2)
        if tuple(t.shape) != (groups, N):
            fail(op, f"{name} must have shape [ceil(K/group_size), N]=[{groups}, {N}], got {_shape(t)}")
        same_device(op, **{"x": x, name: t})
    bias_arg(op, bias, N, x, "x")
    return x.shape[0], N
