"""2:4 sparse format (compress/decompress, mma.sp metadata), sparse24_mm and sparse24_int8_scaled_mm
(CPU C++ kernel) against the spec.

Float values: checked against the exact (float64) product of x and the dense pruned weight,
within a rigorous fp32 accumulation bound. int8 (W8A8): bit-exact against the reference, whose
integer accumulation is exact, with the same epilogue roundings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import cpu_routes
import lowbit  # noqa: F401
from lowbit import _extension, bench, ops
from lowbit.backends.reference import sparse24 as ref
from lowbit.formats import sparse24 as fmt
from lowbit.quant.nm_prune import nm_prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(d):
    return str(d).removeprefix("torch.")


def make_weight(N, K, values_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
    return fmt.from_dense(nm_prune(w), values_dtype=values_dtype)


def exact_and_bound(x, w, scale, bias, terms, out_dtype, bf16_product=False):
    """(exact result, worst-case |error|) for fp32 accumulation of `terms` products in any order.

    terms + 3 roundings per output (terms - 1 additions, the products, scale, bias), each at most
    eps32 times the sum of magnitudes; then half an ulp of out_dtype. bf16_product: the product
    is also rounded to bf16 before scale and bias (the bf16 panels route): eps_bf16 times the
    sum of the products' magnitudes more.
    """
    x64, w64 = x.double(), w.double()
    if scale is not None:
        w64 = w64 * scale.double().unsqueeze(1)
    exact = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    extra = torch.finfo(torch.bfloat16).eps * mag if bf16_product else 0.0
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = (terms + 3) * torch.finfo(torch.float32).eps * mag + extra
    out = torch.finfo(out_dtype)
    return exact, acc + out.eps * (exact.abs() + acc) + out.tiny


def check_against_exact(x, W, bias=None):
    out = ops.sparse24_mm(x, W.values, W.meta, W.scale, bias)
    N, K = W.out_features, W.in_features
    assert out.dtype == x.dtype and out.shape == (x.shape[0], N)
    w = fmt.decompress(W.values, W.meta, K, torch.float32)
    exact, bound = exact_and_bound(x.float(), w, W.scale, bias, fmt.padded_k(K) // 2, x.dtype)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max()} at bound {bound.flatten()[err.argmax()]}"
    return out


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("K", [1, 4, 6, 16, 37, 100, 4096 + 16])
@pytest.mark.parametrize("dtype", VALUE_DTYPES[:3], ids=dtype_id)
def test_compress_decompress_round_trip(K, dtype):
    w = nm_prune(torch.randn(9, K)).to(dtype)
    values, meta = fmt.compress(w)
    Kp = fmt.padded_k(K)
    assert values.shape == (9, Kp // 2) and values.dtype == dtype
    assert meta.shape == (9, Kp // 8) and meta.dtype == torch.uint8
    assert fmt.meta_is_valid(meta)
    assert torch.equal(fmt.decompress(values, meta, K), w)


def test_round_trip_keeps_explicit_zeros_and_sparser_patterns():
    # 1:4 and all-zero groups still name two distinct columns; the kept zeros decompress to 0.
    w = nm_prune(torch.randn(8, 64), 1, 4)
    w[0] = 0
    values, meta = fmt.compress(w)
    assert fmt.meta_is_valid(meta)
    assert torch.equal(fmt.decompress(values, meta, 64), w)


def test_compress_refuses_more_than_two_per_group():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        fmt.compress(w)


def test_meta_layout_is_the_documented_one():
    K = 40
    w = nm_prune(torch.randn(5, K))
    values, meta = fmt.compress(w)
    Kp = fmt.padded_k(K)
    wp = torch.zeros(5, Kp)
    wp[:, :K] = w
    for n in range(5):
        for g in range(Kp // 4):
            nib = (int(meta[n, g // 2]) >> (4 * (g % 2))) & 0xF
            i0, i1 = nib & 3, nib >> 2
            assert i0 < i1
            assert float(values[n, 2 * g]) == float(wp[n, 4 * g + i0])
            assert float(values[n, 2 * g + 1]) == float(wp[n, 4 * g + i1])
            others = [c for c in range(4) if c not in (i0, i1)]
            assert all(float(wp[n, 4 * g + c]) == 0 for c in others)


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8], ids=dtype_id)
def test_cutlass_meta_matches_torch_reference_conversion(values_dtype):
    # torch's own (CPU-capable) re-implementation of CUTLASS's reorder_meta is the oracle.
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    N, K = 64, 128
    if values_dtype == torch.int8:
        dense = nm_prune(torch.randint(1, 100, (N, K)).float() * torch.sign(torch.randn(N, K))).to(torch.int8)
    else:
        dense = nm_prune(torch.randn(N, K)).to(values_dtype)
    if values_dtype == torch.float32:
        pytest.skip("torch's CUTLASS float32 path is 1:2 (tf32), not 2:4")
    sparse, meta_reordered = conv.sparse_semi_structured_from_dense_cutlass(dense)
    values, meta = fmt.compress(dense)
    assert torch.equal(values, sparse)
    assert torch.equal(fmt.to_cutlass_meta(meta, values_dtype), meta_reordered)
    assert torch.equal(fmt.from_cutlass_meta(meta_reordered, values_dtype), meta)


def test_torch_semi_structured_round_trip():
    ok, why = fmt.semi_structured_available()
    if not ok:
        pytest.skip(why)
    W = make_weight(64, 128, torch.float16)
    W = fmt.Sparse24Weight(W.values.cuda(), W.meta.cuda(), W.in_features)
    t = fmt.to_torch_semi_structured(W)
    back = fmt.from_torch_semi_structured(t)
    assert torch.equal(fmt.dense_weight(back), fmt.dense_weight(W))


# ----------------------------------------------------------------------------- sparse24_layout.h
LAYOUT_PROBE = r"""
#include <cstdio>
#include <vector>
#include "lowbit/sparse24_layout.h"
using namespace lowbit::sparse24_layout;
int main() {
  long long N, K;
  if (std::scanf("%lld %lld", &N, &K) != 2) return 1;
  const long long mb = meta_bytes_per_row(K);
  std::vector<uint8_t> meta(N * mb);
  for (auto& v : meta) { unsigned b; if (std::scanf("%u", &b) != 1) return 1; v = uint8_t(b); }
  std::printf("sizes %lld %lld %lld\n", padded_k(K), values_per_row(K), mb);
  for (long long n = 0; n < N; ++n)
    for (long long j = 0; j < values_per_row(K); ++j) std::printf("col %lld %lld %lld\n", n, j, kept_column(&meta[n * mb], j));
  for (unsigned v = 0; v < 16; ++v) std::printf("valid %u %d\n", v, int(nibble_valid(v)));
  const long long shapes[][3] = {{64, 8, 0}, {32, 4, 0}, {32, 2, 1}, {48, 3, 1}};
  for (const auto& s : shapes)
    for (long long r = 0; r < s[0]; ++r)
      for (long long c = 0; c < s[1]; ++c)
        std::printf("off %lld %lld %lld %lld %lld\n", s[0], s[1], s[2], r * s[1] + c, cutlass_meta_offset(r, c, s[0], s[2]));
  return 0;
}
"""


@pytest.fixture(scope="module")
def layout_probe(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("sparse24_layout")
    src, exe = d / "probe.cpp", d / "probe"
    src.write_text(LAYOUT_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(meta, K):
        stdin = f"{meta.shape[0]} {K}\n" + " ".join(str(int(v)) for v in meta.flatten().tolist()) + "\n"
        out: dict[str, list[tuple]] = {}
        for line in subprocess.run([str(exe)], input=stdin, check=True, capture_output=True, text=True).stdout.splitlines():
            key, *vals = line.split()
            out.setdefault(key, []).append(tuple(int(v) for v in vals))
        return out

    return run


def test_layout_header_matches_python_format(layout_probe):
    K = 50
    w = nm_prune(torch.randn(3, K))
    values, meta = fmt.compress(w)
    out = layout_probe(meta, K)
    Kp = fmt.padded_k(K)
    assert out["sizes"] == [(Kp, Kp // 2, Kp // 8)]
    idx = fmt.unpack_meta(meta)  # [N, G, 2]
    want = {(n, j): 4 * (j // 2) + int(idx[n, j // 2, j % 2]) for n in range(3) for j in range(Kp // 2)}
    assert {(n, j): c for n, j, c in out["col"]} == want
    assert [v for _, v in sorted(out["valid"])] == [int(b) for b in fmt.VALID_NIBBLES]
    by_shape: dict[tuple, dict[int, int]] = {}
    for rows, cols, i8, i, off in out["off"]:
        by_shape.setdefault((rows, cols, i8), {})[i] = off
    for (rows, cols, i8), offs in by_shape.items():
        py = fmt.cutlass_meta_offsets(rows, cols, torch.int8 if i8 else torch.float16)
        assert [offs[i] for i in range(rows * cols)] == py.tolist(), (rows, cols, i8)


# ----------------------------------------------------------------------------- sparse24_mm
SHAPES = [(33, 16), (8, 37), (40, 100), (31, 1100), (17, 4096 + 16), (64, 64)]


@pytest.mark.parametrize("M", [1, 3, 4, 6, 17])
@pytest.mark.parametrize("N,K", SHAPES)
def test_matches_exact(M, N, K):
    check_against_exact(torch.randn(M, K), make_weight(N, K))


@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=dtype_id)
def test_large_m_dense_panel_path(x_dtype, values_dtype):
    """From 64 rows of x the CPU op decompresses the weight into dense fp32 panels and calls
    torch's GEMM (63: the gather kernel); K not a multiple of 16, scale and bias."""
    N, K = 37, 100
    W = make_weight(N, K, values_dtype, seed=2)
    for M in (63, 64, 70):
        x = torch.randn(M, K).to(x_dtype)
        check_against_exact(x, W, bias=torch.randn(N))


