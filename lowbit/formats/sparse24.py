"""The 2:4 structured-sparse weight format, defined once: used by the pruner, the kernels and
Sparse24Linear.

Sparsity
    Along K, every group of 4 consecutive columns (``4g .. 4g+3``) of an [N, K] weight keeps at
    most 2 nonzeros (2:4, what NVIDIA's sparse tensor cores run). The pruner
    (:mod:`lowbit.quant.nm_prune`) also produces 1:4, 4:8 and general N:M masks; 1:4 and any
    pattern with at most 2 nonzeros per group of 4 compress into this format.

Padding
    K is padded with zero columns to ``Kp = ceil(K / 16) * 16`` (16 columns = 8 kept values = 4
    groups = one uint16 of metadata: one AVX2 vector of values per metadata word). The
    padding columns hold weight 0, and kernels never read activations beyond K (they pair the
    padding with zeros), so padding cannot change a result.

values: ``[N, Kp / 2]``, float32/float16/bfloat16, or int8 with a float32 per-channel
    ``scale [N]`` (``w[n, k] = values * scale[n]``; the 2:4 + INT8 composition). For group ``g``,
    ``values[n, 2g]`` and ``values[n, 2g + 1]`` are the kept entries in increasing column order.

meta: uint8 ``[N, Kp / 8]``, 4 bits per group, two groups per byte. Group ``g`` is the low
    nibble (``g`` even) or the high nibble (``g`` odd) of byte ``g // 2``. In the nibble, bits 0-1
    hold ``i0`` and bits 2-3 hold ``i1``: the columns ``4g + i0`` and ``4g + i1`` of the two kept
    values, with ``i0 < i1`` (so 6 of the 16 nibble values are valid: 0x4, 0x8, 0x9, 0xC, 0xD,
    0xE). Any other nibble is bad metadata, refused by every op. A kept value may be 0 (a group
    with fewer than 2 nonzeros still names 2 distinct columns).

    Read as little-endian uint16 words, ``meta`` is exactly the per-row metadata that the
    ``mma.sp`` instructions and CUTLASS's SparseGemm take *before* their reordering (4 groups
    per 16 bits for 16-bit values, 8 groups per 32 bits for int8): :func:`to_cutlass_meta`
    applies the ColumnMajorInterleaved<2> reordering (CUTLASS ``reorder_meta``) that the
    tensor-core kernels read; :func:`from_cutlass_meta` undoes it.

Bytes per weight: values ``bits/2``, metadata 1 bit (plus 32/K for an int8 scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROUP = 4        # M of 2:4
KEEP = 2         # N of 2:4
K_ALIGN = 16     # padding unit along K (one uint16 metadata word)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
FLOAT_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: nibble -> is it valid metadata (i0 < i1)
VALID_NIBBLES = tuple(((v & 3) < (v >> 2)) for v in range(16))


def padded_k(K: int) -> int:
    return math.ceil(K / K_ALIGN) * K_ALIGN


def _fail(msg: str):
    raise ValueError(f"lowbit.formats.sparse24: {msg}")


def valid_nibble_table(device=None) -> torch.Tensor:
    return torch.tensor(VALID_NIBBLES, dtype=torch.bool, device=device)


def meta_is_valid(meta: torch.Tensor) -> bool:
    """True iff every nibble of `meta` names two distinct columns in increasing order."""
    table = valid_nibble_table(meta.device)
    m = meta.to(torch.int64)
    return bool((table[m & 0xF] & table[m >> 4]).all())


@dataclass
class Sparse24Weight:
    values: torch.Tensor            # [N, Kp/2] float32/float16/bfloat16/int8
    meta: torch.Tensor              # uint8 [N, Kp/8]
    in_features: int                # K (real, unpadded)
    scale: torch.Tensor | None = None  # float32 [N] for int8 values

    def __post_init__(self):
        validate(self.values, self.meta, self.in_features, self.scale)

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def nbytes(self) -> int:
        n = self.values.numel() * self.values.element_size() + self.meta.numel()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def bits_per_weight(self) -> float:
        """Storage per real weight of the dense [N, K] matrix, metadata, scales and padding included."""
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)


def validate(values, meta, K: int, scale=None, check_data: bool = True) -> None:
    if not isinstance(values, torch.Tensor) or values.dtype not in VALUE_DTYPES or values.dim() != 2:
        _fail(f"values must be a 2-D float32/float16/bfloat16/int8 tensor, got "
              f"{getattr(values, 'dtype', type(values).__name__)} {list(getattr(values, 'shape', []))}")
    N, Kp = values.shape[0], padded_k(K)
    if K < 1 or values.shape[1] != Kp // 2:
        _fail(f"values must have shape [N, ceil(K/16)*8]=[{N}, {Kp // 2}] for K={K}, got {list(values.shape)}")
    if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != (N, Kp // 8):
        _fail(f"meta must be uint8 with shape [N, ceil(K/16)*2]=[{N}, {Kp // 8}], got "
              f"{getattr(meta, 'dtype', type(meta).__name__)} {list(getattr(meta, 'shape', []))}")
    if (values.dtype == torch.int8) != (scale is not None):
        _fail("scale (float32 [N]) must be given exactly when values are int8")
    if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != (N,)):
        _fail(f"scale must be float32 with shape [N]=[{N}], got {scale.dtype} {list(scale.shape)}")
    if check_data and meta.device.type != "meta" and not meta_is_valid(meta):
        _fail("meta has a nibble whose two 2-bit indices are not strictly increasing (valid: 0x4, 0x8, 0x9, "
              "0xC, 0xD, 0xE)")


# ----------------------------------------------------------------------------- compress / decompress
def _pad_k(w: torch.Tensor, Kp: int) -> torch.Tensor:
    if w.shape[1] == Kp:
        return w
    out = w.new_zeros((w.shape[0], Kp))
    out[:, : w.shape[1]] = w
    return out


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] mask with <= 2 True per group of 4 -> int64 [N, Kp/4, 2] kept columns per group.

    Groups with fewer than 2 kept entries are filled with the lowest unkept columns (their
    values are then 0), so every group names two distinct columns in increasing order.
    """
    N, K = mask.shape
    Kp = padded_k(K)
    groups = _pad_k(mask, Kp).view(N, Kp // GROUP, GROUP)
    if int(groups.sum(-1).max()) > KEEP:
        _fail("the weight is not 2:4 sparse: a group of 4 columns along K has more than 2 nonzeros")
    # Rank columns: kept first, then by position; the first two (sorted by position) survive.
    pos = torch.arange(GROUP, device=mask.device)
    rank = (~groups).to(torch.int64) * GROUP + pos
    chosen = rank.argsort(dim=-1)[..., :KEEP]
    return chosen.sort(dim=-1).values


def compress(w: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4-sparse [N, K] weight -> (values [N, Kp/2] in w.dtype, meta uint8 [N, Kp/8]).

    `mask` (bool [N, K]) selects the kept entries; by default the nonzeros. Refuses a weight
    with more than 2 kept entries in a group of 4.
    """
    if w.dim() != 2:
        _fail(f"w must be 2-D [N, K], got shape {list(w.shape)}")
    N, K = w.shape
    Kp = padded_k(K)
    mask = (w != 0) if mask is None else mask.to(torch.bool)
    if tuple(mask.shape) != (N, K):
        _fail(f"mask must have shape [N, K]={[N, K]}, got {list(mask.shape)}")
    idx = kept_indices(mask)                                    # [N, Kp/4, 2]
    wp = _pad_k(torch.where(mask, w, torch.zeros_like(w)), Kp).view(N, Kp // GROUP, GROUP)
    values = wp.gather(-1, idx).reshape(N, Kp // 2).contiguous()
    return values, pack_meta(idx)


def pack_meta(idx: torch.Tensor) -> torch.Tensor:
    """int64 [N, G, 2] kept columns per group (G even) -> uint8 [N, G/2] (the documented nibbles)."""
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)    # [N, G]
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()


def unpack_meta(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [N, G/2] -> int64 [N, G, 2] column indices within each group (exact inverse of pack_meta)."""
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(meta.shape[0], -1)   # [N, G]
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def decompress(values: torch.Tensor, meta: torch.Tensor, K: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(values, meta) -> the dense [N, K] weight (in `dtype`, default values.dtype), padding dropped.

    Kept values are scattered to their columns; an invalid nibble with i0 == i1 would add both
    values into one column, which is why the ops refuse such metadata.
    """
    N = values.shape[0]
    Kp = padded_k(K)
    idx = unpack_meta(meta)                                     # [N, Kp/4, 2]
    dtype = dtype or values.dtype
    dense = torch.zeros((N, Kp // GROUP, GROUP), dtype=dtype, device=values.device)
    dense.scatter_add_(-1, idx, values.view(N, Kp // GROUP, KEEP).to(dtype))
    return dense.view(N, Kp)[:, :K].contiguous()


def dense_weight(weight: Sparse24Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float [N, K] weight the kernels multiply by: values (times scale for int8), in `dtype`."""
    w = decompress(weight.values, weight.meta, weight.in_features, torch.float32)
    if weight.scale is not None:
        w = w * weight.scale.to(torch.float32).unsqueeze(1)
    return w.to(dtype)


def from_dense(w: torch.Tensor, mask: torch.Tensor | None = None, values_dtype: torch.dtype | None = None
               ) -> Sparse24Weight:
    """Compress a 2:4-sparse float weight. ``values_dtype=torch.int8``: symmetric per-channel int8 values.

    The int8 scale is taken over the kept values only (``amax / 127`` per row, 1 for an all-zero
    row), with the same rounding as :func:`lowbit.ops.int8_quantize_dynamic`.
    """
    values, meta = compress(w.detach(), mask)
    K = w.shape[1]
    values_dtype = values_dtype or (w.dtype if w.dtype in FLOAT_VALUE_DTYPES else torch.float32)
    if values_dtype not in VALUE_DTYPES:
        _fail(f"values_dtype must be float32, float16, bfloat16 or int8, got {values_dtype}")
    if values_dtype == torch.int8:
        from .. import ops

        q, scale = ops.int8_quantize_dynamic(values.to(torch.float32), per_row=True)
        return Sparse24Weight(q.contiguous(), meta, K, scale.contiguous())
    return Sparse24Weight(values.to(values_dtype).contiguous(), meta, K)


def nbytes(out_features: int, in_features: int, values_dtype: torch.dtype) -> int:
    Kp = padded_k(in_features)
    n = out_features * (Kp // 2) * values_dtype.itemsize + out_features * (Kp // 8)
    if values_dtype == torch.int8:
        n += out_features * 4
    return n


# ----------------------------------------------------------------------------- mma.sp / CUTLASS layout
def _cutlass_meta_params(values_dtype: torch.dtype):
    # One metadata element covers 16 (16-bit values: int16 meta, 4 groups) or 32 (int8 values:
    # int32 meta, 8 groups) columns of K. Rows are reordered in blocks of 32 (int16) or 16 (int32).
    if values_dtype == torch.int8:
        return torch.int32, 32, 16
    return torch.int16, 16, 32


def cutlass_meta_offsets(rows: int, meta_cols: int, values_dtype: torch.dtype, device=None) -> torch.Tensor:
    """int64 [rows * meta_cols]: where element (r, c) of the row-major metadata lands in the reordered
    array (CUTLASS's ``reorder_meta``: rows interleaved in blocks, 2x2 swizzle, ColumnMajorInterleaved<2>).

    The same map is ``lowbit::sparse24_layout::cutlass_meta_offset`` in
    csrc/include/lowbit/sparse24_layout.h (tested against this function).
    """
    meta_dtype, _, group = _cutlass_meta_params(values_dtype)
    interweave = 4 if meta_dtype == torch.int16 else 2
    r = torch.arange(rows, device=device)[:, None].expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device)[None, :].expand(rows, meta_cols)
    dr = r // group * group + (r % 8) * interweave + (r % group) // 8
    topright = ((dr % 2 == 0) & (c % 2 == 1)).to(torch.int64)
    bottomleft = ((dr % 2 == 1) & (c % 2 == 0)).to(torch.int64)
    dr = dr + topright - bottomleft
    dc = c - topright + bottomleft
    return ((dc // 2) * rows * 2 + dr * 2 + dc % 2).reshape(-1)


def to_cutlass_meta(meta: torch.Tensor, values_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """lowbit meta uint8 [N, Kp/8] -> the reordered metadata CUTLASS SparseGemm / mma.sp consume:
    int16 [N, Kp/16] for 16/32-bit values, int32 [N, Kp/32] for int8 values.

    Needs N a multiple of 32 (16 for int8) and, for int8, Kp a multiple of 32: CUTLASS's tiles.
    """
    meta_dtype, cols_per_elem, group = _cutlass_meta_params(values_dtype)
    N, nbytes_row = meta.shape
    Kp = nbytes_row * 8
    if N % group or Kp % cols_per_elem:
        _fail(f"to_cutlass_meta needs N % {group} == 0 and padded K % {cols_per_elem} == 0 for "
              f"{values_dtype} values, got N={N}, Kp={Kp}")
    elems = meta.contiguous().view(meta_dtype)                  # little-endian: group 0 in the low bits
    cols = elems.shape[1]
    out = torch.empty(N * cols, dtype=meta_dtype, device=meta.device)
    out.scatter_(0, cutlass_meta_offsets(N, cols, values_dtype, meta.device), elems.reshape(-1))
    return out.view(N, cols)


def from_cutlass_meta(reordered: torch.Tensor, values_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Inverse of :func:`to_cutlass_meta`: CUTLASS reordered metadata -> lowbit meta uint8 [N, Kp/8]."""
    N, cols = reordered.shape
    offsets = cutlass_meta_offsets(N, cols, values_dtype, reordered.device)
    elems = reordered.reshape(-1).gather(0, offsets).view(N, cols)
    return elems.contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------- torch semi-structured
def semi_structured_available() -> tuple[bool, str]:
    """Whether torch.sparse.to_sparse_semi_structured can run here, and if not, why."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "to_sparse_semi_structured compresses on a CUDA GPU only (no GPU visible)"
    if torch.cuda.get_device_capability() < (8, 0):
        return False, "to_sparse_semi_structured needs sm_80 or newer"
    return True, ""


def to_torch_semi_structured(weight: Sparse24Weight):
    """The weight as torch's SparseSemiStructuredTensor (CUDA, 16-bit or int8 values; int8 without the scale).

    torch compresses on the GPU itself (its CUTLASS or cuSPARSELt layout), from the dense
    matrix, which carries exactly the same 2:4 pattern; the result multiplies like ours.
    """
    ok, why = semi_structured_available()
    if not ok:
        raise RuntimeError(f"lowbit.formats.sparse24.to_torch_semi_structured: {why}")
    if weight.values.device.type != "cuda":
        _fail("to_torch_semi_structured needs the weight on a CUDA device")
    dtype = weight.values.dtype
    dense = decompress(weight.values, weight.meta, weight.in_features, dtype)
    return torch.sparse.to_sparse_semi_structured(dense)


def from_torch_semi_structured(t, values_dtype: torch.dtype | None = None) -> Sparse24Weight:
    """A torch SparseSemiStructuredTensor (or any 2:4-sparse dense tensor) -> Sparse24Weight."""
    dense = t if type(t) is torch.Tensor else t.to_dense()
    return from_dense(dense, values_dtype=values_dtype or dense.dtype)
