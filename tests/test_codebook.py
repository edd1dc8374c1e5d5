"""Codebook format, codebook_dequant and codebook_mm (CPU C++ kernel) against the spec.

codebook_mm is checked against the exact (float64) product of x and the reference's decoded
weight, within a rigorous fp32 accumulation bound; codebook_dequant must equal the reference
bit for bit (both sum the C entries in the same order and scale once).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cpu_routes
import lowbit  # noqa: F401
from lowbit import _extension, bench, ops
from lowbit.backends.reference import codebook as ref
from lowbit.formats import codebook as fmt

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(d):
    return str(d).removeprefix("torch.")


def make_weight(N, K, d=1, C=1, bits=4, R=1, G=1, scale=True, cb_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K // d, C), generator=g)
    codebooks = torch.randn(R, G, C, 2**bits, d, generator=g).to(cb_dtype)
    s = (torch.rand(N, generator=g) + 0.5) if scale else None
    return fmt.from_codes(codes, codebooks, s), codes


def codebook_bound(x, wdeq, bias, K, C, out_dtype):
    """(exact result, worst-case |error|) for fp32 accumulation in any order, rounded to out_dtype.

    K + 4 roundings per output: K - 1 additions, the products, the scale (kernels may scale the
    row's sum rather than each weight, which the reference rounded once), the bias. The C-term
    sums are identical to the reference's (same order, fp32), so they add nothing. Each rounding
    costs at most eps32 times the sum of magnitudes; the output rounding half an ulp of out_dtype.
    """
    x64, w64 = x.double(), wdeq.double()
    exact = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = (K + 4) * torch.finfo(torch.float32).eps * mag
    out = torch.finfo(out_dtype)
    return exact, acc + out.eps * (exact.abs() + acc) + out.tiny


def check_against_exact(x, w, bias=None):
    out = ops.codebook_mm(x, w.packed, w.codebooks, w.scale, bias)
    N, K = w.out_features, w.in_features
    assert out.dtype == x.dtype and out.shape == (x.shape[0], N)
    wdeq = ref.codebook_dequant(w.packed, w.codebooks, w.scale, K)
    exact, bound = codebook_bound(x.float(), wdeq, bias, K, w.num_codebooks, x.dtype)
    if takes_amx(x.dtype, x.shape[0], os.environ.get("LOWBIT_DECODED_GEMM"), w):
        bound = bound + torch.finfo(torch.bfloat16).eps * (x.double().abs() @ wdeq.double().abs().T)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max()} at bound {bound.flatten()[err.argmax()]}"
    return out


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 7, 3))
    packed = fmt.pack(codes, bits)
    assert packed.shape == (5, (7 * 3 * bits + 7) // 8) and packed.dtype == torch.uint8
    assert torch.equal(fmt.unpack(packed, bits, 7, 3), codes)


@pytest.mark.parametrize("bits", [3, 4, 8, 11, 16])
def test_pack_layout_is_the_documented_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (2, 9, 2))
    packed = fmt.pack(codes, bits)
    for n in range(2):
        stream = "".join(format(int(b), "08b")[::-1] for b in packed[n])     # LSB-first bits of the row
        flat = codes[n].reshape(-1)                                           # order (j, c), c fastest
        for i, code in enumerate(flat.tolist()):
            assert int(stream[i * bits:(i + 1) * bits][::-1], 2) == code
        assert set(stream[flat.numel() * bits:]) <= {"0"}


def test_decode_is_the_documented_sum():
    N, K, d, C, R, G = 6, 16, 2, 3, 2, 4
    w, codes = make_weight(N, K, d=d, C=C, bits=3, R=R, G=G)
    cb, s = w.codebooks.float(), w.scale.float()
    want = torch.zeros(N, K)
    J = K // d
    for n in range(N):
        for j in range(J):
            v = torch.zeros(d)
            for c in range(C):
                v = v + cb[n // (N // R), j // (J // G), c, codes[n, j, c]]
            want[n, j * d:(j + 1) * d] = v * s[n]
    assert torch.equal(fmt.dequantize(w), want)


@pytest.mark.parametrize("bad,match", [
    (lambda c: c + 16, r"codes must be in \[0, 16\)"),
    (lambda c: c - 1, r"codes must be in \[0, 16\)"),
    (lambda c: c.float(), r"codes must be a 3-D integer"),
    (lambda c: c[0], r"codes must be"),
])
def test_out_of_range_codes_never_reach_the_packed_format(bad, match):
    codes = torch.randint(0, 16, (4, 8, 1))
    with pytest.raises(ValueError, match=match):
        fmt.from_codes(bad(codes), torch.randn(1, 1, 1, 16, 1))


def test_format_refuses_a_codebook_that_is_not_2_to_the_bits():
    w, _ = make_weight(4, 16)
    with pytest.raises(ValueError, match="codebooks"):
        fmt.CodebookWeight(w.packed, w.codebooks[:, :, :, :15], w.scale, None, 16)


def test_bits_per_weight_counts_codebooks_and_scales():
    w, _ = make_weight(64, 256, d=4, C=2, bits=8, G=2, cb_dtype=torch.float16)
    codes_bits = 64 * 256 // 4 * 2 * 8
    cb_bits = 2 * 2 * 256 * 4 * 16
    scale_bits = 64 * 32
    assert w.bits_per_weight() == pytest.approx((codes_bits + cb_bits + scale_bits) / (64 * 256))


# ----------------------------------------------------------------------------- kernels
# (d, C, bits, R, G): scalar k-means 1-5 and 8 bits (the in-register table path is bits <= 4),
# per-row-group and per-column-group codebooks, PQ d=2/4/8, RQ/AQ C=2/3, 16-bit codes.
LAYOUTS = [
    (1, 1, 4, 1, 1), (1, 1, 3, 2, 4), (1, 1, 2, 1, 1), (1, 1, 1, 1, 1), (1, 1, 5, 1, 1), (1, 1, 8, 1, 2),
    (2, 1, 4, 1, 2), (4, 1, 8, 1, 2), (4, 1, 8, 1, 3), (8, 1, 8, 1, 1), (8, 2, 8, 1, 1), (4, 2, 4, 3, 1),
    (8, 1, 16, 1, 1), (4, 2, 16, 1, 1), (2, 3, 7, 1, 1),
]
SHAPES = [(1, 3, 48), (4, 12, 2064), (5, 9, 1104), (17, 6, 96)]


def layout_id(v):
    d, C, bits, R, G = v
    return f"d{d}C{C}b{bits}R{R}G{G}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_mm_and_dequant_match_reference(layout, M, N, K):
    d, C, bits, R, G = layout
    if K % d or (K // d) % G or N % R:
        pytest.skip("shape not divisible for this layout")
    w, _ = make_weight(N, K, d, C, bits, R, G)
    check_against_exact(torch.randn(M, K), w)
    got = ops.codebook_dequant(w.packed, w.codebooks, w.scale, K)
    assert torch.equal(got, ref.codebook_dequant(w.packed, w.codebooks, w.scale, K))


@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("cb_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16], ids=dtype_id)
def test_dtypes_and_bias(M, x_dtype, cb_dtype, bias_dtype):
    N, K = 13, 1024 + 64
    for layout in [(1, 1, 4, 1, 1), (4, 1, 8, 1, 2)]:
        w, _ = make_weight(N, K, *layout, cb_dtype=cb_dtype)
        bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
        check_against_exact(torch.randn(M, K).to(x_dtype), w, bias)


@pytest.mark.parametrize("out_dtype", FLOATS, ids=dtype_id)
def test_dequant_out_dtype(out_dtype):
    w, _ = make_weight(7, 64, 4, 2, 8)
    got = ops.codebook_dequant(w.packed, w.codebooks, None, 64, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, fmt.decode(w.packed, w.codebooks, None, 64).to(out_dtype))


# The CPU kernel's specialized decoders, each at the M that takes its fused (M <= 4) and its
# tiled (M > 4) form, odd N (rows left over from the 4-row passes), K past one 1024-column tile:
# 4-bit scalar codes by byte planes with G = 1 and K not a multiple of 32 or odd (a tail decoded
# code by code) or G groups of whole 32-blocks, R row groups; byte codes of one vector codebook,
# d = 2, 4, 8, with groups whose sub-vector count is not a multiple of 8 (a tail per group).
# (d, C, bits, R, G, K)
FAST_LAYOUTS = [
    (1, 1, 4, 1, 1, 1100), (1, 1, 4, 1, 1, 1101), (1, 1, 4, 1, 2, 1088), (1, 1, 4, 3, 4, 2048),
    (1, 1, 4, 1, 1, 64),
    (2, 1, 8, 1, 1, 1086), (2, 1, 8, 1, 3, 1086), (4, 1, 8, 1, 8, 1184), (4, 1, 8, 3, 1, 1028),
    (8, 1, 8, 1, 2, 1104), (8, 1, 8, 3, 1, 64),
]


@pytest.mark.parametrize("layout", FAST_LAYOUTS, ids=lambda v: layout_id(v[:5]) + f"K{v[5]}")
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_fast_decoders_match_reference(layout, M, cb_dtype):
    d, C, bits, R, G, K = layout
    w, _ = make_weight(15, K, d, C, bits, R, G, cb_dtype=cb_dtype, seed=M)
    check_against_exact(torch.randn(M, K), w, torch.randn(15))


@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("cb_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("M", [1, 6])
def test_fast_decoders_every_dtype(x_dtype, cb_dtype, M):
    for d, C, bits, R, G, K in [(1, 1, 4, 1, 1, 1100), (4, 1, 8, 1, 8, 1184), (2, 1, 8, 1, 1, 1086)]:
        w, _ = make_weight(9, K, d, C, bits, R, G, cb_dtype=cb_dtype)
        check_against_exact(torch.randn(M, K).to(x_dtype), w)


@pytest.mark.parametrize("M", [1, 6])
def test_4bit_codebook_that_fp16_cannot_hold_is_decoded_in_fp32(M):
    """The 4-bit decoder reads fp16 byte planes only when every entry is fp16-exact: one entry
    that is not (1 + 2**-11, half an fp16 ulp past 1) must be used as is. With most codes on it
    and x = 1, fp16 rounding would be off by about K * 2**-11 = 0.03, the fp32 bound is 5e-4."""
    cb = torch.randn(1, 1, 1, 16, 1).half().float()
    cb[0, 0, 0, 5, 0] = 1 + 2**-11
    codes = torch.full((8, 64, 1), 5)
    codes[:, ::7] = torch.randint(0, 16, (8, 10, 1))
    w = fmt.from_codes(codes, cb, torch.rand(8) + 0.5)
    check_against_exact(torch.ones(M, 64), w)


def test_trailing_bits_of_a_row_are_ignored():
    w, _ = make_weight(5, 30, bits=3)              # 90 bits per row: 6 spare bits in the last byte
    dirty = w.packed.clone()
    dirty[:, -1] |= 0xC0
    x = torch.randn(2, 30)
    clean = ops.codebook_mm(x, w.packed, w.codebooks, w.scale)
    assert torch.equal(ops.codebook_mm(x, dirty, w.codebooks, w.scale), clean)


@pytest.mark.parametrize("M", [1, 24])
def test_non_contiguous_inputs_equal_contiguous(M):
    w, _ = make_weight(10, 256, d=4, bits=8, G=2)
    x = torch.randn(2 * 256, M)[::2].T
    packed = torch.zeros(10, 2 * w.packed.shape[1], dtype=torch.uint8)
    packed[:, ::2] = w.packed
    packed = packed[:, ::2]
    cb = w.codebooks.transpose(3, 4).contiguous().transpose(3, 4)
    scale = torch.stack([w.scale, w.scale], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (x, packed, cb, scale))
    got = ops.codebook_mm(x, packed, cb, scale)
    want = ops.codebook_mm(x.contiguous(), w.packed, w.codebooks, w.scale)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- decoded-GEMM routes
# From these M, on CPUs wider than lowbit's AVX2 kernels, the decoded weight is handed to at::mm
# in 8 MiB panels (csrc/include/lowbit/cpu/decoded_gemm.h; kDecodedGemmMinM* in codebook.cpp).
DECODED_GEMM_MIN_M = {"bf16": 24, "fp32": 96}
SMALL_M = 4  # kSmallM in csrc/cpu/codebook.cpp: the fused kernels, no route
ROUTE_LAYOUTS = [  # (d, C, bits, R, G, K): every decoder (nibble planes, byte vectors, generic sums)
    (1, 1, 4, 1, 1, 1101), (1, 1, 4, 3, 4, 2048), (1, 1, 3, 1, 1, 1100), (4, 1, 8, 1, 8, 1184),
    (2, 1, 8, 1, 3, 1086), (8, 2, 8, 1, 1, 1104), (2, 3, 7, 1, 1, 96),
]


# bf16 x takes lowbit's AMX kernels where AMX-BF16 is ready, each weight rounded once to bf16 (as
# on the bf16 route), then fp32 accumulation: scalar 4-bit codebooks (d = 1, C = 1, groups of a
# multiple of 32 columns) for AMX_NIBBLE_M rows (kAmxNibbleMinM/MaxM), other layouts for AMX_M
# rows (kAmxMinM/MaxM).
AMX_M = range(10, 97)
AMX_NIBBLE_M = range(2, 257)


def nibble_layout(w) -> bool:
    R, G, C, E, d = w.codebooks.shape
    return E == 16 and d == 1 and C == 1 and (G == 1 or (w.in_features // G) % 32 == 0)


def takes_amx(x_dtype, M, env=None, w=None):
    """Whether an AMX kernel runs for weight w, with LOWBIT_DECODED_GEMM=env and
    LOWBIT_CODEBOOK_AMX as set now (w=None: a layout other than the scalar 4-bit one)."""
    forced = os.environ.get("LOWBIT_CODEBOOK_AMX", "")[:1]
    if not cpu_routes.amx_bf16_ready() or x_dtype != torch.bfloat16 or forced == "0":
        return False
    if forced == "1":
        return True
    return env != "1" and M in (AMX_NIBBLE_M if w is not None and nibble_layout(w) else AMX_M)


def decoded_gemm_route(x_dtype, M, env, w=None):
    if takes_amx(x_dtype, M, env, w):
        return None
    return cpu_routes.decoded_gemm_route(x_dtype, M, env, small_m=SMALL_M, min_m_bf16=DECODED_GEMM_MIN_M["bf16"],
                                         min_m_fp32=DECODED_GEMM_MIN_M["fp32"])


def set_route_env(monkeypatch, env):
    cpu_routes.set_switch(monkeypatch, "LOWBIT_DECODED_GEMM", env)


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [9, 10, 23, 24, 96, 97])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ROUTE_LAYOUTS, ids=lambda v: layout_id(v[:5]) + f"K{v[5]}")
def test_decoded_gemm_routes_stay_within_their_bounds(monkeypatch, env, M, x_dtype, layout):
    """Each route is taken exactly where the rule says and stays within its bound: the fp32 one
    (the spec's weights, fp32 accumulation), plus eps_bf16 * sum|x||w| on the bf16 route (each
    weight rounded once to bf16 as on the Triton path, the product rounded to bf16 before the
    scale and bias) and on the AMX kernel (the same weights, an fp32 product)."""
    set_route_env(monkeypatch, env)
    monkeypatch.delenv("LOWBIT_CODEBOOK_AMX", raising=False)
    d, C, bits, R, G, K = layout
    w, _ = make_weight(21, K, d, C, bits, R, G, cb_dtype=torch.float16, seed=M)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    bias = torch.randn(21, generator=g)
    out, took_mm = cpu_routes.runs_aten_mm(lambda: ops.codebook_mm(x, w.packed, w.codebooks, w.scale, bias))
    route = decoded_gemm_route(x_dtype, M, env, w)
    assert took_mm == (route is not None), f"route {route}"
    wdeq = ref.codebook_dequant(w.packed, w.codebooks, w.scale, K)
    exact, bound = codebook_bound(x.float(), wdeq, bias, K, C, x_dtype)
    if route == "bf16" or takes_amx(x_dtype, M, env, w):
        bound = bound + torch.finfo(torch.bfloat16).eps * (x.double().abs() @ wdeq.double().abs().T)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max()} at bound {bound.flatten()[err.argmax()]}"


@pytest.mark.skipif(not cpu_routes.amx_bf16_ready(), reason="no AMX-BF16 (with AVX-512 F/BW/BF16) visible to lowbit here")
@pytest.mark.parametrize("layout", ROUTE_LAYOUTS, ids=lambda v: layout_id(v[:5]) + f"K{v[5]}")
def test_amx_one_hot_rows_give_the_bf16_weights_exactly(monkeypatch, layout):
    # bf16 one-hot rows of 64 (and the last, partial chunk as 64 rows ending at K) through the AMX
    # kernel: the unscaled weight rounded to bf16 (nearest even), times the scale in fp32, rounded
    # to bf16; every column, every row of a partial 16-row tile (N = 21), every accumulator tile.
    monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    monkeypatch.delenv("LOWBIT_CODEBOOK_AMX", raising=False)
    d, C, bits, R, G, K = layout
    w, _ = make_weight(21, K, d, C, bits, R, G, cb_dtype=torch.float16, seed=3)
    unscaled = ref.codebook_dequant(w.packed, w.codebooks, None, K)
    rows = min(64, K)
    assert takes_amx(torch.bfloat16, rows, None, w)
    for c0 in range(0, K, rows):
        cols = torch.arange(c0, c0 + rows) if c0 + rows <= K else torch.arange(K - rows, K)
        x = torch.zeros(rows, K, dtype=torch.bfloat16)
        x[torch.arange(rows), cols] = 1.0
        out = ops.codebook_mm(x, w.packed, w.codebooks, w.scale)
        want = (unscaled[:, cols].bfloat16().float() * w.scale[:, None]).bfloat16().T
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_decoded_gemm_panels_span_several_at_mm_calls(monkeypatch):
    # K = 8192: 512-row bf16 panels and 256-row fp32 ones, so N = 600 takes 2 and 3 at::mm calls.
    monkeypatch.setenv("LOWBIT_DECODED_GEMM", "1")
    N, K = 600, 8192
    w, _ = make_weight(N, K, 1, 1, 4, cb_dtype=torch.float16, seed=1)
    wdeq = ref.codebook_dequant(w.packed, w.codebooks, w.scale, K)
    for dtype, M, extra in ((torch.bfloat16, DECODED_GEMM_MIN_M["bf16"], True), (torch.float32, 96, False)):
        x = torch.randn(M, K).to(dtype)
        out = ops.codebook_mm(x, w.packed, w.codebooks, w.scale)
        exact, bound = codebook_bound(x.float(), wdeq, None, K, 1, dtype)
        if extra:
            bound = bound + torch.finfo(torch.bfloat16).eps * (x.double().abs() @ wdeq.double().abs().T)
        assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("layout", ROUTE_LAYOUTS, ids=lambda v: layout_id(v[:5]) + f"K{v[5]}")
def test_decoded_gemm_one_hot_rows_give_the_decoded_weights_exactly(monkeypatch, layout):
    # One-hot rows through both routes: at::mm of exact zeros and one product returns the decoded
    # weight itself. fp32: the reference's unscaled weight times the scale, bit for bit. bf16: the
    # unscaled weight rounded to bf16 (nearest even), times the scale in fp32, rounded to bf16.
    monkeypatch.setenv("LOWBIT_DECODED_GEMM", "1")
    d, C, bits, R, G, K = layout
    w, _ = make_weight(9, K, d, C, bits, R, G, cb_dtype=torch.float16, seed=2)
    unscaled = ref.codebook_dequant(w.packed, w.codebooks, None, K)
    for c0 in range(0, K, 128):
        cols = torch.arange(c0, min(K, c0 + 128))
        if len(cols) < DECODED_GEMM_MIN_M["fp32"]:
            cols = torch.arange(K - DECODED_GEMM_MIN_M["fp32"], K)
        x = torch.zeros(len(cols), K)
        x[torch.arange(len(cols)), cols] = 1.0
        out = ops.codebook_mm(x, w.packed, w.codebooks, w.scale)
        torch.testing.assert_close(out, (unscaled[:, cols] * w.scale[:, None]).T, rtol=0, atol=0)
        out = ops.codebook_mm(x.bfloat16(), w.packed, w.codebooks, w.scale)
        want = (unscaled[:, cols].bfloat16().float() * w.scale[:, None]).bfloat16().T
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_avx2_only_rule_on_avx512_machines():
    """The routes as an AVX2-only CPU without AMX would take them (LOWBIT_CPU_ISA=avx2 hides
    AVX-512; a subprocess: it is read once per process)."""
    if "avx512f" not in bench.cpu_flags() or os.environ.get("LOWBIT_CPU_ISA"):
        pytest.skip("nothing is hidden on this CPU")
    cpu_routes.rerun_with_env(__file__, "decoded_gemm", LOWBIT_CPU_ISA="avx2")


def test_portable_path_matches_reference():
    """The scalar kernel (machines without AVX2) runs when LOWBIT_CPU_ISA=scalar is set at startup."""
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        pytest.skip("already running on the portable path")
    if not _extension.LOADED:
        pytest.skip("lowbit._C is not built: the CPU op is the reference")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                        "test_mm_and_dequant_match_reference and 2064",
                        __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:]


# ----------------------------------------------------------------------------- bad inputs
def _good(M=2, N=6, K=64):
    w, _ = make_weight(N, K, d=4, C=2, bits=4, R=2, G=2)
    return dict(x=torch.randn(M, K), codes=w.packed, codebooks=w.codebooks, scale=w.scale, bias=None)


BAD = [
    (lambda a: a.update(codes=a["codes"][:, :-1]), "codes"),
    (lambda a: a.update(codes=a["codes"].to(torch.int16)), "codes"),
    (lambda a: a.update(codes=a["codes"][0]), "codes"),
    (lambda a: a.update(codebooks=a["codebooks"][:, :, :, :15]), "codebooks"),     # not 2**bits entries
    (lambda a: a.update(codebooks=torch.cat([a["codebooks"]] * 2, 3)), "codes"),   # 5-bit codebook, 4-bit codes
    (lambda a: a.update(codebooks=a["codebooks"][:, :, :, :, :3]), "codebooks"),   # d = 3
    (lambda a: a.update(codebooks=a["codebooks"].to(torch.int32)), "codebooks"),
    (lambda a: a.update(codebooks=a["codebooks"][0]), "codebooks"),
    (lambda a: a.update(codebooks=torch.cat([a["codebooks"]] * 3, 1)), "codebooks"),  # G=6 does not divide J=16
    (lambda a: a.update(codebooks=torch.cat([a["codebooks"]] * 2, 0)), "codebooks"),  # R=4 does not divide N=6
    (lambda a: a.update(scale=a["scale"][:-1]), "scale"),
    (lambda a: a.update(scale=a["scale"].to(torch.int32)), "scale"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=a["x"][0]), "x"),
    (lambda a: a.update(x=a["x"][:0]), "x"),
    (lambda a: a.update(x=a["x"][:, :62]), "x"),                                   # K not a multiple of d
    (lambda a: a.update(bias=torch.randn(4)), "bias"),
]


@pytest.mark.parametrize("change,arg", BAD)
def test_bad_inputs_raise_value_error(change, arg):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.codebook_mm: {arg}\b"):
        ops.codebook_mm(**args)


def test_bad_inputs_same_message_from_every_backend():
    from lowbit.backends import checked_reference
    for change, arg in BAD:
        args = _good()
        change(args)
        msgs = []
        for fn in (ops.codebook_mm, checked_reference("codebook_mm")):
            with pytest.raises(ValueError) as e:
                fn(**args)
            msgs.append(str(e.value).splitlines()[0])
        assert msgs[0] == msgs[1], arg


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(in_features=62), "in_features"),
    (lambda a: a.update(in_features=0), "in_features"),
    (lambda a: a.update(out_dtype=torch.int8), "out_dtype"),
    (lambda a: a.update(codebooks=a["codebooks"][:, :, :, :8]), "codes"),
])
def test_dequant_bad_inputs(change, arg):
    g = _good()
    args = dict(codes=g["codes"], codebooks=g["codebooks"], scale=g["scale"], in_features=64, out_dtype=None)
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.codebook_dequant: {arg}\b"):
        ops.codebook_dequant(**args)


# ----------------------------------------------------------------------------- torch integration
def test_opcheck():
    samples = [_good(M=1), _good(M=7)]
    samples[1]["bias"] = torch.randn(6)
    w, _ = make_weight(8, 1024 + 64, bits=4, cb_dtype=torch.float16, scale=False)
    samples.append(dict(x=torch.randn(3, 1024 + 64).bfloat16(), codes=w.packed, codebooks=w.codebooks, scale=None,
                        bias=None))
    for s in samples:
        args = (s["x"], s["codes"], s["codebooks"], s["scale"], s["bias"])
        torch.library.opcheck(torch.ops.lowbit.codebook_mm.default, args)
        torch.library.opcheck(torch.ops.lowbit.codebook_dequant.default,
                              (s["codes"], s["codebooks"], s["scale"], s["x"].shape[1]))


def test_torch_compile_fullgraph():
    a = _good(M=4)

    def f(x, codes, cb, s):
        return torch.nn.functional.gelu(ops.codebook_mm(x * 2, codes, cb, s)) + ops.codebook_dequant(codes, cb, s, 64).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (a["x"], a["codes"], a["codebooks"], a["scale"])
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