def test_large_m_dense_panels_split_the_rows():
    # Panels hold 2**22 floats: 262 rows at K = 16000, so 263 rows make two (the second of one row).
    N, K = 263, 16000
    W = make_weight(N, K, torch.bfloat16, seed=3)
    check_against_exact(torch.randn(64, K), W, bias=torch.randn(N))


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", [None, torch.bfloat16], ids=dtype_id)
def test_dtypes_and_bias(M, x_dtype, values_dtype, bias_dtype):
    N, K = 37, 300
    W = make_weight(N, K, values_dtype)
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    check_against_exact(torch.randn(M, K).to(x_dtype), W, bias)


# ---- bf16 values and bf16 x on AMX CPUs (csrc/cpu/sparse24.cpp): the AMX kernel (float_amx)
# from AMX_MIN_M rows, bf16 panels for torch's GEMM from DECODED_MIN_M
AMX_MIN_M = 3
DECODED_MIN_M = 224
AMX_VALUE_DTYPES = (torch.bfloat16, torch.int8)  # values exact in bf16 (int8 with its row scale)


def takes_amx(M, values_dtype=torch.bfloat16, x_dtype=torch.bfloat16, env=None):
    """Whether sparse24_mm takes the AMX kernel: bf16 or int8 values and bf16 x, AMX_MIN_M to DECODED_MIN_M - 1
    rows where AMX-BF16 is ready (from AMX_MIN_M with LOWBIT_DECODED_GEMM=0), unless
    LOWBIT_SPARSE24_AMX=0 or LOWBIT_DECODED_GEMM=1; every M with LOWBIT_SPARSE24_AMX=1."""
    if values_dtype not in AMX_VALUE_DTYPES or x_dtype != torch.bfloat16 or not cpu_routes.amx_bf16_ready():
        return False
    if env in ("0", "1"):
        return env == "1"
    decoded = os.environ.get("LOWBIT_DECODED_GEMM", "")[:1]
    return M >= AMX_MIN_M and decoded != "1" and (M < DECODED_MIN_M or decoded == "0")


