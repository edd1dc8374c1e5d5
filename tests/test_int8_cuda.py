"""The INT8 CUDA C++ kernels (csrc/cuda/int8.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.int8), on a real GPU.

Exactness: int8_mm, int8_scaled_mm and both quantize ops must equal the reference bit for bit
(the kernels round in the reference's order; see csrc/include/lowbit/cuda/int8_cutlass.cuh).
int8_weight_only_mm accumulates in fp32 in another order than torch's matmul, so it is held to
a rigorous error bound against the float64 result instead.

The shapes cover both paths of each op: CUTLASS (K % 16 == 0 and N % 4 == 0) and the SIMT
fallback (odd K or N), the GEMV (M <= 8) and tiled (M > 8) weight-only kernels, and
16-byte-misaligned but contiguous inputs.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import _checks
from lowbit.backends.reference import int8 as ref

pytestmark = pytest.mark.cuda

M_SWEEP = [1, 2, 15, 16, 17, 33, 128, 2048]
# (N, K): odd shapes take the SIMT fallback; the rest satisfy CUTLASS's alignment.
NK_SWEEP = [(1, 1), (7, 33), (33, 100), (129, 31), (3, 1000), (64, 4101),   # fallback
            (4, 16), (64, 256), (136, 4096), (256, 1040)]                        # CUTLASS
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def cuda_backend():
    status = lowbit.backends.backends()["cuda"]
    if not status.available:
        pytest.skip(f"CUDA C++ backend unavailable: {status.reason}")
    with lowbit.backends.use("cuda"):
        yield


def dev():
    return torch.device("cuda")


def rand_int8(*shape, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, device=dev())


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, but starting one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def on_cpu(fn, *args, **kwargs):
    """The reference evaluated on CPU copies: the spec's arithmetic exactly. (On CUDA tensors
    torch computes `tensor / python_scalar` as a multiplication by the reciprocal, so the
    reference's `amax / 127` is not IEEE division there.)"""
    def cpu(v):
        return v.cpu() if isinstance(v, torch.Tensor) else v
    return fn(*[cpu(a) for a in args], **{k: cpu(v) for k, v in kwargs.items()})


def assert_equal(out, expected):
    out = out.cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- int8_mm
@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", NK_SWEEP)
def test_int8_mm_exact(M, N, K):
    a, b = rand_int8(M, K), rand_int8(N, K)
    assert_equal(torch.ops.lowbit.int8_mm(a, b), on_cpu(ref.int8_mm, a, b))


