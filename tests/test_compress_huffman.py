"""lowbit.compress.huffman: exact round trips, optimal and canonical codes, size against the
entropy bound, the 4096 x 4096 int4 case, hostile streams, and lowbit.save(entropy_coding=True)."""

import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.compress import huffman as H
from lowbit.formats import int4 as int4_fmt


def _gaussian_int4_codes(rows, cols, seed=0):
    # what group-wise int4 quantization of Gaussian weights produces (amax scaling, 16 levels)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return int4_fmt.unpack(int4_fmt.quantize_weight(w, 128).packed, cols).numpy()


@pytest.mark.parametrize("n,alphabet,chunk", [(1, 1, 8192), (7, 3, 2), (1000, 16, 7), (5000, 256, 1024),
                                              (3000, 4001, 512), (10000, 2, 8192)])
def test_round_trip_exact(n, alphabet, chunk):
    rng = np.random.default_rng(n)
    x = np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1)
    x[0] = alphabet - 1
    c = H.encode(x, chunk=chunk)
    np.testing.assert_array_equal(H.decode(c), x)
    assert c.stream.size == (c.nbits + 7) // 8
    assert c.nbits == int(c.lengths.astype(np.int64)[x].sum())


def test_empty_and_single_symbol():
    c = H.encode(np.zeros(0, np.int64))
    assert H.decode(c).size == 0
    c = H.encode(np.full(100, 5))
    assert c.nbits == 100  # one symbol still takes one bit each
    np.testing.assert_array_equal(H.decode(c), np.full(100, 5))


def test_lengths_are_optimal_on_a_known_example():
    counts = np.array([45, 13, 12, 16, 9, 5])  # CLRS 16.3: optimal cost 224
    lengths = H.code_lengths(counts)
    assert int((counts * lengths).sum()) == 224
    assert sum(2.0 ** -int(l) for l in lengths) == 1.0  # complete


def test_canonical_codes_are_prefix_free_and_ordered():
    lengths = np.array([3, 0, 2, 3, 4, 4, 2, 3], dtype=np.uint8)
    codes = H.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in range(len(lengths)) if lengths[s]]
    for a in words:
        for b in words:
            assert a is b or not b.startswith(a)
    # canonical: ordered by (length, symbol) the codes count up
    order = sorted((int(lengths[s]), s) for s in range(len(lengths)) if lengths[s])
    vals = [int(codes[s]) << (4 - length) for length, s in order]
    assert vals == sorted(vals)


def test_length_limit_keeps_a_valid_code():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # Fibonacci counts: the unlimited Huffman code is 29 bits deep
    lengths = H.code_lengths(counts)
    assert lengths.max() == H.MIN_MAX_LEN
    assert sum(2.0 ** -int(l) for l in lengths) <= 1.0
    x = np.repeat(np.arange(30), np.minimum(counts, 50))
    np.testing.assert_array_equal(H.decode(H.encode(x)), x)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_size_within_one_percent_of_entropy_plus_table(kind):
    if kind == "int4":
        x = _gaussian_int4_codes(512, 1024)
    else:
        w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
        x = (lowbit.formats.int8.quantize_weight(w).qweight.to(torch.int16) + 127).numpy()
    c = H.encode(x)
    r = H.report(x, 4 if kind == "int4" else 8, c)
    entropy_bytes = r.entropy_bits * x.size / 8
    assert c.nbytes() <= 1.01 * entropy_bytes + c.table_nbytes()
    assert c.stream.nbytes >= entropy_bytes * (1 - 1e-9)  # and never below the bound (sanity of the report)
    assert r.total_bits < r.fixed_bits


def test_4096x4096_int4_in_seconds():
    g = torch.Generator().manual_seed(0)
    x = torch.clamp(torch.round(torch.randn(4096, 4096, generator=g) * 2.2 + 8), 0, 15).to(torch.uint8).numpy()
    t0 = time.perf_counter()
    c = H.encode(x)
    t1 = time.perf_counter()
    y = H.decode(c, np.uint8)
    t2 = time.perf_counter()
    np.testing.assert_array_equal(y, x.reshape(-1))
    # seconds on a quiet core; generous here because the CI machine is shared
    assert t1 - t0 < 30 and t2 - t1 < 30, (t1 - t0, t2 - t1)