def takes_bf16_panels(M, env=None):
    """Whether bf16 x with bf16 or int8 values takes the bf16 panels: from DECODED_MIN_M rows on AMX CPUs,
    unless LOWBIT_DECODED_GEMM=0 or LOWBIT_SPARSE24_AMX=1."""
    if env == "1" or not cpu_routes.amx_bf16_ready():
        return False
    return M >= DECODED_MIN_M and os.environ.get("LOWBIT_DECODED_GEMM", "")[:1] != "0"


def _set_amx_env(monkeypatch, env):
    cpu_routes.set_switch(monkeypatch, "LOWBIT_SPARSE24_AMX", env)


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [1, 2, 3, 17, 64, 65, 130])
@pytest.mark.parametrize("N,K", [(16, 32), (37, 100), (33, 4096 + 16), (20, 48)])
@pytest.mark.parametrize("values_dtype", AMX_VALUE_DTYPES, ids=dtype_id)
def test_bf16_amx_route_within_the_fp32_bound(monkeypatch, env, M, N, K, values_dtype):
    """Every route for bf16 x with bf16 or int8 values stays within the fp32 accumulation bound:
    the AMX kernel multiplies exactly (bf16 x bf16; int8 values widen exactly) and accumulates in
    fp32. K = 100, 48, 4112: a last block of 16 columns (Kp % 32 == 16); N not a multiple of the
    16-row tile; M past one and two passes of 64 rows of x. Scale and bias go through the epilogue."""
    _set_amx_env(monkeypatch, env)
    W = make_weight(N, K, values_dtype, seed=N + K)
    x = torch.randn(M, K).bfloat16()
    check_against_exact(x, W, bias=torch.randn(N))
    scale = W.scale if W.scale is not None else torch.rand(N) + 0.5
    out = ops.sparse24_mm(x, W.values, W.meta, scale)
    w = fmt.decompress(W.values, W.meta, K, torch.float32)
    exact, bound = exact_and_bound(x.float(), w, scale, None, fmt.padded_k(K) // 2, x.dtype)
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("env", ["0", "1"], ids=["never", "always"])
@pytest.mark.parametrize("N,K", [(16, 64), (19, 112)])
@pytest.mark.parametrize("values_dtype", AMX_VALUE_DTYPES, ids=dtype_id)
def test_bf16_one_hot_rows_give_the_weight_bit_for_bit(monkeypatch, env, N, K, values_dtype):
    """x = rows of the identity: out[k, n] is the dense weight w[n, k] itself (times the row scale
    of int8 values, rounded as the reference rounds it), so any value landing in the wrong column,
    row or block, or a kept value dropped, shows. Every column of K, both routes."""
    _set_amx_env(monkeypatch, env)
    W = make_weight(N, K, values_dtype, seed=7)
    x = torch.eye(K, dtype=torch.bfloat16)
    out = ops.sparse24_mm(x, W.values, W.meta, W.scale)
    assert torch.equal(out, ref.sparse24_mm(x, W.values, W.meta, W.scale))
    assert (out != 0).sum() >= N * K // 2 - N  # the kept values are (almost all) nonzero


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [1, 3, 70])
def test_bf16_amx_route_counts_subnormal_activations_as_zero(monkeypatch, env, M):
    """The documented AMX convention: a subnormal bf16 activation (1e-39) times a kept value of
    2^100 is ~7.9e-9 on the other routes and 0 on AMX. Tells the routes apart (takes_amx)."""
    _set_amx_env(monkeypatch, env)
    N, K = 16, 64
    W = make_weight(N, K, torch.bfloat16, seed=1)
    values = W.values.clone()
    values[3, 0] = 2.0 ** 100
    k0 = int(W.meta[3, 0]) & 3  # column of row 3's first kept value (group 0's i0)
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    x[:, k0] = 1e-39
    assert x[0, k0] != 0
    out = ops.sparse24_mm(x, values, W.meta)
    want = 0.0 if takes_amx(M, env=env) else float((x[0, k0].double() * 2.0 ** 100).bfloat16())
    assert float(out[0, 3]) == want


