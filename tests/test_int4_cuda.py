"""The INT4 CUDA C++ kernels (csrc/cuda/int4.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.int4), on a real GPU.

int4_weight_only_mm accumulates in fp32 in another order than the reference (and applies each
group's scale to a partial sum instead of to every weight), so it is held to a rigorous error
bound against the float64 result computed from the reference's own fp32 d = float(u) - zero.

The shapes cover the three kernels: GEMV (M <= 8), tensor cores (M > 8, f16/bf16) with and
without 16-byte cp.async of x (K % 8, alignment), fp32 SIMT (M > 8, f32); every group size,
per-channel groups with K not a multiple of 32, a partial last group, more than one 1024-column
GEMV chunk, odd N (partial tiles), symmetric and asymmetric weights, every scale dtype, bias,
and non-contiguous or misaligned inputs.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import int4 as ref
from lowbit.formats import int4 as fmt

pytestmark = pytest.mark.cuda

M_SWEEP = [1, 3, 8, 16, 17, 64, 2048]
# (N, K, group_size)
NKG_SWEEP = [
    (33, 128, 32),
    (129, 256, 64),
    (33, 384, 128),
    (129, 200, 64),      # partial last group (8 columns), K % 32 != 0
    (33, 100, 100),      # per channel, K % 32 != 0, K % 8 != 0 (no cp.async for x)
    (129, 4100, 4100),   # per channel, 5 GEMV chunks, partial block
    (33, 4100, 128),     # partial last group and block, several chunks
    (4096, 4096, 128),
    (4096, 4096, 32),
]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
U32 = 2.0**-24
U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}  # f16 subnormal step


@pytest.fixture(autouse=True)
def cuda_backend():
    status = lowbit.backends.backends()["cuda"]
    if not status.available:
        pytest.skip(f"CUDA C++ backend unavailable: {status.reason}")
    with lowbit.backends.use("cuda"):
        yield


def dev():
    return torch.device("cuda")


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, but starting one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def make_weight(N, K, group_size, symmetric, scale_dtype, fractional_zero=False):
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev())
    G = fmt.num_groups(K, group_size)
    scale = (torch.rand(N, G, device=dev()) * 0.02 + 1e-3).to(scale_dtype)
    zero = None
    if not symmetric:
        zero = torch.randint(0, 16, (N, G), device=dev()).float()
        if fractional_zero:
            zero = zero + torch.rand(N, G, device=dev())
        zero = zero.to(scale_dtype)
    return codes, fmt.pack(codes), scale, zero


def expand(t, K, group_size):
    return t.repeat_interleave(group_size, dim=1)[:, :K]


def bound(x, codes, scale, zero, group_size, bias, out_dtype, u_weight=0.0):
    """(exact, bound): |kernel - exact| for any fp32 summation order, with group partial sums
    scaled once, then rounding to out_dtype. `exact` uses the reference's fp32 d = float(u) - zero.

    Per term the kernel makes at most one rounding per addition of a group partial sum, one for
    the scale, one per addition of the group sums, one for bias: fewer than K + 4, doubled for
    tensor cores, whose fp32 accumulation truncates. u_weight: a relative error of the weight
    itself (d rounded to x's 16-bit type when the zero is fractional).
    """
    K = x.shape[1]
    z = torch.full_like(scale, fmt.SYMMETRIC_ZERO, dtype=torch.float32) if zero is None else zero.float()
    d = codes.float() - expand(z, K, group_size)  # fp32, as the reference
    w64 = d.double() * expand(scale.double(), K, group_size)
    x64 = x.double()
    exact = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    u_out = U_OUT[out_dtype]
    return exact, ((2 * K + 4) * U32 + u_weight) * mag * (1 + u_out) + u_out * exact.abs() + TINY[out_dtype]


def assert_within(out, x, codes, scale, zero, group_size, bias, u_weight=0.0):
    M, N = x.shape[0], codes.shape[0]
    assert out.dtype == x.dtype and out.shape == (M, N) and out.device.type == "cuda"
    exact, b = bound(x, codes, scale, zero, group_size, bias, x.dtype, u_weight)
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all()
    assert (err <= b).all(), f"max excess {(err - b).max().item()} at {divmod(int((err - b).argmax()), N)}"


@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K,group_size", NKG_SWEEP)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_weight_only_mm_within_bound(M, N, K, group_size, dtype, symmetric):
    if M * N * K > 2048 * 4096 * 1024 and dtype != torch.float16:
        pytest.skip("the largest shape once per kernel family is enough (f16: tensor cores / GEMV)")
    # Scales in float32 for the large shapes, cycling through the 16-bit types elsewhere.
    scale_dtype = torch.float32 if N == 4096 else FLOAT_DTYPES[(M + K) % 3]
    x = torch.randn(M, K, device=dev()).to(dtype)
    codes, packed, scale, zero = make_weight(N, K, group_size, symmetric, scale_dtype)
    bias = torch.randn(N, device=dev()).to(dtype)
    for b in (None, bias):
        out = torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero, group_size, b)
        assert_within(out, x, codes, scale, zero, group_size, b)
    # The bound is not too tight for the reference itself.
    exact, bnd = bound(x, codes, scale, zero, group_size, bias, dtype)
    ref_out = ref.int4_weight_only_mm(x, packed, scale, zero, group_size, bias)
    assert ((ref_out.double() - exact).abs() <= bnd).all()


@pytest.mark.parametrize("M", [1, 5, 17, 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_every_scale_dtype(M, dtype, scale_dtype, symmetric):
    N, K, gs = 65, 320, 64
    x = torch.randn(M, K, device=dev()).to(dtype)
    codes, packed, scale, zero = make_weight(N, K, gs, symmetric, scale_dtype)
    bias = torch.randn(N, device=dev()).to(scale_dtype)  # bias dtype need not match x
    out = torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero, gs, bias)
    assert_within(out, x, codes, scale, zero, gs, bias)


@pytest.mark.parametrize("M", [2, 40])  # GEMV, tiled
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int4_fractional_zero(M, dtype):
    """A fractional zero: the fp32 paths stay within the fp32 bound; the tensor-core path rounds
    d = u - zero to x's 16-bit type (documented in int4.cu), one unit roundoff of that type."""
    N, K, gs = 48, 256, 32
    x = torch.randn(M, K, device=dev()).to(dtype)
    codes, packed, scale, zero = make_weight(N, K, gs, False, torch.float32, fractional_zero=True)
    out = torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero, gs)
    tensor_cores = M > 8 and dtype != torch.float32
    assert_within(out, x, codes, scale, zero, gs, None, u_weight=U_OUT[dtype] if tensor_cores else 0.0)


