"""Canonical Huffman coding of quantized weight codes (int4 / int8 / codebook indices) for storage.

    coded = huffman.encode(codes)           # any integer tensor/array with values >= 0
    codes2 = huffman.decode(coded)           # exact; numpy, ~a second for 16 M int4 codes
    huffman.report(codes)                    # bits/weight: fixed width, entropy, Huffman

A :class:`HuffmanCoded` is four arrays and three integers:

* ``lengths`` uint8 [alphabet]: the code length of each symbol (0 = absent). With the
  canonical code this table *is* the code: codes are handed out in order of (length, symbol).
* ``stream`` uint8: the codes, MSB first, concatenated.
* ``offsets`` uint32 (int64 beyond 4 Gbit) [chunks]: the bit where every run of ``chunk``
  symbols starts. Huffman decoding is serial within a run; with these sync points numpy
  decodes all runs in lockstep, one vectorized step per symbol of a run. They cost 32 bits per
  ``chunk`` symbols (0.004 bits per symbol at 8192, the size for tensors of 4 M codes and more).
* ``count`` (symbols), ``chunk``, ``nbits`` (valid bits in ``stream``), ``crc32`` of the
  symbols: a flipped bit can turn one code into another of the same length, which no structural
  check can see.

Code lengths are capped at ``max(16, ceil(log2(distinct symbols)))`` (decode reads that many
bits at once through a lookup table); a longer optimal code is shortened with the JPEG
(Annex K.3) rebalancing, which keeps the Kraft sum <= 1.

Decoding a hostile stream raises ValueError: every run must decode through valid codes to
exactly the next run's offset, and the lengths must form a prefix code.
"""

from __future__ import annotations

import heapq
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_CHUNK = 8192
MIN_MAX_LEN = 16
MAX_MAX_LEN = 24  # the decoder reads (bit offset within a byte) + L <= 32 bits from one uint32


@dataclass
class HuffmanCoded:
    lengths: np.ndarray  # uint8 [alphabet]
    stream: np.ndarray  # uint8 [ceil(nbits / 8)]
    offsets: np.ndarray  # uint32/int64 [ceil(count / chunk)]
    count: int
    chunk: int
    nbits: int
    crc32: int | None = None  # of the symbols (see symbols_crc32); checked by decode when given

    def nbytes(self) -> int:
        """Stored size: stream + code-length table + sync offsets."""
        return self.stream.nbytes + self.lengths.nbytes + self.offsets.nbytes

    def table_nbytes(self) -> int:
        return self.lengths.nbytes + self.offsets.nbytes

    def bits_per_symbol(self) -> float:
        return 8.0 * self.nbytes() / self.count if self.count else 0.0


class HuffmanError(ValueError):
    """A Huffman stream or table that does not decode (corrupt or hostile input)."""