@pytest.mark.parametrize("M", [3, 64, 300])
@pytest.mark.parametrize("row,col", [(37, 3), (39, 2 * (2048 + 16) // 16 - 1)])
@pytest.mark.parametrize("values_dtype", AMX_VALUE_DTYPES, ids=dtype_id)
def test_bf16_amx_routes_refuse_bad_meta(monkeypatch, M, row, col, values_dtype):
    """The C++ op validates the metadata before the AMX kernel or the bf16 panels read it (a bad
    nibble would give the wrong number of kept columns to vpexpandw), in any row and in a row's
    last byte."""
    monkeypatch.delenv("LOWBIT_SPARSE24_AMX", raising=False)
    N, K = 40, 2048 + 16
    W = make_weight(N, K, values_dtype)
    meta = W.meta.clone()
    meta[row, col] = (meta[row, col] & 0xF0) | 0x7
    x = torch.randn(M, K).bfloat16()
    torch.ops.lowbit.sparse24_mm(x, W.values, W.meta, W.scale, None)
    with pytest.raises(ValueError, match=rf"lowbit\.sparse24_mm: meta\[{row}, {col}\]="):
        torch.ops.lowbit.sparse24_mm(x, W.values, meta, W.scale, None)


@pytest.mark.parametrize("amx_env", ["0", None], ids=["no-amx", "auto"])
@pytest.mark.parametrize("decoded_env", ["0", None], ids=["no-panels", "auto"])
@pytest.mark.parametrize("M", [223, 224, 300])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("values_dtype", AMX_VALUE_DTYPES, ids=dtype_id)
def test_bf16_large_m_routes_stay_within_their_bounds(monkeypatch, amx_env, decoded_env, M, with_scale,
                                                      values_dtype):
    """From 224 rows, bf16 values and x take bf16 panels and torch's GEMM: without scale and bias
    at::mm's rounding to bf16 is the only one (the fp32 bound); with them the bf16 product is
    scaled and biased in fp32 and rounded again (eps_bf16 more). LOWBIT_DECODED_GEMM=0: the fp32
    dense panels; LOWBIT_SPARSE24_AMX=0 below 224: the AVX2 gather. K = 100: a half last block."""
    _set_amx_env(monkeypatch, amx_env)
    cpu_routes.set_switch(monkeypatch, "LOWBIT_DECODED_GEMM", decoded_env)
    N, K = 37, 100
    W = make_weight(N, K, values_dtype, seed=M)
    x = torch.randn(M, K).bfloat16()
    w = fmt.decompress(W.values, W.meta, K, torch.float32)
    panels = takes_bf16_panels(M, env=amx_env)
    if W.scale is None:  # int8 values always have a scale
        out = ops.sparse24_mm(x, W.values, W.meta)
        exact, bound = exact_and_bound(x.float(), w, None, None, fmt.padded_k(K) // 2, x.dtype)
        assert ((out.double() - exact).abs() <= bound).all()
    scale = W.scale if W.scale is not None else (torch.rand(N) + 0.5 if with_scale else None)
    bias = torch.randn(N)
    out = ops.sparse24_mm(x, W.values, W.meta, scale, bias)
    exact, bound = exact_and_bound(x.float(), w, scale, bias, fmt.padded_k(K) // 2, x.dtype, bf16_product=panels)
    assert ((out.double() - exact).abs() <= bound).all()


def test_bf16_panels_one_hot_rows_give_the_weight_bit_for_bit():
    """K = 240 rows of the identity (240 >= 224: the bf16 panels where AMX is ready), a half last
    block: out is the dense weight's transpose, exactly."""
    N, K = 19, 240
    W = make_weight(N, K, torch.bfloat16, seed=5)
    out = ops.sparse24_mm(torch.eye(K, dtype=torch.bfloat16), W.values, W.meta)
    assert torch.equal(out, fmt.decompress(W.values, W.meta, K, torch.float32).T.bfloat16())


@pytest.mark.parametrize("M", [1, 9])
def test_float_values_with_scale(M):
    W = make_weight(21, 300)
    scale = torch.rand(21) + 0.5
    x = torch.randn(M, 300)
    out = ops.sparse24_mm(x, W.values, W.meta, scale)
    w = fmt.decompress(W.values, W.meta, 300, torch.float32)
    exact, bound = exact_and_bound(x, w, scale, None, 152, torch.float32)
    assert ((out.double() - exact).abs() <= bound).all()


def test_matches_dense_matmul_on_pruned_weight_for_a_large_layer():
    # The acceptance: sparse24_mm == dense matmul on the pruned weight (fp tolerance).
    w = nm_prune(torch.randn(256, 4096))
    W = fmt.from_dense(w)
    x = torch.randn(2, 4096)
    exact, bound = exact_and_bound(x, w, None, None, 2048, torch.float32)
    got = ops.sparse24_mm(x, W.values, W.meta)
    assert ((got.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(got, x @ w.T, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs_equal_contiguous():
    N, K, M = 21, 200, 5
    W = make_weight(N, K)
    x = torch.randn(2 * K, M)[::2].T
    values = torch.zeros(N, 2 * W.values.shape[1])
    values[:, ::2] = W.values
    values = values[:, ::2]
    meta = W.meta.T.contiguous().T
    bias = torch.randn(2 * N)[::2]
    assert not any(t.is_contiguous() for t in (x, values, meta, bias))
    got = ops.sparse24_mm(x, values, meta, None, bias)
    want = ops.sparse24_mm(x.contiguous(), W.values, W.meta, None, bias.contiguous())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- int8 (W8A8)
@pytest.mark.parametrize("M", [1, 2, 5, 17])
@pytest.mark.parametrize("N,K", [(33, 16), (8, 37), (40, 100), (17, 4096 + 16), (16, 64)])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=dtype_id)
def test_int8_bit_exact(M, N, K, out_dtype):
    W = make_weight(N, K, torch.int8)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    sa, sb = torch.rand(M) + 0.1, W.scale
    bias = torch.randn(N)
    got = ops.sparse24_int8_scaled_mm(a, W.values, W.meta, sa, sb, bias, out_dtype)
    want = ref.sparse24_int8_scaled_mm(a, W.values, W.meta, sa, sb, bias, out_dtype)
    assert got.dtype == (out_dtype or torch.float32)
    assert torch.equal(got, want)


def test_int8_integer_accumulation_is_exact():
    # Unit scales and |acc| < 2**24: the float output *is* the exact integer dot product.
    K = 4096 + 16
    W = make_weight(24, K, torch.int8)
    a = torch.randint(-128, 128, (3, K), dtype=torch.int8)
    one = torch.ones(())
    got = ops.sparse24_int8_scaled_mm(a, W.values, W.meta, one, one)
    dense = fmt.decompress(W.values, W.meta, K, torch.int64)
    exact = a.to(torch.int64) @ dense.T
    assert exact.abs().max() < 2**24
    assert torch.equal(got.to(torch.int64), exact)


def test_int8_worst_case_does_not_overflow():
    K = 4096
    values = torch.full((2, K // 2), -128, dtype=torch.int8)
    meta = torch.full((2, K // 8), 0x44, dtype=torch.uint8)  # columns 0 and 1 of each group
    a = torch.full((1, K), -128, dtype=torch.int8)
    one = torch.ones(())
    got = ops.sparse24_int8_scaled_mm(a, values, meta, one, one)
    assert torch.equal(got, torch.full((1, 2), float(K // 2 * 128 * 128)))


# The AVX2 kernel multiplies |w| by sign(x)*sign(w) unless x holds -128 (then |x| by
# sign(w)*sign(x), recomputing tiles whose weights hold -128 in scalar). Random int8 x over the
# full range holds -128 in almost every row of length >= 256, so these tests draw x from
# [-127, 127] (the range int8_quantize_dynamic writes) to cover the first form, with weights
# that do hold -128, and put -128 into a single row of x to cover the switch.
def _int8_weight_with_min(N, K, seed=0):
    W = make_weight(N, K, torch.int8, seed)
    values = W.values.clone()
    g = torch.Generator().manual_seed(seed + 1)
    values[torch.rand(values.shape, generator=g) < 0.05] = -128
    return values, W.meta, W.scale


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N,K", [(1, 64), (3, 16), (5, 48), (7, 100), (33, 1000), (6, 4096 + 16)])
def test_int8_exact_without_minus128_in_x(M, N, K):
    """Unit scales, |acc| < 2**24: the output is the exact integer product (K % 64 != 0: tail)."""
    values, meta, _ = _int8_weight_with_min(N, K)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(M * K))
    one = torch.ones(())
    got = ops.sparse24_int8_scaled_mm(a, values, meta, one, one)
    exact = a.to(torch.int64) @ fmt.decompress(values, meta, K, torch.int64).T
    assert exact.abs().max() < 2**24
    assert torch.equal(got.to(torch.int64), exact)
    sa, sb, bias = torch.rand(M) + 0.1, torch.rand(N) + 0.1, torch.randn(N)
    for out_dtype in (None, torch.float16, torch.bfloat16):
        got = ops.sparse24_int8_scaled_mm(a, values, meta, sa, sb, bias, out_dtype)
        assert torch.equal(got, ref.sparse24_int8_scaled_mm(a, values, meta, sa, sb, bias, out_dtype))


INT8_DENSE_MIN_M = 20  # kInt8DenseMinM in csrc/cpu/sparse24.cpp


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [19, 20, 33])
@pytest.mark.parametrize("N,K", [(7, 100), (2000, 4096 + 16)])
def test_int8_dense_amx_path_is_bit_identical(monkeypatch, env, M, N, K):
    """From M = 20 on AMX-INT8 CPUs the weight is decompressed into dense int8 panels (1984 rows at
    this K: two panels for N = 2000) and at::_int_mm gives the exact int32 product: the outputs
    are the same bits as the AVX2 kernel's and the reference's, -128 anywhere included."""
    if env is None:
        monkeypatch.delenv("LOWBIT_INT8_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_INT8_ONEDNN", env)
    values, meta, scale = _int8_weight_with_min(N, K, seed=M)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(M))
    sa, bias = torch.rand(M) + 0.1, torch.randn(N)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = ops.sparse24_int8_scaled_mm(a, values, meta, sa, scale, bias, torch.bfloat16)
    flags = bench.cpu_flags()
    avx2 = "avx2" in flags and os.environ.get("LOWBIT_CPU_ISA") != "scalar"
    dense = avx2 and M >= INT8_DENSE_MIN_M and (env == "1" or (env is None and "amx_int8" in flags))
    assert any(e.name == "aten::_int_mm" for e in prof.events()) == dense
    assert torch.equal(got, ref.sparse24_int8_scaled_mm(a, values, meta, sa, scale, bias, torch.bfloat16))
    one = torch.ones(())
    exact = a.to(torch.int64) @ fmt.decompress(values, meta, K, torch.int64).T
    assert torch.equal(ops.sparse24_int8_scaled_mm(a, values, meta, one, one).double(), exact.double())


@pytest.mark.parametrize("M", [1, 6])
def test_int8_minus128_in_one_row_of_x(M):
    N, K = 9, 4096 + 48
    values, meta, _ = _int8_weight_with_min(N, K, seed=3)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    a[M - 1, K - 1] = -128
    one = torch.ones(())
    got = ops.sparse24_int8_scaled_mm(a, values, meta, one, one)
    exact = a.to(torch.int64) @ fmt.decompress(values, meta, K, torch.int64).T
    assert torch.equal(got.to(torch.int64), exact)


def test_int8_extreme_products_do_not_saturate():
    # |w| = 128 against x = +-127 everywhere: int16 pair sums of 2 * 128 * 127 = 32512.
    K = 4096
    values = torch.full((3, K // 2), -128, dtype=torch.int8)
    values[1] = 127
    meta = torch.full((3, K // 8), 0xE9, dtype=torch.uint8)  # columns (1, 2) and (2, 3)
    a = torch.full((2, K), 127, dtype=torch.int8)
    a[1, 1::2] = -127
    one = torch.ones(())
    got = ops.sparse24_int8_scaled_mm(a, values, meta, one, one)
    exact = a.to(torch.int64) @ fmt.decompress(values, meta, K, torch.int64).T
    assert torch.equal(got.to(torch.int64), exact)


def test_portable_path_matches_reference():
    """The scalar kernels (no AVX2) run when LOWBIT_CPU_ISA=scalar is set at startup."""
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        pytest.skip("already running on the portable path")
    if not _extension.LOADED:
        pytest.skip("lowbit._C is not built: the CPU op is the reference")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    ids = ["test_matches_exact[31-1100-17]", "test_matches_exact[8-37-1]",
           "test_dtypes_and_bias[bfloat16-int8-float16-5]", "test_int8_bit_exact[None-17-4112-5]",
           "test_int8_bit_exact[bfloat16-8-37-1]", "test_non_contiguous_inputs_equal_contiguous"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [f"{__file__}::{i}" for i in ids],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{len(ids)} passed" in r.stdout, r.stdout[-3000:]


# ----------------------------------------------------------------------------- bad inputs
def _good(M=2, N=5, K=64, values_dtype=torch.float32):
    W = make_weight(N, K, values_dtype)
    return dict(x=torch.randn(M, K), values=W.values, meta=W.meta, scale=W.scale, bias=None)


def _bad_meta(a):
    meta = a["meta"].clone()
    meta[1, 2] = 0x47  # high nibble 0x4 is fine, low nibble 0x7 = (3, 1): indices not increasing
    a.update(meta=meta)


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(values=a["values"][:, :-1]), "values"),
    (lambda a: a.update(values=a["values"].to(torch.int32)), "values"),
    (lambda a: a.update(values=a["values"][0]), "values"),
    (lambda a: a.update(meta=a["meta"][:, :-1]), "meta"),
    (lambda a: a.update(meta=a["meta"][:-1]), "meta"),
    (lambda a: a.update(meta=a["meta"].to(torch.int8)), "meta"),
    (_bad_meta, r"meta\[1, 2\]=0x47"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=a["x"][0]), "x"),
    (lambda a: a.update(x=a["x"][:0]), "x"),
    (lambda a: a.update(x=a["x"][:, :40]), "values"),
    (lambda a: a.update(scale=torch.ones(4)), "scale"),
    (lambda a: a.update(scale=torch.ones(5, dtype=torch.float16)), "scale"),
    (lambda a: a.update(bias=torch.randn(4)), "bias"),
])
def test_bad_inputs_raise_value_error(change, arg):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.sparse24_mm: {arg}\b"):
        ops.sparse24_mm(**args)
    # The reference (what CUDA tensors fall back to) and the fake kernel say the same thing.
    from lowbit.backends import checked_reference

    with pytest.raises(ValueError, match=rf"lowbit\.sparse24_mm: {arg}\b") as e_ref:
        checked_reference("sparse24_mm")(*args.values())
    with pytest.raises(ValueError) as e_cpu:
        ops.sparse24_mm(**args)
    assert str(e_ref.value) == str(e_cpu.value)


def test_int8_values_need_a_scale():
    args = _good(values_dtype=torch.int8)
    args["scale"] = None
    with pytest.raises(ValueError, match=r"lowbit\.sparse24_mm: scale \(float32 \[N\]\) is required"):
        ops.sparse24_mm(**args)


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(values=a["values"].float()), "values"),
    (lambda a: a.update(a=a["a"].float()), "a"),
    (lambda a: a.update(scale_a=torch.ones(3)), "scale_a"),
    (lambda a: a.update(scale_b=torch.ones(4)), "scale_b"),
    (_bad_meta, r"meta\[1, 2\]=0x47"),
])
def test_int8_bad_inputs(change, arg):
    W = make_weight(5, 64, torch.int8)
    args = dict(a=torch.randint(-5, 5, (2, 64), dtype=torch.int8), values=W.values, meta=W.meta,
                scale_a=torch.ones(2), scale_b=W.scale)
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.sparse24_int8_scaled_mm: {arg}\b"):
        ops.sparse24_int8_scaled_mm(**args)


@pytest.mark.parametrize("M", [1, 20, 64])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.int8], ids=dtype_id)
@pytest.mark.parametrize("row,col", [(37, 3), (39, 2 * (2048 + 16) // 16 - 1)])
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_bad_meta_in_a_late_row_block_is_found_by_the_kernel(monkeypatch, M, values_dtype, row, col, onednn):
    """The C++ op itself (no Python check in front) refuses bad metadata in any row block and
    in the last metadata byte of a row; the AVX2 kernels check it block by block, the dense
    int8 path (LOWBIT_INT8_ONEDNN=1, M >= 20) before decompressing."""
    monkeypatch.setenv("LOWBIT_INT8_ONEDNN", onednn)
    N, K = 40, 2048 + 16
    W = make_weight(N, K, values_dtype)
    meta = W.meta.clone()
    meta[row, col] = (meta[row, col] & 0xF0) | 0x7
    if values_dtype == torch.int8:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        call = lambda m: torch.ops.lowbit.sparse24_int8_scaled_mm(a, W.values, m, torch.ones(M), W.scale, None, None)  # noqa: E731
        op = "sparse24_int8_scaled_mm"
    else:
        x = torch.randn(M, K)
        call = lambda m: torch.ops.lowbit.sparse24_mm(x, W.values, m, None, None)  # noqa: E731
        op = "sparse24_mm"
    call(W.meta)
    with pytest.raises(ValueError, match=rf"lowbit\.{op}: meta\[{row}, {col}\]="):
        call(meta)


# ----------------------------------------------------------------------------- torch integration
def test_opcheck():
    for M, N, K, vd in [(1, 5, 64, torch.float32), (7, 9, 100, torch.bfloat16), (3, 16, 37, torch.int8)]:
        s = _good(M, N, K, vd)
        s["bias"] = torch.randn(N)
        torch.library.opcheck(torch.ops.lowbit.sparse24_mm.default,
                              (s["x"], s["values"], s["meta"], s["scale"], s["bias"]))
    # bf16 x: the AMX kernel (M = 7) and the bf16 panels (M = 230) on AMX CPUs
    for M, vd in [(7, torch.bfloat16), (7, torch.int8), (230, torch.bfloat16)]:
        s = _good(M, 9, 100, vd)
        torch.library.opcheck(torch.ops.lowbit.sparse24_mm.default,
                              (s["x"].bfloat16(), s["values"], s["meta"], s["scale"], torch.randn(9)))
    W = make_weight(6, 50, torch.int8)
    a = torch.randint(-128, 128, (3, 50), dtype=torch.int8)
    torch.library.opcheck(torch.ops.lowbit.sparse24_int8_scaled_mm.default,
                          (a, W.values, W.meta, torch.rand(3), W.scale, None, torch.float16))


def test_torch_compile_fullgraph():
    a = _good(M=4, N=6, K=256)

    def f(x, v, m):
        return torch.nn.functional.gelu(ops.sparse24_mm(x * 2, v, m)) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (a["x"], a["values"], a["meta"])
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