@pytest.mark.parametrize("M", [3, 64])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int4_non_contiguous_and_misaligned(M, dtype):
    N, K, gs = 48, 256, 64
    x = torch.randn(M, K, device=dev()).to(dtype)
    codes, packed, scale, zero = make_weight(N, K, gs, False, torch.bfloat16)
    wide = torch.zeros(M, 2 * K, device=dev(), dtype=dtype)
    wide[:, ::2] = x
    packed_t = packed.T.contiguous().T
    cases = [
        (x.T.contiguous().T, packed, scale, zero),     # column-major x
        (wide[:, ::2], packed, scale, zero),           # strided x
        (misaligned(x), misaligned(packed), misaligned(scale), misaligned(zero)),  # no cp.async for x; w copied
        (x, packed_t, scale.T.contiguous().T, zero.T.contiguous().T),
    ]
    for xi, pi, si, zi in cases:
        out = torch.ops.lowbit.int4_weight_only_mm(xi, pi, si, zi, gs)
        assert_within(out, x, codes, scale, zero, gs, None)


def test_int4_gemv_rows_and_tensor_core_tile_meet_the_same_bound():
    # 16 single-row calls (GEMV) and one 16-row call (tensor cores) of the same problem.
    N, K, gs = 96, 512, 128
    x = torch.randn(16, K, device=dev(), dtype=torch.float16)
    codes, packed, scale, zero = make_weight(N, K, gs, True, torch.float16)
    rows = torch.cat([torch.ops.lowbit.int4_weight_only_mm(x[i:i + 1], packed, scale, zero, gs) for i in range(16)])
    assert_within(rows, x, codes, scale, zero, gs, None)
    assert_within(torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero, gs), x, codes, scale, zero, gs, None)


def test_int4_bad_arguments_raise_value_error():
    x = torch.randn(4, 64, device=dev())
    codes, packed, scale, zero = make_weight(8, 64, 32, False, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero, 48)
    with pytest.raises(ValueError, match="packed_w"):
        torch.ops.lowbit.int4_weight_only_mm(x, packed[:, :16], scale, zero, 32)
    with pytest.raises(ValueError, match="zero"):
        torch.ops.lowbit.int4_weight_only_mm(x, packed, scale, zero.half(), 32)
