"""The codebook weight format, defined once: used by the learners' output, the kernels and CodebookLinear.

Sub-vectors
    A weight ``W`` ``[N, K]`` is cut along K into ``J = K // d`` sub-vectors of dimension ``d``
    (1, 2, 4 or 8; d = 1 is scalar k-means): ``v[n, j] = W[n, j*d:(j+1)*d]``.

Decode (every method is a special case)
    ``W[n, j*d:(j+1)*d] = scale[n] * sum_{c<C} codebooks[r(n), g(j), c, codes[n, j, c], :]``
    with ``r(n) = n // (N // R)`` (R row groups) and ``g(j) = j // (J // G)`` (G column groups).
    scalar k-means: d = 1, C = 1; PQ/OPQ: C = 1, G groups of sub-vectors with their own codebook;
    RQ/AQ (and coarse/fine): C >= 2 codebooks summed; lattice: the lattice points used are
    enumerated into the codebook (one kernel decodes every method). The C terms are summed in
    float32 in order c = 0, 1, ..., then multiplied by ``scale[n]``.

Codebooks ``[R, G, C, E, d]`` float32/float16/bfloat16 with ``E = 2**bits`` exactly, bits in 1..16.

Packing ``packed``: uint8 ``[N, ceil(J*C*bits/8)]``. Per row the ``J*C`` codes in order (j, c), c
    fastest, as a little-endian bit stream: code ``i = j*C + c`` is bits ``[i*bits, (i+1)*bits)``
    of the row, bit 0 = least significant bit of byte 0; trailing bits are 0. Why a plain bit
    stream: one definition serves every width (8 = bytes, 16 = little-endian uint16, 4 = two
    codes per byte, low nibble first), and eight consecutive codes of width <= 4 sit in one
    32-bit word, which AVX2, Triton and CUDA all decode with one variable shift and a mask.

Range safety
    E is exactly 2**bits, so every bit pattern is a valid code: an out-of-range code can only
    exist before packing, and :func:`pack` (hence :class:`CodebookWeight`) refuses it. The ops
    check only shapes and dtypes (O(1)); a kernel can never index past a codebook.

Rotation (OPQ) ``[B, b, b]`` float32, block-diagonal on K (``B * b = K``, b a multiple of d):
    the weight is ``W = W_codes @ blockdiag(rotation)``. It is not folded into the codebooks (it
    mixes sub-vectors); the module multiplies activations by it: ``x_rot = x @ blockdiag(rotation).T``
    and ``x @ W.T = x_rot @ W_codes.T``.

Scale ``[N]`` float32/float16/bfloat16 or None (= 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import CODEBOOK_DIMS, CODEBOOK_MAX_BITS

CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIMS = CODEBOOK_DIMS
MAX_BITS = CODEBOOK_MAX_BITS


def row_bytes(num_codes: int, bits: int) -> int:
    """Bytes of one packed row holding `num_codes` codes of `bits` bits."""
    return (num_codes * bits + 7) // 8


def bits_of(num_entries: int) -> int:
    """bits for a codebook of `num_entries` entries (a power of two), or -1."""
    if num_entries < 2 or num_entries & (num_entries - 1):
        return -1
    return num_entries.bit_length() - 1


def _fail(name: str, msg: str):
    raise ValueError(f"lowbit.formats.codebook: {name} {msg}")


# Rows are packed and unpacked in chunks of about this many codes, bounding the int64 temporaries.
_CHUNK_CODES = 1 << 22


def _bit_offsets(L: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per code of a row: its first byte and its shift within that byte."""
    offset = torch.arange(L, device=device, dtype=torch.int64) * bits
    return offset >> 3, offset & 7


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """integer codes [N, J, C] in [0, 2**bits) -> packed uint8 [N, row_bytes(J*C, bits)]."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        _fail("bits", f"must be an int in 1..{MAX_BITS}, got {bits!r}")
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype.is_floating_point \
            or codes.dtype.is_complex or codes.dtype == torch.bool:
        _fail("codes", f"must be a 3-D integer tensor [N, J, C], got "
                       f"{getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        _fail("codes", f"must be in [0, {1 << bits}) for bits={bits}, got values in "
                       f"[{int(codes.min())}, {int(codes.max())}]")
    N = codes.shape[0]
    L = codes.shape[1] * codes.shape[2]
    nbytes = row_bytes(L, bits)
    byte, shift = _bit_offsets(L, bits, codes.device)
    out = torch.empty((N, nbytes), dtype=torch.uint8, device=codes.device)
    flat = codes.reshape(N, L)
    step = max(1, _CHUNK_CODES // max(L, 1))
    for n0 in range(0, N, step):
        v = flat[n0:n0 + step].to(torch.int64) << shift         # <= 23 bits: spans <= 3 bytes
        acc = torch.zeros((v.shape[0], nbytes + 2), dtype=torch.int64, device=codes.device)
        # Codes occupy disjoint bits, so adding their byte pieces is OR-ing them.
        for t in range(3):
            acc.index_add_(1, byte + t, (v >> (8 * t)) & 0xFF)
        out[n0:n0 + step] = acc[:, :nbytes].to(torch.uint8)
    return out


def unpack(packed: torch.Tensor, bits: int, num_vectors: int, num_codebooks: int) -> torch.Tensor:
    """packed uint8 [N, row_bytes] -> int64 codes [N, J, C]. Exact inverse of :func:`pack`."""
    L = num_vectors * num_codebooks
    nbytes = row_bytes(L, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != nbytes:
        _fail("packed", f"must be uint8 [N, {nbytes}] for J={num_vectors}, C={num_codebooks}, bits={bits}, "
                        f"got {packed.dtype} {list(packed.shape)}")
    N = packed.shape[0]
    byte, shift = _bit_offsets(L, bits, packed.device)
    out = torch.empty((N, L), dtype=torch.int64, device=packed.device)
    step = max(1, _CHUNK_CODES // max(L, 1))
    for n0 in range(0, N, step):
        rows = torch.nn.functional.pad(packed[n0:n0 + step].to(torch.int64), (0, 2))
        v = rows[:, byte] | (rows[:, byte + 1] << 8) | (rows[:, byte + 2] << 16)
        out[n0:n0 + step] = (v >> shift) & ((1 << bits) - 1)
    return out.reshape(N, num_vectors, num_codebooks)


@dataclass
class CodebookWeight:
    packed: torch.Tensor             # uint8 [N, row_bytes(J*C, bits)]
    codebooks: torch.Tensor          # [R, G, C, 2**bits, d]
    scale: torch.Tensor | None       # [N] or None
    rotation: torch.Tensor | None    # float32 [B, b, b] or None
    in_features: int                 # K

    def __post_init__(self):
        validate(self.packed, self.codebooks, self.scale, self.rotation, self.in_features)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def dim(self) -> int:
        return self.codebooks.shape[4]

    @property
    def num_codebooks(self) -> int:
        return self.codebooks.shape[2]

    @property
    def bits(self) -> int:
        return bits_of(self.codebooks.shape[3])

    def nbytes(self) -> int:
        n = self.packed.numel() + self.codebooks.numel() * self.codebooks.element_size()
        for t in (self.scale, self.rotation):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def bits_per_weight(self) -> float:
        """Storage per weight, codebooks, scales and rotation included."""
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)


def validate(packed, codebooks, scale, rotation, K: int) -> None:
    """Every constraint of the format; the ops check the same ones (lowbit._checks.codebook_args)."""
    if not isinstance(codebooks, torch.Tensor) or codebooks.dim() != 5 or codebooks.dtype not in CODEBOOK_DTYPES:
        _fail("codebooks", f"must be a 5-D float32/float16/bfloat16 tensor [R, G, C, 2**bits, d], got "
                           f"{getattr(codebooks, 'dtype', None)} {list(getattr(codebooks, 'shape', []))}")
    R, G, C, E, d = codebooks.shape
    bits = bits_of(E)
    if not 1 <= bits <= MAX_BITS:
        _fail("codebooks", f"must have 2**bits entries (bits 1..{MAX_BITS}) in dim 3, got {E}")
    if d not in DIMS:
        _fail("codebooks", f"sub-vector dimension (dim 4) must be one of {DIMS}, got {d}")
    if C < 1 or R < 1 or G < 1:
        _fail("codebooks", f"must have non-zero sizes, got {list(codebooks.shape)}")
    if K % d:
        _fail("in_features", f"{K} must be a multiple of the sub-vector dimension {d}")
    J = K // d
    if J % G:
        _fail("codebooks", f"has G={G} column groups, which must divide the {J} sub-vectors per row")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        _fail("packed", f"must be a 2-D uint8 tensor, got {getattr(packed, 'dtype', None)}")
    N = packed.shape[0]
    if N == 0 or packed.shape[1] != row_bytes(J * C, bits):
        _fail("packed", f"must have shape [N, ceil(J*C*bits/8)]=[N, {row_bytes(J * C, bits)}] for J={J}, C={C}, "
                        f"bits={bits}, got {list(packed.shape)}")
    if N % R:
        _fail("codebooks", f"has R={R} row groups, which must divide N={N}")
    if scale is not None and (scale.dtype not in CODEBOOK_DTYPES or list(scale.shape) != [N]):
        _fail("scale", f"must be a float tensor of shape [{N}], got {scale.dtype} {list(scale.shape)}")
    if rotation is not None:
        if rotation.dtype != torch.float32 or rotation.dim() != 3 or rotation.shape[1] != rotation.shape[2] \
                or rotation.shape[0] * rotation.shape[1] != K:
            _fail("rotation", f"must be float32 [B, b, b] with B*b = K = {K}, got {rotation.dtype} "
                              f"{list(rotation.shape)}")


def from_codes(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor | None = None,
               rotation: torch.Tensor | None = None, *, codebook_dtype: torch.dtype | None = None) -> CodebookWeight:
    """Pack integer codes [N, J, C] (checked in range) with their codebooks [R, G, C, E, d]."""
    if codebooks.dim() != 5:
        _fail("codebooks", f"must be 5-D [R, G, C, 2**bits, d], got {list(codebooks.shape)}")
    bits = bits_of(codebooks.shape[3])
    if bits < 1:
        _fail("codebooks", f"must have 2**bits entries in dim 3, got {codebooks.shape[3]}")
    if codes.dim() != 3 or codes.shape[2] != codebooks.shape[2]:
        _fail("codes", f"must be [N, J, C] with C={codebooks.shape[2]}, got {list(codes.shape)}")
    if codebook_dtype is not None:
        codebooks = codebooks.to(codebook_dtype)
    K = codes.shape[1] * codebooks.shape[4]
    return CodebookWeight(pack(codes, bits), codebooks.contiguous(), scale, rotation, K)


def decode(packed, codebooks, scale, K: int) -> torch.Tensor:
    """float32 [N, K] = scale * sum_c codebooks[...] (the rotation, if any, not applied)."""
    R, G, C, E, d = codebooks.shape
    N, J = packed.shape[0], K // d
    codes = unpack(packed, bits_of(E), J, C)                           # [N, J, C]
    cb = codebooks.to(torch.float32)
    r = (torch.arange(N, device=packed.device) // (N // R)).view(N, 1)
    g = (torch.arange(J, device=packed.device) // (J // G)).view(1, J)
    w = torch.zeros((N, J, d), dtype=torch.float32, device=packed.device)
    for c in range(C):
        w = w + cb[r, g, c, codes[:, :, c]]
    w = w.reshape(N, K)
    if scale is not None:
        w = w * scale.to(torch.float32).unsqueeze(1)
    return w


def apply_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x @ blockdiag(rotation).T, in float32."""
    B, b, _ = rotation.shape
    xs = x.to(torch.float32).reshape(-1, B, b)
    return torch.einsum("mbi,bji->mbj", xs, rotation).reshape(x.shape)


def dequantize(weight: CodebookWeight) -> torch.Tensor:
    """float32 [N, K]: the weight the layer multiplies by, rotation included."""
    w = decode(weight.packed, weight.codebooks, weight.scale, weight.in_features)
    if weight.rotation is not None:
        B, b, _ = weight.rotation.shape
        w = torch.einsum("nbi,bij->nbj", w.reshape(-1, B, b), weight.rotation).reshape(w.shape)
    return w