# ----------------------------------------------------------------------------- code construction
def code_lengths(counts: np.ndarray, max_len: int | None = None) -> np.ndarray:
    """Optimal (length-limited) code lengths, uint8 [alphabet], for symbol `counts` (0 = absent)."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    if len(present) == 0:
        return lengths
    if len(present) == 1:
        lengths[present[0]] = 1  # a 1-bit code: one symbol still needs to be countable in the stream
        return lengths
    if max_len is None:
        max_len = limit_for(len(present))
    # Huffman's merge, tracking each node's parent to read depths off at the end.
    heap = [(int(counts[s]), i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent = [-1] * (2 * len(present) - 1)
    nxt = len(present)
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt))
        nxt += 1
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # parents have larger ids: fill from the root down
        depth[node] = depth[parent[node]] + 1
    leaf_depth = np.array(depth[:len(present)], dtype=np.int64)
    if leaf_depth.max() > max_len:
        leaf_depth = _limit(leaf_depth, counts[present], max_len)
    lengths[present] = leaf_depth
    return lengths


def limit_for(distinct: int) -> int:
    need = max(MIN_MAX_LEN, math.ceil(math.log2(max(distinct, 2))))
    if need > MAX_MAX_LEN:
        raise ValueError(f"lowbit.compress.huffman: {distinct} distinct symbols; at most 2**{MAX_MAX_LEN} supported")
    return need


def _limit(depths: np.ndarray, weights: np.ndarray, max_len: int) -> np.ndarray:
    """JPEG Annex K.3: move leaves up from below `max_len` in pairs, keeping a complete prefix code."""
    top = int(depths.max())
    bl = np.bincount(depths, minlength=top + 1).astype(np.int64)
    for i in range(top, max_len, -1):
        while bl[i] > 0:
            j = i - 2
            while bl[j] == 0:
                j -= 1
            bl[i] -= 2
            bl[i - 1] += 1
            bl[j + 1] += 2
            bl[j] -= 1
    new_lengths = np.repeat(np.arange(len(bl)), bl)[: len(depths)]  # ascending lengths
    order = np.argsort(-weights, kind="stable")  # most frequent symbols get the shortest codes
    out = np.empty_like(depths)
    out[order] = new_lengths
    return out


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """uint32 codes [alphabet] of the canonical code with these lengths (0 where absent)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    order = np.lexsort((np.arange(len(lengths)), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order:  # at most 2**24 symbols and usually <= 256: a Python loop is fine
        length = int(lengths[s])
        code <<= length - prev
        codes[s] = code
        code += 1
        prev = length
    return codes.astype(np.uint32)


def _check_lengths(lengths: np.ndarray) -> int:
    """Validate a code-length table (as read from a file); returns the maximum length."""
    if lengths.dtype != np.uint8 or lengths.ndim != 1:
        raise HuffmanError(f"code-length table must be a 1-D uint8 array, got {lengths.dtype} {list(lengths.shape)}")
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return 0
    L = int(used.max())
    if L > MAX_MAX_LEN:
        raise HuffmanError(f"code length {L} exceeds the maximum {MAX_MAX_LEN}")
    kraft = int(np.sum(np.left_shift(1, L - used)))
    if kraft > (1 << L):
        raise HuffmanError("code lengths violate the Kraft inequality (not a prefix code)")
    return L


# ----------------------------------------------------------------------------- encode
def _as_numpy(codes) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    a = np.asarray(codes)
    if a.dtype.kind not in "iub":
        raise ValueError(f"lowbit.compress.huffman.encode: codes must be integers, got {a.dtype}")
    a = a.reshape(-1)
    if a.size and int(a.min()) < 0:
        raise ValueError("lowbit.compress.huffman.encode: codes must be >= 0 (offset signed codes first)")
    return a


def auto_chunk(n: int) -> int:
    """Symbols per sync run: decode costs one numpy step per symbol of a run (fewer runs for a
    small tensor keeps the steps few), each run costs 32 bits of offset (more for a large one)."""
    return int(min(DEFAULT_CHUNK, max(256, 1 << math.ceil(math.log2(max(1.0, 4 * math.sqrt(n)))))))


def encode(codes, chunk: int | None = None, lengths: np.ndarray | None = None) -> HuffmanCoded:
    """Canonical-Huffman-code the non-negative integers `codes` (any shape; flattened row-major).

    `lengths`: a code-length table to use instead of the optimal one for these counts (e.g. one
    table shared by several tensors); every symbol present must have a code."""
    x = _as_numpy(codes)
    chunk = auto_chunk(x.size) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"lowbit.compress.huffman.encode: chunk must be >= 1, got {chunk}")
    n = x.size
    alphabet = int(x.max()) + 1 if n else 0
    if lengths is None:
        lengths = code_lengths(np.bincount(x, minlength=alphabet) if n else np.zeros(0, np.int64))
    else:
        lengths = np.asarray(lengths, dtype=np.uint8)
        _check_lengths(lengths)
        if alphabet > len(lengths) or (n and (lengths[x] == 0).any()):
            raise ValueError("lowbit.compress.huffman.encode: a symbol has no code in the given lengths table")
    codes_tab = canonical_codes(lengths).astype(np.uint64)
    lens = lengths.astype(np.int64)[x] if n else np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    nbits = int(ends[-1]) if n else 0
    nwords = (nbits + 31) // 32 + 1
    words = np.zeros(nwords, dtype=np.float64)
    step = 1 << 22  # bounded temporaries: a few 32 MiB arrays at a time
    for s in range(0, n, step):
        e = min(n, s + step)
        starts = ends[s:e] - lens[s:e]
        w = starts >> 5
        # A code of <= 32 bits placed at bit (start % 32) of a 64-bit window straddles at most two
        # 32-bit words; codes never overlap, so OR = sum, and float64 sums of 32-bit values are exact.
        v = codes_tab[x[s:e]] << (64 - lens[s:e] - (starts & 31)).astype(np.uint64)
        w0 = int(w[0])
        hi = np.bincount(w - w0, weights=(v >> np.uint64(32)).astype(np.float64))
        lo = np.bincount(w + 1 - w0, weights=(v & np.uint64(0xFFFFFFFF)).astype(np.float64))
        words[w0:w0 + len(hi)] += hi
        words[w0:w0 + len(lo)] += lo
    stream = np.frombuffer(words.astype(">u4").tobytes(), dtype=np.uint8)[: (nbits + 7) // 8].copy()
    starts_of_chunks = (ends - lens)[::chunk] if n else np.zeros(0, np.int64)
    off_dtype = np.uint32 if nbits < 2**32 else np.int64
    return HuffmanCoded(lengths, stream, starts_of_chunks.astype(off_dtype), n, chunk, nbits,
                        symbols_crc32(x, len(lengths)))


def symbols_crc32(symbols: np.ndarray, alphabet: int) -> int:
    """CRC-32 of the symbols written in the narrowest unsigned width that holds the alphabet."""
    width = np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint32
    return zlib.crc32(np.ascontiguousarray(symbols, dtype=width).tobytes())


# ----------------------------------------------------------------------------- decode
def decode(coded: HuffmanCoded, dtype=np.int64) -> np.ndarray:
    """The flat array of symbols (as `dtype`). Raises :class:`HuffmanError` on a corrupt stream."""
    lengths, stream, offsets = coded.lengths, coded.stream, coded.offsets
    n, chunk, nbits = int(coded.count), int(coded.chunk), int(coded.nbits)
    if stream.dtype != np.uint8 or stream.ndim != 1:
        raise HuffmanError("stream must be a 1-D uint8 array")
    if n < 0 or chunk < 1 or nbits < 0 or nbits > 8 * stream.size or (nbits + 7) // 8 != stream.size:
        raise HuffmanError(f"inconsistent sizes: count={n}, chunk={chunk}, nbits={nbits}, stream {stream.size} bytes")
    n_chunks = -(-n // chunk) if n else 0
    if offsets.ndim != 1 or offsets.size != n_chunks or offsets.dtype.kind not in "iu":
        raise HuffmanError(f"offsets must be a 1-D integer array of {n_chunks} entries, got {offsets.dtype} "
                           f"{list(offsets.shape)}")
    if n == 0:
        if nbits:
            raise HuffmanError("an empty tensor has a non-empty stream")
        return np.zeros(0, dtype=dtype)
    L = _check_lengths(lengths)
    if L == 0:
        raise HuffmanError("the code-length table has no symbols")
    offs = offsets.astype(np.int64)
    if offs[0] != 0 or (np.diff(offs) < 0).any() or offs[-1] > nbits:
        raise HuffmanError("offsets must start at 0, never decrease, and stay within the stream")

    # Lookup table over L-bit windows: entry = symbol << 8 | length (length 0: not a code).
    codes_tab = canonical_codes(lengths).astype(np.int64)
    syms = np.flatnonzero(lengths)
    lens = lengths[syms].astype(np.int64)
    span = np.left_shift(1, L - lens)
    lut = np.zeros(1 << L, dtype=np.int64)
    first = codes_tab[syms] << (L - lens)
    idx = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    lut[idx] = np.repeat((syms.astype(np.int64) << 8) | lens, span)

    # Big-endian uint32 at every byte offset (4 zero bytes of padding so the last reads stay in range).
    b = np.concatenate([stream, np.zeros(4, np.uint8)]).astype(np.uint32)
    w32 = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]
    last = len(w32) - 1
    out = np.empty((n_chunks, chunk), dtype=np.int64)
    got = np.empty((n_chunks, chunk), dtype=np.uint8)
    pos = offs.copy()
    mask = (1 << L) - 1
    for t in range(chunk):
        byte = np.minimum(pos >> 3, last)
        win = (w32[byte].astype(np.int64) >> (32 - L - (pos & 7))) & mask
        e = lut[win]
        out[:, t] = e >> 8
        length = e & 0xFF
        got[:, t] = length
        pos += length
    valid = np.arange(n_chunks * chunk).reshape(n_chunks, chunk) < n
    if (got[valid] == 0).any():
        raise HuffmanError("the stream holds a bit pattern that is not a code of the table")
    ends = offs + np.where(valid, got, 0).sum(1)
    if (ends != np.append(offs[1:], nbits)).any():
        raise HuffmanError("a run of symbols does not end where the next one starts (corrupt stream or offsets)")
    out = out.reshape(-1)[:n]
    if coded.crc32 is not None and symbols_crc32(out, len(lengths)) != coded.crc32:
        raise HuffmanError("the decoded symbols fail their CRC-32 check (corrupt stream)")
    return out.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- reporting
def entropy_bits(codes) -> float:
    """Shannon entropy of the empirical symbol distribution, in bits per symbol."""
    x = _as_numpy(codes)
    if x.size == 0:
        return 0.0
    p = np.bincount(x) / x.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@dataclass(frozen=True)
class CodingReport:
    count: int
    fixed_bits: int  # bits per symbol of the fixed-width storage
    entropy_bits: float  # empirical entropy per symbol (the bound for any symbol-wise code)
    huffman_bits: float  # stream bits per symbol
    total_bits: float  # (stream + table + offsets) per symbol

    def __str__(self) -> str:
        return (f"{self.count} symbols: fixed {self.fixed_bits} bits, entropy {self.entropy_bits:.3f}, "
                f"Huffman {self.huffman_bits:.3f} (+table {self.total_bits - self.huffman_bits:.4f}) "
                f"= {self.total_bits:.3f} bits/symbol, {self.fixed_bits / self.total_bits:.2f}x smaller")


def report(codes, fixed_bits: int | None = None, coded: HuffmanCoded | None = None) -> CodingReport:
    """Bits per symbol: fixed width (default: bits of the largest code), entropy, Huffman."""
    x = _as_numpy(codes)
    coded = coded or encode(x)
    if fixed_bits is None:
        fixed_bits = max(1, int(x.max()).bit_length()) if x.size else 1
    n = max(x.size, 1)
    return CodingReport(x.size, fixed_bits, entropy_bits(x), coded.nbits / n, 8.0 * coded.nbytes() / n)


# ----------------------------------------------------------------------------- checkpoint storage
# lowbit.save(..., entropy_coding=True) stores a quantized layer's integer codes as three uint8/
# int32 tensors "<key>.huffman_stream", "<key>.huffman_lengths", "<key>.huffman_offsets" and
# describes them in lowbit.json under "entropy_coded"; lowbit.load decodes them before the
# usual value checks, so a hostile stream meets the same checks as a plain tensor after failing
# none of its own.
STORAGE_SUFFIXES = ("huffman_stream", "huffman_lengths", "huffman_offsets")
# codec -> (module classes' weight buffer, alphabet size limit)
_CODECS = {"int8": 255, "int4": 16}
_MAX_STORED_BITS = 2**31 - 1  # offsets are stored as int32
MAX_STORED_CHUNK = 1 << 16  # decode is one numpy step per symbol of a run: bound the steps a file can ask for


def _codec_for(module_class: str) -> tuple[str, str] | None:
    if module_class in ("Int8Linear", "Int8WeightOnlyLinear"):
        return "int8", "qweight"
    if module_class == "Int4Linear":
        return "int4", "packed"
    return None


def encode_for_storage(tensors: dict[str, torch.Tensor], modules: list[dict], aliases: dict[str, str],
                       chunk: int | None = None) -> dict[str, dict]:
    """Replace (in `tensors`) each quantized layer's codes by their Huffman coding; returns the
    ``entropy_coded`` description for lowbit.json. Tensors that would not shrink stay as they are."""
    from ..formats import int4 as int4_fmt

    described = {}
    tied = set(aliases) | set(aliases.values())
    for entry in modules:
        found = _codec_for(entry["class"])
        if found is None:
            continue
        codec, buf = found
        key = f"{entry['name']}.{buf}"
        if key not in tensors or key in tied or key in described:
            continue
        t = tensors[key]
        if codec == "int8":
            symbols = (t.to(torch.int16) + 127).numpy()
            if symbols.size and (symbols.min() < 0 or symbols.max() > 254):
                continue  # -128 is no int8 code of lowbit's; leave it for load to reject as usual
        else:
            K = entry["args"]["in_features"]
            codes = int4_fmt.unpack(t, K)
            if not torch.equal(int4_fmt.pack(codes), t):
                continue  # nonzero padding would not survive the round trip: store raw
            symbols = codes.numpy()
        coded = encode(symbols, chunk)
        if coded.nbits > _MAX_STORED_BITS or coded.nbytes() >= t.numel() * t.element_size():
            continue
        del tensors[key]
        tensors[f"{key}.huffman_stream"] = torch.from_numpy(coded.stream)
        tensors[f"{key}.huffman_lengths"] = torch.from_numpy(coded.lengths)
        tensors[f"{key}.huffman_offsets"] = torch.from_numpy(coded.offsets.astype(np.int32))
        described[key] = {"codec": codec, "count": coded.count, "chunk": coded.chunk, "nbits": coded.nbits,
                          "alphabet": int(coded.lengths.size), "crc32": coded.crc32}
    return described


def storage_plan(described, expected: dict[str, torch.Tensor], codes: dict[str, tuple[str, int]],
                 fail) -> dict[str, torch.Tensor]:
    """The tensors the file must hold when `described` (lowbit.json's "entropy_coded") replaces
    some of `expected`. `codes`: ``{key: (codec, number of codes)}`` for every tensor of the
    model that may be coded; `fail(message)` raises. Checks every field before anything is read."""
    if not isinstance(described, dict):
        fail(f"field 'entropy_coded' must be an object, got {type(described).__name__}")
    on_disk = dict(expected)
    for key, d in described.items():
        what = f"entropy_coded[{key!r:.80}]"
        if key not in codes or key not in expected:
            fail(f"{what} is not the code tensor of a quantized layer of the model")
        if not isinstance(d, dict) or set(d) != {"codec", "count", "chunk", "nbits", "alphabet", "crc32"}:
            fail(f"{what} must be an object with fields codec, count, chunk, nbits, alphabet, crc32")
        for f in ("count", "chunk", "nbits", "alphabet", "crc32"):
            if not isinstance(d[f], int) or isinstance(d[f], bool) or d[f] < 0:
                fail(f"{what} field {f!r} must be a non-negative integer, got {d[f]!r:.80}")
        codec, count = codes[key]
        if d["codec"] != codec:
            fail(f"{what} codec {d['codec']!r:.80} does not fit the layer (expected {codec!r})")
        if d["count"] != count:
            fail(f"{what} holds {d['count']} codes, the layer has {count}")
        if (not 1 <= d["chunk"] <= MAX_STORED_CHUNK or not 1 <= d["alphabet"] <= _CODECS[codec]
                or d["nbits"] > _MAX_STORED_BITS):
            fail(f"{what} has chunk {d['chunk']}, alphabet {d['alphabet']} (at most {_CODECS[codec]}) or "
                 f"nbits {d['nbits']} out of range")
        del on_disk[key]
        on_disk[f"{key}.huffman_stream"] = torch.empty((d["nbits"] + 7) // 8, dtype=torch.uint8)
        on_disk[f"{key}.huffman_lengths"] = torch.empty(d["alphabet"], dtype=torch.uint8)
        on_disk[f"{key}.huffman_offsets"] = torch.empty(-(-d["count"] // d["chunk"]), dtype=torch.int32)
    return on_disk


def decode_from_storage(described: dict, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        fail) -> None:
    """Decode (in `tensors`) every entropy-coded key back to the model's tensor."""
    from ..formats import int4 as int4_fmt

    for key, d in described.items():
        coded = HuffmanCoded(tensors.pop(f"{key}.huffman_lengths").numpy(),
                             tensors.pop(f"{key}.huffman_stream").numpy(),
                             tensors.pop(f"{key}.huffman_offsets").numpy().astype(np.int64),
                             d["count"], d["chunk"], d["nbits"], d["crc32"])
        ref = expected[key]
        try:
            # 255 symbols never need more than 16 bits; a longer table would only inflate the decoder's LUT
            if coded.lengths.size and int(coded.lengths.max()) > MIN_MAX_LEN:
                raise HuffmanError(f"code length {int(coded.lengths.max())} exceeds {MIN_MAX_LEN}")
            if d["codec"] == "int4":
                N = ref.shape[0]
                symbols = decode(coded, np.uint8)
                K = d["count"] // N if N else 0
                if symbols.size and int(symbols.max()) > 15:
                    raise HuffmanError("int4 code above 15")
                t = int4_fmt.pack(torch.from_numpy(symbols.reshape(N, K)))
            else:
                symbols = decode(coded, np.int16)
                if symbols.size and int(symbols.max()) > 254:
                    raise HuffmanError("int8 code out of range")
                t = torch.from_numpy((symbols - 127).astype(np.int8)).reshape(ref.shape)
        except HuffmanError as e:
            fail(f"tensor {key!r}: corrupt Huffman stream: {e}")
        if t.shape != ref.shape:
            fail(f"tensor {key!r}: decodes to shape {list(t.shape)}, the model expects {list(ref.shape)}")
        tensors[key] = t
