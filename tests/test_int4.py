"""INT4 weight format, quantizer and int4_weight_only_mm (CPU C++ kernel) against the spec.

The kernel is checked against the exact (float64) product of x and the reference's dequantized
weight, within a rigorous fp32 accumulation bound: it may sum in any order, but never quantizes
activations and never rounds a weight differently than by fp32 arithmetic. The AVX2 small-M
kernel (M <= SMALL_M without AVX-512) computes s * (sum(x * q) - z * sum(x)) per group, so its
bound is taken over |x| (|q| + |z|) |s| instead of |x| |q - z| |s| (csrc/cpu/int4.cpp,
small_m_tile). bf16 x on AMX CPUs (the AMX kernel, the bf16 decoded-GEMM route) gets each weight
rounded once to bf16: eps_bf16 * sum|x||w| more.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import cpu_routes
import lowbit  # noqa: F401
from lowbit import _extension, bench, ops
from lowbit.backends.reference import int4 as ref
from lowbit.formats import int4 as fmt

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(d):
    return str(d).removeprefix("torch.")


def make_weight(N, K, group_size, symmetric, scale_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
    return fmt.quantize_weight(w, group_size, symmetric, scale_dtype)


# The small-M kernel's last M (csrc/cpu/int4.cpp): kSmallMAvx512 (the table-lookup kernel) where
# lowbit sees AVX-512F (cpu::has_avx512f; LOWBIT_CPU_ISA=avx2 hides it), else kSmallM (the folded
# AVX2 kernel).
AVX512 = "avx512f" in cpu_routes.visible_cpu_flags() and os.environ.get("LOWBIT_CPU_ISA") != "scalar"
SMALL_M = 32 if AVX512 else 5
# bf16 x of AMX_M rows takes the AMX kernel where AMX-BF16 is ready (kAmxMinM, kAmxMaxM).
AMX = cpu_routes.amx_bf16_ready()
AMX_M = range(5, 257)


def takes_amx(x_dtype, M, env=None):
    """Whether the AMX kernel runs, with LOWBIT_DECODED_GEMM=env and LOWBIT_INT4_AMX as set now."""
    forced = os.environ.get("LOWBIT_INT4_AMX")
    if not AMX or x_dtype != torch.bfloat16:
        return False
    if forced in ("0", "1"):
        return forced == "1"
    return env != "1" and M in AMX_M


def int4_bound(x, wdeq, bias, K, out_dtype, wmag=None):
    """(exact result, worst-case |error|) for fp32 accumulation in any order, rounded to out_dtype.

    K + 4 roundings per output: K - 1 additions, the product, the per-group scale (the small-M
    kernel scales a group's sum instead of each weight, which the reference rounded once), the
    bias. Each costs at most eps32 times the sum of magnitudes. The output rounding adds half an
    ulp of out_dtype, bounded by out_eps * |result|. `wmag` replaces |wdeq| in those magnitudes
    for a kernel whose terms are not x * wdeq (the small-M kernel's (|q| + |z|) |s|).
    """
    x64, w64 = x.double(), wdeq.double()
    exact = x64 @ w64.T
    mag = x64.abs() @ (w64.abs() if wmag is None else wmag.double()).T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = (K + 4) * torch.finfo(torch.float32).eps * mag
    out = torch.finfo(out_dtype)
    return exact, acc + out.eps * (exact.abs() + acc) + out.tiny


def folded_weight_magnitude(q, zero):
    """(|q| + |z|) |s| per weight [N, K]: the term magnitudes of the small-M kernel."""
    K, gs = q.in_features, q.group_size
    codes = fmt.unpack(q.packed, K).double()
    z = zero.double() if zero is not None else torch.full_like(q.scale, 8, dtype=torch.float64)
    per_col = lambda t: t.repeat_interleave(gs, dim=1)[:, :K]  # noqa: E731
    return (codes + per_col(z).abs()) * per_col(q.scale.double()).abs()


def check_against_exact(x, q, bias=None, zero=None):
    zero = q.zero if zero is None else zero
    out = ops.int4_weight_only_mm(x, q.packed, q.scale, zero, q.group_size, bias)
    N, K = q.out_features, q.in_features
    assert out.dtype == x.dtype and out.shape == (x.shape[0], N)
    wdeq = ref.int4_dequantize(q.packed, q.scale, zero, q.group_size, K)
    wmag = folded_weight_magnitude(q, zero) if x.shape[0] <= SMALL_M and not AVX512 else None
    exact, bound = int4_bound(x.float(), wdeq, bias, K, x.dtype, wmag)
    if takes_amx(x.dtype, x.shape[0], os.environ.get("LOWBIT_DECODED_GEMM")):
        bound = bound + torch.finfo(torch.bfloat16).eps * (x.double().abs() @ wdeq.double().abs().T)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max()} at bound {bound.flatten()[err.argmax()]}"
    return out


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 4096 + 64])
def test_pack_unpack_round_trip(K):
    codes = torch.randint(0, 16, (7, K), dtype=torch.uint8)
    packed = fmt.pack(codes)
    assert packed.shape == (7, fmt.padded_k(K) // 2) and packed.dtype == torch.uint8
    assert torch.equal(fmt.unpack(packed, K), codes)


def test_pack_layout_is_the_documented_one():
    K = 70
    codes = torch.randint(0, 16, (3, K), dtype=torch.uint8)
    packed = fmt.pack(codes)
    padded = torch.zeros(3, fmt.padded_k(K), dtype=torch.uint8)
    padded[:, :K] = codes
    for b in range(fmt.padded_k(K) // 32):
        for j in range(16):
            byte = packed[:, 16 * b + j]
            assert torch.equal(byte & 0x0F, padded[:, 32 * b + j])
            assert torch.equal(byte >> 4, padded[:, 32 * b + 16 + j])


# ----------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, "K"])
def test_quantizer_codes_in_range_and_sqnr(symmetric, group_size):
    N, K = 64, 4096 + 64
    gs = K if group_size == "K" else group_size
    w = torch.randn(N, K)
    q = fmt.quantize_weight(w, gs, symmetric)
    codes = fmt.unpack(q.packed, K)
    assert int(codes.max()) <= 15
    assert q.scale.shape == (N, fmt.num_groups(K, gs))
    if symmetric:
        assert q.zero is None
        assert int(codes.min()) >= 1  # q = u - 8 in [-7, 7]: amax / 7 never needs -8
    else:
        assert ((q.zero >= 0) & (q.zero <= 15) & (q.zero == q.zero.round())).all()
    err = fmt.dequantize(q) - w
    sqnr_db = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum())
    # Uniform 4-bit RTN on Gaussian weights: ~20 dB with small groups, less per channel (the
    # range is set by the outliers of 4160 values). A layout or scale bug lands near 0 dB.
    floor = 12.0 if group_size == "K" else 16.0
    assert sqnr_db > floor, float(sqnr_db)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("scale_dtype", FLOATS, ids=dtype_id)
def test_clip_search_never_worse_than_rtn(symmetric, group_size, scale_dtype):
    torch.manual_seed(1)
    w = torch.randn(48, 1000)
    w[torch.rand_like(w) < 0.01] *= 8  # outliers: clipping pays off on some groups
    rtn = fmt.quantize_weight(w, group_size, symmetric, scale_dtype)
    clip = fmt.quantize_weight(w, group_size, symmetric, scale_dtype, clip_search=True)

    def group_err(q):
        e = (fmt.dequantize(q) - w) ** 2
        return fmt._group_view(e, group_size).nan_to_num(0.0).sum(-1)

    e_rtn, e_clip = group_err(rtn), group_err(clip)
    # Per group, the search picks the smallest error among candidates that include RTN itself.
    assert (e_clip <= e_rtn * (1 + 1e-6) + 1e-12).all()
    assert e_clip.sum() < e_rtn.sum()  # and with outliers it actually helps


# ----------------------------------------------------------------------------- kernel
SHAPES = [  # (N, K, group_size): odd N, partial blocks, partial last groups, several K tiles
    (33, 128, 32), (129, 128, 64), (31, 384, 128), (129, 384, 32), (33, 4096 + 128, 64),
    (129, 4096 + 128, 128), (31, 4096 + 128, 32), (65, 100, 100), (34, 4100, 4100), (33, 4096 + 64, 128),
]


@pytest.mark.parametrize("M", [1, 3, 4, 5, 6, 7, 8, 9, 16, 17, 64])  # the small-M kernel ends at M = 5 or 8
@pytest.mark.parametrize("N,K,group_size", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_matches_reference(M, N, K, group_size, symmetric):
    q = make_weight(N, K, group_size, symmetric)
    check_against_exact(torch.randn(M, K), q)


@pytest.mark.parametrize("M", [1, 5, 17])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("scale_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=dtype_id)
def test_dtypes_and_bias(M, x_dtype, scale_dtype, bias_dtype):
    N, K = 37, 4096 + 64
    q = make_weight(N, K, 128, symmetric=False, scale_dtype=scale_dtype)
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    check_against_exact(torch.randn(M, K).to(x_dtype), q, bias)


@pytest.mark.parametrize("M", [1, 9])
def test_fractional_zero_point(M):
    # A zero that is no integer: float(u) - zero then rounds, exactly as in the reference.
    q = make_weight(19, 300, 64, symmetric=False)
    zero = q.zero + torch.rand_like(q.zero)
    check_against_exact(torch.randn(M, 300), q, zero=zero)


# Columns of a 32-block that each decode lane reads: vector j takes byte j of every dword, low
# nibbles (columns 4l + j) and high nibbles (16 + 4l + j); vector 3 reads bits 24-31, whose top
# nibble would convert as a negative int32 if it were not shifted first.
ONE_HOT_COLUMNS = [0, 3, 4, 15, 16, 19, 28, 31]


@pytest.mark.parametrize("M", [1, 2, 5, 6, 8, 9])  # both sides of the small-M / tile boundaries
@pytest.mark.parametrize("group_size", [32, 64, 128, "K"])
@pytest.mark.parametrize("scale_dtype", FLOATS, ids=dtype_id)
def test_one_hot_rows_give_the_reference_weight_exactly(M, group_size, scale_dtype):
    """x = rows of the identity: every output is one dequantized weight, bit for bit.

    (u - zero) * scale has to round exactly like the reference for any zero: fractional,
    negative, above 15, tiny. An accumulation bound cannot see a wrong rounding of a single
    weight; a one-hot row can (every other product is an exact zero).
    """
    N, K = 7, 4 * 128 + 40  # partial last block and group
    gs = K if group_size == "K" else group_size
    q = make_weight(N, K, gs, symmetric=False, scale_dtype=scale_dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    zero = (torch.rand(q.zero.shape, generator=g) * 40 - 12).to(scale_dtype)
    zero[0, 0], zero[1, -1] = 1e-7, -0.1
    wdeq = ref.int4_dequantize(q.packed, q.scale, zero, gs, K)
    blocks = [0, 1, 5, K // 32]  # first, second, middle, last (partial) block
    cols = [b * 32 + c for b in blocks for c in ONE_HOT_COLUMNS if b * 32 + c < K]
    for start in range(0, len(cols), M):
        pick = cols[start:start + M]
        x = torch.zeros(len(pick), K)
        x[torch.arange(len(pick)), pick] = 1.0
        out = ops.int4_weight_only_mm(x, q.packed, q.scale, zero, gs)
        torch.testing.assert_close(out, wdeq[:, pick].T, rtol=0, atol=0)


@pytest.mark.parametrize("M", [1, 5, 6, 8, 9, 40])
def test_zero_point_cancellation_stays_within_the_bound(M):
    # The worst case of the small-M kernel's folding: codes within 1 of the zero point (tiny
    # weights) under activations with a large common offset, so sum(x * q) and z * sum(x) nearly
    # cancel. Each path must stay within its own documented bound.
    N, K, gs = 7, 4096, 128
    g = torch.Generator().manual_seed(11)
    q = make_weight(N, K, gs, symmetric=False)
    zero = torch.full_like(q.zero, 7.5)
    codes = torch.randint(7, 9, (N, K), generator=g, dtype=torch.uint8)
    q = dataclasses.replace(q, packed=fmt.pack(codes), zero=zero)
    x = 50.0 + torch.randn(M, K, generator=g)
    check_against_exact(x, q)


@pytest.mark.parametrize("M", [1, 5, 6, 8, 9, 40])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_infinite_activations_give_the_references_infinities(M, x_dtype):
    # The AVX2 small-M kernel's zero folding would compute inf - inf; such calls must still give
    # the reference's +-inf (NaN only where the reference has one: a zero weight times inf).
    q = make_weight(6, 256, 64, symmetric=False)
    x = torch.randn(M, 256).to(x_dtype)
    x[0, 7], x[-1, 200] = float("inf"), float("-inf")
    wdeq = ref.int4_dequantize(q.packed, q.scale, q.zero, 64, 256)
    want = x.double() @ wdeq.double().T
    got = ops.int4_weight_only_mm(x, q.packed, q.scale, q.zero, 64)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[want.isinf()].float(), want[want.isinf()].float())


@pytest.mark.parametrize("M", [1, 2, 3, 5, 6, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_small_m_row_pairs_and_tails(M, symmetric):
    # The small-M kernels take output channels in passes of 2-4 inside work items of 4 (AVX2) or
    # 12 (AVX-512, up to 8 rows of x per pass): these N hit every pass / single-row tail and
    # work item split, these M every number of rows in a pass of the AVX-512 kernel.
    for N in [*range(1, 10), 11, 12, 13, 25]:
        q = make_weight(N, 256, 64, symmetric, seed=N)
        check_against_exact(torch.randn(M, 256), q, torch.randn(N))


@pytest.mark.parametrize("M", [1, 2, 5, 6])
@pytest.mark.parametrize("K", [1, 17, 33])
def test_k_shorter_than_a_block_or_just_over(M, K):
    # One group of K columns ending inside the first or second block: every decode lane reads
    # padding (code 0 times a zero activation) next to real columns.
    for symmetric in (False, True):
        q = make_weight(5, K, K, symmetric, seed=K)
        check_against_exact(torch.randn(M, K), q, torch.randn(5))


@pytest.mark.parametrize("M", [2, 40])
def test_padding_codes_are_ignored(M):
    # The format stores 0 in padding columns; a kernel must not depend on it.
    K = 100  # 28 padding columns in the last block, split over both nibble halves
    q = make_weight(9, K, K, symmetric=False)
    dirty = fmt.unpack(q.packed, K)
    dirty = torch.cat([dirty, torch.full((9, fmt.padded_k(K) - K), 15, dtype=torch.uint8)], 1)
    dirty_packed = fmt.pack(dirty)
    assert not torch.equal(dirty_packed, q.packed)
    x = torch.randn(M, K)
    clean = ops.int4_weight_only_mm(x, q.packed, q.scale, q.zero, K)
    torch.testing.assert_close(ops.int4_weight_only_mm(x, dirty_packed, q.scale, q.zero, K), clean, rtol=0, atol=0)


@pytest.mark.parametrize("M", [3, 24])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_non_contiguous_inputs_equal_contiguous(M, x_dtype):
    N, K = 21, 384
    q = make_weight(N, K, 64, symmetric=False)
    xt = torch.randn(2 * K, M).to(x_dtype)
    x = xt[::2].T  # [M, K], column-major with a K stride of 2
    scale = q.scale.T.contiguous().T  # [N, G] with transposed strides
    zero = q.zero.T.contiguous().T
    packed = torch.zeros(N, 2 * q.packed.shape[1], dtype=torch.uint8)
    packed[:, ::2] = q.packed
    packed = packed[:, ::2]
    bias = torch.randn(2 * N)[::2]
    assert not any(t.is_contiguous() for t in (x, scale, zero, packed, bias))
    got = ops.int4_weight_only_mm(x, packed, scale, zero, 64, bias)
    want = ops.int4_weight_only_mm(x.contiguous(), q.packed, q.scale, q.zero, 64, bias.contiguous())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- AMX kernel (bf16 x)
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX-BF16 (with AVX-512 F/BW/BF16) visible to lowbit here")


@needs_amx
@pytest.mark.parametrize("M", [5, 16, 17, 33, 64, 65, 100])
@pytest.mark.parametrize("N", [7, 16, 33])
@pytest.mark.parametrize("scale_dtype", FLOATS, ids=dtype_id)
def test_amx_one_hot_rows_give_the_bf16_weight_exactly(M, N, scale_dtype):
    """bf16 one-hot rows over every column: each output is the reference's weight rounded once to
    bf16 (nearest even), bit for bit. Catches a wrong nibble, table entry, column order of x's
    tiles, weight row of a partial 16-row tile or row of x in any of the four accumulator tiles.
    """
    K, gs = 4 * 128 + 40, 64  # partial last block and group
    q = make_weight(N, K, gs, symmetric=False, scale_dtype=scale_dtype, seed=N)
    zero = (torch.rand(q.zero.shape, generator=torch.Generator().manual_seed(M)) * 40 - 12).to(scale_dtype)
    wdeq = ref.int4_dequantize(q.packed, q.scale, zero, gs, K)
    eye = torch.eye(K, dtype=torch.bfloat16)
    for c0 in range(0, K, M):
        rows = eye[c0:c0 + M] if K - c0 >= M else eye[-M:]
        out = ops.int4_weight_only_mm(rows, q.packed, q.scale, zero, gs)
        cols = rows.float().argmax(1)
        torch.testing.assert_close(out, wdeq[:, cols].T.bfloat16(), rtol=0, atol=0)


@needs_amx
@pytest.mark.parametrize("M", [5, 16, 17, 33, 64, 65, 129, 256])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_amx_stays_within_the_bf16_bound(monkeypatch, M, symmetric):
    # The same call with the AMX kernel turned off (the lookup kernel or the large-M paths, each
    # weight in fp32) must differ somewhere: otherwise this test would not be testing AMX.
    N, K = 45, 4096 + 64
    q = make_weight(N, K, 128, symmetric)
    g = torch.Generator().manual_seed(M)
    x, bias = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, generator=g)
    monkeypatch.delenv("LOWBIT_INT4_AMX", raising=False)
    monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    out = check_against_exact(x, q, bias)
    monkeypatch.setenv("LOWBIT_INT4_AMX", "0")
    assert not torch.equal(check_against_exact(x, q, bias), out)


# ----------------------------------------------------------------------------- decoded-GEMM routes
# From these M, on CPUs wider than lowbit's AVX2 kernels, the dequantized weight is handed to
# at::mm in 8 MiB panels (csrc/include/lowbit/cpu/decoded_gemm.h; kDecodedGemmMinM* in int4.cpp).
DECODED_GEMM_MIN_M = {"bf16": 16, "fp32": 96}


def decoded_gemm_route(x_dtype, M, env):
    return cpu_routes.decoded_gemm_route(x_dtype, M, env, small_m=SMALL_M, min_m_bf16=DECODED_GEMM_MIN_M["bf16"],
                                         min_m_fp32=DECODED_GEMM_MIN_M["fp32"])


runs_aten_mm = cpu_routes.runs_aten_mm


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [15, 16, 32, 33, 95, 96, 257])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_decoded_gemm_routes_stay_within_their_bounds(monkeypatch, env, M, x_dtype, with_bias):
    """Each route is taken exactly where the rule says, and stays within its documented bound.

    N = 2000 at K = 2080 spans two bf16 panels (1984 + 16 rows) and three fp32 ones, the last
    partial; K ends in a partial group. fp32 route: the spec's fp32 weights and fp32 accumulation,
    so the kernels' own bound. bf16 route: each weight rounded once to bf16, the product rounded
    to bf16 before the bias is added: eps_bf16 * sum|x||w| more.
    """
    if env is None:
        monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_DECODED_GEMM", env)
    N, K, gs = 2000, 2080, 128
    q = make_weight(N, K, gs, symmetric=False, seed=M)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g).to(x_dtype)
    bias = torch.randn(N, generator=g) if with_bias else None
    out, took_mm = runs_aten_mm(lambda: ops.int4_weight_only_mm(x, q.packed, q.scale, q.zero, gs, bias))
    amx = takes_amx(x_dtype, M, env)
    route = None if amx else decoded_gemm_route(x_dtype, M, env)
    assert took_mm == (route is not None), f"route {route}"
    assert out.dtype == x_dtype and out.shape == (M, N)
    wdeq = ref.int4_dequantize(q.packed, q.scale, q.zero, gs, K)
    exact, bound = int4_bound(x.float(), wdeq, bias, K, x_dtype)
    if route == "bf16" or amx:
        bound = bound + torch.finfo(torch.bfloat16).eps * (x.double().abs() @ wdeq.double().abs().T)
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max()} at bound {bound.flatten()[err.argmax()]}"


def test_fp32_decoded_gemm_gives_the_reference_weight_exactly(monkeypatch):
    # One-hot rows through the fp32 route: at::mm of exact zeros and one product returns the
    # decoded weight itself, which must be the reference's bit for bit (every nibble lane, the
    # fractional zeros, the permuted column order of x and the panels).
    monkeypatch.setenv("LOWBIT_DECODED_GEMM", "1")
    N, K, gs = 7, 4 * 128 + 40, 64
    q = make_weight(N, K, gs, symmetric=False, seed=3)
    zero = (torch.rand(q.zero.shape, generator=torch.Generator().manual_seed(4)) * 40 - 12)
    wdeq = ref.int4_dequantize(q.packed, q.scale, zero, gs, K)
    x = torch.eye(K)[: DECODED_GEMM_MIN_M["fp32"] + 4]
    out, took_mm = runs_aten_mm(lambda: ops.int4_weight_only_mm(x, q.packed, q.scale, zero, gs))
    assert took_mm
    torch.testing.assert_close(out, wdeq[:, : x.shape[0]].T, rtol=0, atol=0)
    # bf16 one-hot rows over every column (every lane of either decoder): each weight rounded
    # once to bf16 (nearest even), nothing else.
    eye = torch.eye(K, dtype=torch.bfloat16)
    for c0 in range(0, K, 64):
        rows = eye[c0:c0 + 64] if K - c0 >= 64 else eye[-64:]  # more rows than SMALL_M: the route
        out, took_mm = runs_aten_mm(lambda: ops.int4_weight_only_mm(rows, q.packed, q.scale, zero, gs))
        assert took_mm
        cols = rows.float().argmax(1)
        torch.testing.assert_close(out, wdeq[:, cols].T.bfloat16(), rtol=0, atol=0)


def test_avx2_kernels_on_avx512_machines():
    """This file's kernel tests once more with the AVX2 small-M kernel and panel decoders, where
    AVX-512 would otherwise take over (a subprocess: LOWBIT_CPU_ISA is read once per process)."""
    if "avx512f" not in bench.cpu_flags() or os.environ.get("LOWBIT_CPU_ISA"):
        pytest.skip("the AVX2 kernels already run in this process")
    cpu_routes.rerun_with_env(__file__, "not avx2_kernels and not portable and not opcheck and not compile",
                              LOWBIT_CPU_ISA="avx2")


def test_portable_path_matches_reference():
    """The scalar kernel (machines without AVX2) runs when LOWBIT_CPU_ISA=scalar is set at startup."""
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        pytest.skip("already running on the portable path")
    if not _extension.LOADED:
        pytest.skip("lowbit._C is not built: the CPU op is the reference")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    ids = ["test_matches_reference[asym-33-4224-64-1]", "test_matches_reference[sym-65-100-100-17]",
           "test_matches_reference[asym-34-4100-4100-64]", "test_matches_reference[asym-31-384-128-7]",
           "test_dtypes_and_bias[bfloat16-float16-bfloat16-17]", "test_fractional_zero_point[9]",
           "test_non_contiguous_inputs_equal_contiguous[float32-24]"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [f"{__file__}::{i}" for i in ids],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{len(ids)} passed" in r.stdout, r.stdout[-3000:]


# ----------------------------------------------------------------------------- bad inputs
def _good(M=2, N=5, K=64, gs=32):
    q = make_weight(N, K, gs, symmetric=False)
    return dict(x=torch.randn(M, K), packed_w=q.packed, scale=q.scale, zero=q.zero, group_size=gs, bias=None)


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(packed_w=a["packed_w"][:, :-1]), "packed_w"),
    (lambda a: a.update(packed_w=a["packed_w"].to(torch.int8)), "packed_w"),
    (lambda a: a.update(scale=a["scale"][:, :1]), "scale"),
    (lambda a: a.update(scale=a["scale"][:-1]), "scale"),
    (lambda a: a.update(scale=a["scale"].to(torch.int32)), "scale"),
    (lambda a: a.update(zero=a["zero"].to(torch.float16)), "zero"),
    (lambda a: a.update(zero=a["zero"][:, :1]), "zero"),
    (lambda a: a.update(group_size=48), "group_size"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    (lambda a: a.update(x=a["x"][0]), "x"),
    (lambda a: a.update(x=a["x"][:0]), "x"),
    (lambda a: a.update(bias=torch.randn(4)), "bias"),
])
def test_bad_inputs_raise_value_error(change, arg):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.int4_weight_only_mm: {arg}\b"):
        ops.int4_weight_only_mm(**args)


# ----------------------------------------------------------------------------- torch integration
def test_opcheck():
    samples = [_good(M=1), _good(M=7, N=9, K=100, gs=100)]
    sym = _good(M=3)
    sym["zero"] = None
    sym["bias"] = torch.randn(5)
    samples.append(sym)
    bf = _good(M=20, K=4096 + 64, gs=128)
    bf["x"] = bf["x"].bfloat16()
    samples.append(bf)
    for s in samples:
        args = (s["x"], s["packed_w"], s["scale"], s["zero"], s["group_size"], s["bias"])
        torch.library.opcheck(torch.ops.lowbit.int4_weight_only_mm.default, args)


def test_torch_compile_fullgraph():
    a = _good(M=4, N=6, K=256, gs=64)

    def f(x, w, s, z):
        return torch.nn.functional.gelu(ops.int4_weight_only_mm(x * 2, w, s, z, 64)) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (a["x"], a["packed_w"], a["scale"], a["zero"])
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)