def test_corrupt_streams_are_rejected():
    x = _gaussian_int4_codes(64, 256).reshape(-1)
    c = H.encode(x, chunk=1024)
    rng = np.random.default_rng(0)
    for trial in range(40):
        bad = H.HuffmanCoded(c.lengths, c.stream.copy(), c.offsets, c.count, c.chunk, c.nbits, c.crc32)
        i = rng.integers(bad.stream.size)
        bad.stream[i] ^= np.uint8(1 << rng.integers(8))
        with pytest.raises(H.HuffmanError):
            H.decode(bad)
    kraft = c.lengths.copy()
    kraft[kraft > 0] = 1  # 16 symbols with 1-bit codes
    with pytest.raises(H.HuffmanError, match="Kraft"):
        H.decode(H.HuffmanCoded(kraft, c.stream, c.offsets, c.count, c.chunk, c.nbits))
    with pytest.raises(H.HuffmanError, match="offsets"):
        H.decode(H.HuffmanCoded(c.lengths, c.stream, c.offsets[::-1].copy(), c.count, c.chunk, c.nbits))
    with pytest.raises(H.HuffmanError, match="inconsistent"):
        H.decode(H.HuffmanCoded(c.lengths, c.stream[:-1], c.offsets, c.count, c.chunk, c.nbits))


def test_encode_rejects_negative_and_float_codes():
    with pytest.raises(ValueError, match=">= 0"):
        H.encode(np.array([1, -1]))
    with pytest.raises(ValueError, match="integers"):
        H.encode(np.array([1.0]))


# ----------------------------------------------------------------------------- lowbit.save / load
def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU(), torch.nn.Linear(384, 96),
                            torch.nn.Linear(96, 160))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m


def _quantized():
    m = _model()
    m[0] = lowbit.nn.Int8Linear.from_float(m[0])
    m[2] = lowbit.nn.Int4Linear.from_float(m[2], group_size=32)
    m[3] = lowbit.nn.Int8WeightOnlyLinear.from_float(m[3])
    return m


def test_save_load_entropy_coded_round_trip(tmp_path):
    m = _quantized()
    lowbit.save(m, tmp_path / "plain")
    lowbit.save(m, tmp_path / "coded", entropy_coding=True)
    header = json.loads((tmp_path / "coded" / "lowbit.json").read_text())
    assert set(header["entropy_coded"]) == {"0.qweight", "2.packed", "3.qweight"}
    assert "entropy_coded" not in json.loads((tmp_path / "plain" / "lowbit.json").read_text())
    plain = (tmp_path / "plain" / "model.safetensors").stat().st_size
    coded = (tmp_path / "coded" / "model.safetensors").stat().st_size
    assert coded < plain
    m2 = lowbit.load(tmp_path / "coded", _model())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def _corrupt(path, key, fn):
    t = load_file(path / "model.safetensors")
    t[key] = fn(t[key].clone())
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("key,fn,match", [
    ("0.qweight.huffman_stream", lambda s: s.__setitem__(50, s[50] ^ 0x10) or s, "corrupt Huffman stream"),
    ("2.packed.huffman_lengths", lambda s: torch.ones_like(s), "corrupt Huffman stream"),
    ("3.qweight.huffman_offsets", lambda s: s.flip(0) if s.numel() > 1 else s + 7, "corrupt Huffman stream"),
    ("0.qweight.huffman_stream", lambda s: s[:-1], "shape"),
    ("2.packed.huffman_lengths", lambda s: torch.tensor([1] + [20] * (len(s) - 1), dtype=torch.uint8),
     "exceeds 16"),
])
def test_corrupt_coded_checkpoint_is_rejected_and_model_untouched(tmp_path, key, fn, match):
    lowbit.save(_quantized(), tmp_path, entropy_coding=True)
    _corrupt(tmp_path, key, fn)
    fresh = _model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lowbit.load(tmp_path, fresh)
    assert all(type(fresh[i]) is torch.nn.Linear for i in (0, 2, 3))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("edit,match", [
    (lambda e: e["0.qweight"].update(count=5), "holds 5 codes"),
    (lambda e: e["0.qweight"].update(codec="int4"), "codec"),
    (lambda e: e["0.qweight"].update(chunk=0), "chunk"),
    (lambda e: e["0.qweight"].update(extra=1), "fields"),
    (lambda e: e.update({"1.weight": e.pop("0.qweight")}), "not the code tensor"),
])
def test_bad_entropy_coded_json_is_rejected(tmp_path, edit, match):
    lowbit.save(_quantized(), tmp_path, entropy_coding=True)
    header = json.loads((tmp_path / "lowbit.json").read_text())
    edit(header["entropy_coded"])
    (tmp_path / "lowbit.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match=match):
        lowbit.load(tmp_path, _model())
