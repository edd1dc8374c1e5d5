"""The FP8 CUDA C++ kernels (csrc/cuda/fp8.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.fp8), on a real GPU.

Exactness: both quantize ops must equal the reference bit for bit (scales and codes) for every
granularity, format and saturation policy. The GEMMs accumulate in fp32 in their own order, so
they are held to the rigorous fp32 error bound against the float64 result; where every partial
sum is exactly representable (small integers) they must equal it exactly, which pins down the
indexing of every path independently of rounding.

The shapes cover every path: the streaming small-M kernel (M <= 16 for fp8_scaled_mm, M <= 8
weight-only) and the 64x64 tiles (WMMA f16/bf16; fp32 FMA for f32 x), each with the vectorized
(K % 16 == 0, aligned) and the element-wise loads, block scales, and misaligned or strided inputs;
on sm_89 / sm_90a also the native FP8 tensor-core kernels (CUTLASS), which the random-data
tests hold to a looser, derived bound (NATIVE_TC_REL) and the small-integer tests to bit
equality.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import fp8 as ref

pytestmark = pytest.mark.cuda

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRANULARITIES = ["tensor", "row", "block1x128", "block128x128"]


@pytest.fixture(autouse=True)
def cuda_backend():
    status = lowbit.backends.backends()["cuda"]
    if not status.available:
        pytest.skip(f"CUDA C++ backend unavailable: {status.reason}")
    with lowbit.backends.use("cuda"):
        yield


def dev():
    return torch.device("cuda")


def on_cpu(fn, *args, **kwargs):
    """The reference evaluated on CPU copies: the spec's arithmetic exactly (on CUDA tensors torch
    computes `tensor / python_scalar` as a multiplication by the reciprocal)."""
    def cpu(v):
        return v.cpu() if isinstance(v, torch.Tensor) else v
    return fn(*[cpu(a) for a in args], **{k: cpu(v) for k, v in kwargs.items()})


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu().contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.uint8)


def assert_bits_equal(out, expected):
    assert out.dtype == expected.dtype and out.shape == expected.shape, (out.dtype, out.shape, expected.shape)
    assert torch.equal(bits(out), bits(expected))


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, but starting one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def rand_fp8(fmt, *shape, scale=4.0):
    return (torch.randn(shape, device=dev()) * scale).to(FORMATS[fmt])


# ----------------------------------------------------------------------------- quantize
QUANT_SHAPES = [(1,), (7,), (3, 1), (5, 33), (4, 1000), (2, 1024), (3, 1025), (2, 3, 300), (130, 257), (256, 128)]


def special_values(x: torch.Tensor) -> torch.Tensor:
    """inf, -inf and NaN (left out of amax), and a huge value, in the first row."""
    flat = x.reshape(-1, x.shape[-1])
    row = flat[0]
    for i, v in enumerate([float("inf"), float("-inf"), float("nan"), 1e4]):
        if i < row.numel():
            row[i] = v
    return x


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_quantize_dynamic_exact(shape, dtype, granularity, fmt):
    if granularity == "block128x128" and len(shape) != 2:
        pytest.skip("block128x128 takes 2-D x")
    x = (torch.randn(shape, device=dev()) * 3).to(dtype)
    if x.dim() > 1 and x.shape[0] > 2:
        x[1] = 0  # an all-zero row: scale 1.0 per row / block
    special_values(x)
    for saturate in (True, False):
        q, s = torch.ops.lowbit.fp8_quantize_dynamic(x, fmt, granularity, saturate)
        q_ref, s_ref = on_cpu(ref.fp8_quantize_dynamic, x, fmt, granularity, saturate)
        assert_bits_equal(s, s_ref)
        assert_bits_equal(q, q_ref)


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["scalar0", "scalar1", "per_row", "block1x128"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_quantize_static_exact(shape, dtype, kind, fmt):
    x = (torch.randn(shape, device=dev()) * 3).to(dtype)
    special_values(x)
    kb = (shape[-1] + 127) // 128
    scale_shape = {"scalar0": (), "scalar1": (1,), "per_row": shape[:-1], "block1x128": (*shape[:-1], kb)}[kind]
    # Small scales push some quotients past fmax: the saturation policy is exercised too.
    scale = torch.rand(scale_shape, device=dev()) * (8.0 / FMAX[fmt]) + 1e-6
    for saturate in (True, False):
        q = torch.ops.lowbit.fp8_quantize_static(x, scale, fmt, saturate)
        assert_bits_equal(q, on_cpu(ref.fp8_quantize_static, x, scale, fmt, saturate))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_fp8_encode_random_bit_patterns_and_ties(fmt, saturate):
    # Every exponent, both signs, NaN/inf payloads; scale 1 so x itself is encoded.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    # Exact ties between neighbouring codes, normal and subnormal.
    codes = torch.arange(256, dtype=torch.uint8).view(FORMATS[fmt]).float()
    finite = codes[torch.isfinite(codes)].unique()
    ties = (finite[:-1] + finite[1:]) / 2
    x = torch.cat([x, ties, -ties, finite]).to(dev())
    one = torch.ones((), device=dev())
    q = torch.ops.lowbit.fp8_quantize_static(x, one, fmt, saturate)
    assert_bits_equal(q, on_cpu(ref.fp8_quantize_static, x, one, fmt, saturate))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_fp8_quantize_nan_signs_match_the_cpu_reference(fmt, saturate):
    # A NaN keeps its sign (code 0x7f or 0xff) through x / scale, as on the CPU; invalid
    # quotients (inf / inf, 0 / 0) give the CPU's negative default NaN.
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan], [-nan], [inf], [0.0], [1.0], [-1.0], [nan]], device=dev())
    scale = torch.tensor([2.0, 2.0, inf, 0.0, -nan, nan, -nan], device=dev())  # per row
    q = torch.ops.lowbit.fp8_quantize_static(x, scale, fmt, saturate)
    assert_bits_equal(q, on_cpu(ref.fp8_quantize_static, x, scale, fmt, saturate))


def test_fp8_quantize_non_contiguous():
    x = torch.randn(300, 40, device=dev()).T  # [40, 300], column-major
    for granularity in GRANULARITIES:
        q, s = torch.ops.lowbit.fp8_quantize_dynamic(x, "e4m3", granularity, True)
        q_ref, s_ref = on_cpu(ref.fp8_quantize_dynamic, x, "e4m3", granularity, True)
        assert_bits_equal(q, q_ref)
        assert_bits_equal(s, s_ref)


# ----------------------------------------------------------------------------- GEMMs
def float_bound(exact, magnitude, K, out_dtype):
    """fp32 accumulation in any order (K * eps32 * sum|terms|) + half an ulp of the output."""
    eps32 = torch.finfo(torch.float32).eps
    return (K + 4) * eps32 * magnitude + torch.finfo(out_dtype).eps * exact.abs() + torch.finfo(out_dtype).tiny


def expected(a, b, sa, sb, bias, block):
    """float64 result and the sum of |terms|."""
    a64, b64 = a.cpu().double(), b.cpu().double()
    if block:
        a64 = a64 * ref.expand_scale(sa.cpu().double(), a.shape)
        b64 = b64 * ref.expand_scale(sb.cpu().double(), b.shape)
        exact, magnitude = a64 @ b64.T, a64.abs() @ b64.abs().T
    else:
        s = ref._vector_scale(sa.cpu().double(), (-1, 1)) * ref._vector_scale(sb.cpu().double(), (1, -1))
        exact, magnitude = (a64 @ b64.T) * s, (a64.abs() @ b64.abs().T) * s.abs()
    if bias is not None:
        exact = exact + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    return exact, magnitude


def native_fp8_path(M, N, K, fmts, block):
    """Whether fp8_scaled_mm runs on the native FP8 tensor cores here (csrc/cuda/fp8.cu's rule:
    CUTLASS wgmma on 9.0, mma.sync on 8.9; M > 16, same-format operands, row/column or scalar
    scales, K % 16 == 0, N % 8 == 0)."""
    return (torch.cuda.get_device_capability() in ((8, 9), (9, 0)) and M > 16 and not block
            and fmts[0] == fmts[1] and K % 16 == 0 and N % 8 == 0)


# The FP8 tensor cores do not add in full fp32 inside an instruction chain: they align the
# addends of one MMA (the running sum and 32 products) to the largest and keep ~14 bits (the
# DeepSeek-V3 report's measurement on Hopper). Model used here, with a bit to spare: each
# addend loses at most 2^-12 of the largest |addend| of its instruction, and that is at most
# the sum of |terms| of its promotion interval (CUTLASS adds the chain into a separate fp32
# accumulator once per K tile: 128 on sm_90a, 4 instructions; 64 on sm_89, 2). So per tile
# error <= 4 * 33 * 2^-12 * sum|terms of the tile| < 2^-4.9 * that, and over the tiles
# <= 2^-4.9 * sum|terms|. Loose by design (a worst case, not a typical error); the sharp
# check of the native path is test_fp8_scaled_mm_native_exact_on_small_integers.
NATIVE_TC_REL = 4 * 33 * 2.0**-12


def assert_within_bound(out, exact, magnitude, K, out_dtype, native=False):
    err = (out.cpu().double() - exact).abs()
    bound = float_bound(exact, magnitude, K, out_dtype)
    if native:
        bound = bound + NATIVE_TC_REL * magnitude
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


def mm_scales(kind, M, N, K):
    kb = (K + 127) // 128
    if kind == "row-col":
        return torch.rand(M, device=dev()) * 0.1 + 1e-3, torch.rand(N, device=dev()) * 0.1 + 1e-3
    if kind == "scalar":
        return torch.tensor(0.03, device=dev()), torch.tensor([0.02], device=dev())
    return (torch.rand(M, kb, device=dev()) * 0.1 + 1e-3,
            torch.rand((N + 127) // 128, kb, device=dev()) * 0.1 + 1e-3)


# M: small-M kernel (1, 5, 16) and tiles (17, 64, 200); (N, K): element loads (K % 16 != 0)
# and vectorized ones, K crossing several 128 blocks.
SMM_M = [1, 5, 16, 17, 64, 200]
SMM_NK = [(7, 33), (130, 300), (64, 256), (136, 1040)]
FMT_PAIRS = [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")]


@pytest.mark.parametrize("M", SMM_M)
@pytest.mark.parametrize("N,K", SMM_NK)
@pytest.mark.parametrize("fmts", FMT_PAIRS)
@pytest.mark.parametrize("scales", ["row-col", "scalar", "block"])
def test_fp8_scaled_mm_within_bound(M, N, K, fmts, scales):
    a, b = rand_fp8(fmts[0], M, K), rand_fp8(fmts[1], N, K)
    sa, sb = mm_scales(scales, M, N, K)
    bias = torch.randn(N, device=dev())
    for out_dtype in (None, torch.float16, torch.bfloat16):
        for bi in (None, bias):
            out = torch.ops.lowbit.fp8_scaled_mm(a, b, sa, sb, bi, out_dtype)
            od = out_dtype or torch.float32
            assert out.dtype == od and out.shape == (M, N)
            exact, magnitude = expected(a, b, sa, sb, bi, scales == "block")
            assert_within_bound(out, exact, magnitude, K, od, native_fp8_path(M, N, K, fmts, scales == "block"))


@pytest.mark.parametrize("M", [3, 16, 40])
@pytest.mark.parametrize("N,K", [(5, 48), (70, 260)])
@pytest.mark.parametrize("block", [False, True])
def test_fp8_scaled_mm_exact_on_small_integers(M, N, K, block):
    # |values| <= 4 and power-of-two scales: every product and partial sum is an exact fp32
    # integer, so any correct kernel equals the reference bit for bit.
    a = torch.randint(-4, 5, (M, K), device=dev()).float().to(torch.float8_e4m3fn)
    b = torch.randint(-4, 5, (N, K), device=dev()).float().to(torch.float8_e5m2)
    if block:
        kb = (K + 127) // 128
        # Scales within 2^+-2: the scaled terms are multiples of 2^-4 below 2^8, sums < 2^17.
        sa = 2.0 ** torch.randint(-2, 3, (M, kb), device=dev()).float()
        sb = 2.0 ** torch.randint(-2, 3, ((N + 127) // 128, kb), device=dev()).float()
    else:
        sa = 2.0 ** torch.randint(-3, 4, (M,), device=dev()).float()
        sb = 2.0 ** torch.randint(-3, 4, (N,), device=dev()).float()
    bias = torch.randint(-8, 9, (N,), device=dev()).float()
    out = torch.ops.lowbit.fp8_scaled_mm(a, b, sa, sb, bias)
    assert_bits_equal(out, on_cpu(ref.fp8_scaled_mm, a, b, sa, sb, bias))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,N,K", [(17, 8, 16), (64, 72, 256), (200, 136, 1040), (300, 264, 4096)])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
def test_fp8_scaled_mm_native_exact_on_small_integers(fmt, M, N, K, out_dtype):
    # The shapes the native FP8 kernels take (sm_89 / sm_90a; elsewhere the same assertions
    # hold for the dequantizing kernels). |values| <= 4: products <= 16, so a tensor-core chain
    # (one promotion interval, <= 128 products) stays below 2^11 and keeps integers exact even
    # with ~13 retained bits, and the fp32 sums across intervals stay below 2^17; power-of-two
    # scales and integer bias keep the epilogue exact. Bit-equal to the reference pins
    # the operand indexing, both scale vectors, the bias and the output conversion (also for
    # M, N not multiples of the 128x128 tile, and K spanning many promotion intervals).
    g = torch.Generator(device="cpu").manual_seed(M * 7 + K)
    a = torch.randint(-4, 5, (M, K), generator=g).float().to(FORMATS[fmt]).to(dev())
    b = torch.randint(-4, 5, (N, K), generator=g).float().to(FORMATS[fmt]).to(dev())
    sa = (2.0 ** torch.randint(-3, 4, (M,), generator=g).float()).to(dev())
    sb = (2.0 ** torch.randint(-3, 4, (N,), generator=g).float()).to(dev())
    bias = torch.randint(-8, 9, (N,), generator=g).float().to(dev())
    for bi in (None, bias):
        for sai, sbi in ((sa, sb), (sa[:1].reshape(()), sb[:1])):  # row x column, and scalars
            out = torch.ops.lowbit.fp8_scaled_mm(a, b, sai, sbi, bi, out_dtype)
            assert_bits_equal(out, on_cpu(ref.fp8_scaled_mm, a, b, sai, sbi, bi, out_dtype))


def test_fp8_scaled_mm_misaligned_and_non_contiguous():
    for M in (4, 40):  # small-M kernel and tiles
        N, K = 48, 256
        a, b = rand_fp8("e4m3", M, K), rand_fp8("e5m2", N, K)
        sa, sb = mm_scales("row-col", M, N, K)
        bias = torch.randn(N, device=dev())
        exact, magnitude = expected(a, b, sa, sb, bias, False)
        for ai, bi, sai, sbi, bsi in ((misaligned(a), misaligned(b), misaligned(sa), misaligned(sb), misaligned(bias)),
                                      (a.T.contiguous().T, b.T.contiguous().T, sa, sb, bias)):
            out = torch.ops.lowbit.fp8_scaled_mm(ai, bi, sai, sbi, bsi)
            assert_within_bound(out, exact, magnitude, K, torch.float32)
    # The same for the native path's inputs (same formats; misaligned operands are copied).
    M, N, K = 40, 48, 256
    a, b = rand_fp8("e4m3", M, K), rand_fp8("e4m3", N, K)
    sa, sb = mm_scales("row-col", M, N, K)
    bias = torch.randn(N, device=dev())
    exact, magnitude = expected(a, b, sa, sb, bias, False)
    native = native_fp8_path(M, N, K, ("e4m3", "e4m3"), False)
    for ai, bi, sai, sbi, bsi in ((misaligned(a), misaligned(b), misaligned(sa), misaligned(sb), misaligned(bias)),
                                  (a.T.contiguous().T, b.T.contiguous().T, sa, sb, bias)):
        out = torch.ops.lowbit.fp8_scaled_mm(ai, bi, sai, sbi, bsi)
        assert_within_bound(out, exact, magnitude, K, torch.float32, native)


WO_M = [1, 2, 5, 8, 9, 64, 130]
WO_NK = [(7, 33), (130, 300), (64, 256), (3, 4101)]


@pytest.mark.parametrize("M", WO_M)
@pytest.mark.parametrize("N,K", WO_NK)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_kind", ["row", "scalar", "block"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_weight_only_mm_within_bound(M, N, K, fmt, scale_kind, dtype):
    x = torch.randn(M, K, device=dev()).to(dtype)
    w = rand_fp8(fmt, N, K, scale=8.0)
    scale = {"row": torch.rand(N, device=dev()) * 0.1 + 1e-3, "scalar": torch.tensor([0.05], device=dev()),
             "block": torch.rand((N + 127) // 128, (K + 127) // 128, device=dev()) * 0.1 + 1e-3}[scale_kind]
    bias = torch.randn(N, device=dev()).to(dtype)
    for bi in (None, bias):
        out = torch.ops.lowbit.fp8_weight_only_mm(x, w, scale, bi)
        assert out.dtype == dtype and out.shape == (M, N)
        if scale_kind == "block":
            exact, magnitude = expected(x, w, torch.ones(M, scale.shape[1]), scale, bi, True)
        else:
            exact, magnitude = expected(x, w, torch.ones(()), scale, bi, False)
        assert_within_bound(out, exact, magnitude, K, dtype)


@pytest.mark.parametrize("M", [3, 64])  # small-M kernel and tiles
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_weight_only_mm_exact_on_small_integers(M, dtype):
    N, K = 70, 260
    x = torch.randint(-4, 5, (M, K), device=dev()).to(dtype)
    w = torch.randint(-4, 5, (N, K), device=dev()).float().to(torch.float8_e4m3fn)
    scale = 2.0 ** torch.randint(-3, 4, (N,), device=dev()).float()
    out = torch.ops.lowbit.fp8_weight_only_mm(x, w, scale)
    assert_bits_equal(out, on_cpu(ref.fp8_weight_only_mm, x, w, scale))


@pytest.mark.parametrize("M", [3, 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fp8_weight_only_mm_misaligned_and_non_contiguous(M, dtype):
    N, K = 48, 256
    x = torch.randn(M, K, device=dev()).to(dtype)
    w = rand_fp8("e4m3", N, K)
    scale = torch.rand(N, device=dev()) * 0.02
    exact, magnitude = expected(x, w, torch.ones(()), scale, None, False)
    for xi, wi in ((misaligned(x), misaligned(w)), (x.T.contiguous().T, w.T.contiguous().T)):
        out = torch.ops.lowbit.fp8_weight_only_mm(xi, wi, scale)
        assert_within_bound(out, exact, magnitude, K, dtype)


@pytest.mark.parametrize("M", [1, 40])
def test_fp8_gemms_propagate_nan_and_inf(M):
    w = torch.tensor([[1.0, float("nan")], [1.0, 2.0]]).to(torch.float8_e5m2)
    w[1, 1] = float("inf")
    w = w.to(dev())
    one = torch.ones((), device=dev())
    out = torch.ops.lowbit.fp8_weight_only_mm(torch.ones(M, 2, device=dev()), w, one)
    assert torch.isnan(out[:, 0]).all() and (out[:, 1] == float("inf")).all()
    a = torch.ones(M, 2, device=dev()).to(torch.float8_e4m3fn)
    out = torch.ops.lowbit.fp8_scaled_mm(a, w, one, one)
    assert torch.isnan(out[:, 0]).all() and (out[:, 1] == float("inf")).all()


def test_bad_inputs_raise_value_error_naming_the_argument():
    x = torch.randn(4, 8, device=dev())
    with pytest.raises(ValueError, match="granularity"):
        torch.ops.lowbit.fp8_quantize_dynamic(x, "e4m3", "bogus", True)
    with pytest.raises(ValueError, match="scale"):
        torch.ops.lowbit.fp8_quantize_static(x, torch.ones(3, device=dev()), "e4m3", True)
    a = torch.zeros(4, 8, device=dev()).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale_b"):
        torch.ops.lowbit.fp8_scaled_mm(a, a, torch.ones(4, device=dev()), torch.ones(5, device=dev()))