@pytest.mark.parametrize("K", [_checks.INT8_MAX_K, _checks.INT8_MAX_K // 16 * 16])  # fallback, CUTLASS
@pytest.mark.parametrize("va,vb", [(-128, -128), (127, 127), (-128, 127)])
def test_int8_mm_worst_case_large_k(K, va, vb):
    a = torch.full((3, K), va, dtype=torch.int8, device=dev())
    b = torch.full((4, K), vb, dtype=torch.int8, device=dev())
    out = torch.ops.lowbit.int8_mm(a, b)
    assert abs(K * va * vb) < 2**31
    assert (out == K * va * vb).all(), out


def test_int8_mm_non_contiguous_and_misaligned():
    a, b = rand_int8(70, 64), rand_int8(96, 64)
    expected = on_cpu(ref.int8_mm, a, b)
    assert_equal(torch.ops.lowbit.int8_mm(misaligned(a), misaligned(b)), expected)
    at, bw = a.T.contiguous().T, torch.zeros(96, 128, dtype=torch.int8, device=dev())
    bw[:, ::2] = b
    assert_equal(torch.ops.lowbit.int8_mm(at, bw[:, ::2]), expected)


# ----------------------------------------------------------------------------- int8_scaled_mm
def scales(M, N, scalar_a, scalar_b):
    sa = torch.rand((() if scalar_a else (M,)), device=dev()) * 0.02 + 1e-3
    sb = torch.rand((() if scalar_b else (N,)), device=dev()) * 0.02 + 1e-3
    return sa, sb


@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", NK_SWEEP)
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
def test_int8_scaled_mm_exact(M, N, K, out_dtype):
    a, b = rand_int8(M, K), rand_int8(N, K)
    sa, sb = scales(M, N, False, False)
    bias = torch.randn(N, device=dev())
    for args in ((a, b, sa, sb), (a, b, sa, sb, bias)):
        out = torch.ops.lowbit.int8_scaled_mm(*args, out_dtype=out_dtype)
        assert_equal(out, on_cpu(ref.int8_scaled_mm, *args, out_dtype=out_dtype))


@pytest.mark.parametrize("N,K", [(33, 100), (64, 256)])
@pytest.mark.parametrize("scalar_a,scalar_b", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_scaled_mm_scalar_scales_and_bias_dtypes(N, K, scalar_a, scalar_b, bias_dtype):
    M = 17
    a, b = rand_int8(M, K), rand_int8(N, K)
    sa, sb = scales(M, N, scalar_a, scalar_b)
    sa1 = sa.reshape(1) if scalar_a else sa  # [1] is a scalar too
    bias = torch.randn(N, device=dev()).to(bias_dtype)
    for s_a in (sa, sa1):
        out = torch.ops.lowbit.int8_scaled_mm(a, b, s_a, sb, bias, torch.float32)
        assert_equal(out, on_cpu(ref.int8_scaled_mm, a, b, s_a, sb, bias, torch.float32))


def test_int8_scaled_mm_misaligned_vectors():
    M, N, K = 40, 64, 128
    a, b = rand_int8(M, K), rand_int8(N, K)
    sa, sb = scales(M, N, False, False)
    bias = torch.randn(N, device=dev())
    expected = on_cpu(ref.int8_scaled_mm, a, b, sa, sb, bias)
    out = torch.ops.lowbit.int8_scaled_mm(misaligned(a), misaligned(b), misaligned(sa), misaligned(sb),
                                          misaligned(bias))
    assert_equal(out, expected)


def test_int8_scaled_mm_worst_case_large_k():
    K = _checks.INT8_MAX_K // 16 * 16
    a = torch.full((2, K), -128, dtype=torch.int8, device=dev())
    b = torch.full((4, K), -128, dtype=torch.int8, device=dev())
    sa, sb = torch.ones(2, device=dev()), torch.ones(4, device=dev())
    out = torch.ops.lowbit.int8_scaled_mm(a, b, sa, sb)
    assert_equal(out, on_cpu(ref.int8_scaled_mm, a, b, sa, sb))


# ----------------------------------------------------------------------------- weight-only
def weight_only_bound(x, w, scale, bias, out_dtype):
    """|kernel - exact| for any fp32 accumulation order, then rounding to out_dtype."""
    x64, w64, s64 = x.double(), w.double(), scale.double()
    exact = (x64 @ w64.T) * s64
    mag = (x64.abs() @ w64.abs().T) * s64.abs()
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    K = x.shape[1]
    u32 = 2.0**-24
    u_out = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
    tiny = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}[out_dtype]  # f16 subnormal step
    return exact, (2 * K + 4) * u32 * mag * (1 + u_out) + u_out * exact.abs() + tiny


@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", NK_SWEEP)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_mm_within_bound(M, N, K, dtype):
    x = torch.randn(M, K, device=dev()).to(dtype)
    w = rand_int8(N, K, low=-127)
    scale = (torch.rand(N, device=dev()) * 0.02 + 1e-3).to(dtype)
    bias = torch.randn(N, device=dev()).to(dtype)
    for b in (None, bias):
        out = torch.ops.lowbit.int8_weight_only_mm(x, w, scale, b)
        assert out.dtype == dtype and out.shape == (M, N)
        exact, bound = weight_only_bound(x, w, scale, b, dtype)
        err = (out.double() - exact).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
        # The reference meets the same bound (the bound is not too tight for torch itself).
        ref_err = (ref.int8_weight_only_mm(x, w, scale, b).double() - exact).abs()
        assert (ref_err <= bound).all()


@pytest.mark.parametrize("M", [3, 64])  # GEMV and tiled
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_weight_only_mm_misaligned_and_non_contiguous(M, dtype):
    N, K = 48, 256
    x = torch.randn(M, K, device=dev()).to(dtype)
    w = rand_int8(N, K)
    scale = torch.rand(N, device=dev()) * 0.02
    expected = torch.ops.lowbit.int8_weight_only_mm(x, w, scale)
    # Another load path, another summation order: hold to the bound, not to bit equality.
    exact, bound = weight_only_bound(x, w, scale, None, dtype)
    for xi, wi in ((misaligned(x), misaligned(w)), (x.T.contiguous().T, w.T.contiguous().T)):
        out = torch.ops.lowbit.int8_weight_only_mm(xi, wi, scale)
        assert ((out.double() - exact).abs() <= bound).all()
    assert ((expected.double() - exact).abs() <= bound).all()


# ----------------------------------------------------------------------------- quantize
QUANT_SHAPES = [(1,), (7,), (3, 1), (5, 33), (4, 1000), (2, 1024), (3, 1025), (2, 3, 4101), (256, 64)]


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_row", [True, False])
def test_int8_quantize_dynamic_exact(shape, dtype, per_row):
    x = (torch.randn(shape, device=dev()) * 3).to(dtype)
    if x.dim() > 1:
        x[0] = 0  # an all-zero row: scale 1.0
    q, s = torch.ops.lowbit.int8_quantize_dynamic(x, per_row)
    q_ref, s_ref = on_cpu(ref.int8_quantize_dynamic, x, per_row)
    assert_equal(s, s_ref)
    assert_equal(q, q_ref)


def test_int8_quantize_rounds_half_to_even():
    # amax = 127 -> scale = 1, so x / scale hits the .5 ties exactly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=dev())
    q, s = torch.ops.lowbit.int8_quantize_dynamic(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["scalar0", "scalar1", "per_row"])
def test_int8_quantize_static_exact(shape, dtype, kind):
    x = (torch.randn(shape, device=dev()) * 3).to(dtype)
    if kind == "per_row":
        scale = torch.rand(shape[:-1], device=dev()) * 0.05 + 1e-3
    else:
        scale = torch.rand((() if kind == "scalar0" else (1,)), device=dev()) * 0.05 + 1e-3
    assert_equal(torch.ops.lowbit.int8_quantize_static(x, scale), on_cpu(ref.int8_quantize_static, x, scale))


def test_int8_quantize_non_contiguous():
    x = torch.randn(64, 40, device=dev()).T  # [40, 64], column-major
    q, s = torch.ops.lowbit.int8_quantize_dynamic(x)
    q_ref, s_ref = on_cpu(ref.int8_quantize_dynamic, x)
    assert_equal(q, q_ref)
    assert_equal(s, s_ref)
