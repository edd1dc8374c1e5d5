"""The codebook CUDA C++ kernels (csrc/cuda/codebook.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.codebook), on a real GPU.

codebook_mm accumulates in fp32 in another order than the reference and scales each row's sum
once, so it is held to the bound (K + 4) * u32 * sum|x||w| + u_out * |exact| + tiny_out against the
float64 product of x and the reference's decoded weight; codebook_dequant decodes exactly as the
reference (same fp32 sums, same scale multiply) and must match it bit for bit.

The shapes cover both kernels: warp-per-row GEMV (M <= 8) and 64x64 tiles (M > 8); codebooks in
shared memory (<= 8192 floats) and in global memory (16-bit codes); every layout family (scalar,
PQ with groups, RQ/AQ with summed codebooks, row groups), widths that straddle bytes, odd N, bias,
every x dtype and codebook dtype.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import codebook as ref
from lowbit.formats import codebook as fmt

pytestmark = pytest.mark.cuda

U32 = 2.0**-24
U_OUT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}
# (d, C, bits, R, G)
# The whole-word GEMV (M <= 8) takes 2/4/8-bit scalar, 8-bit d = 2/4/8 and 2 x 8-bit d = 8 codes on
# rows of whole 32-bit words; K = 1032 gives rows of 516 / 258 / 1032 bytes, so some of those
# layouts fall back to the generic GEMV there.
LAYOUTS = [(1, 1, 4, 1, 1), (1, 1, 3, 2, 4), (4, 1, 8, 1, 8), (8, 2, 8, 1, 1), (4, 3, 5, 1, 2), (8, 1, 16, 1, 1),
           (2, 1, 11, 4, 1), (1, 1, 2, 1, 1), (2, 1, 8, 2, 2), (8, 1, 8, 1, 1), (1, 1, 8, 1, 1)]
SHAPES = [(1, 33, 256), (3, 64, 1024), (8, 129, 4096), (2, 31, 1032), (17, 65, 512), (300, 128, 2048)]


@pytest.fixture(autouse=True)
def cuda_backend():
    status = lowbit.backends.backends()["cuda"]
    if not status.available:
        pytest.skip(f"CUDA C++ backend unavailable: {status.reason}")
    with lowbit.backends.use("cuda"):
        yield


def make(N, K, d, C, bits, R, G, cb_dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K // d, C), generator=g)
    w = fmt.from_codes(codes, torch.randn(R, G, C, 2**bits, d, generator=g), torch.rand(N, generator=g) + 0.5,
                       codebook_dtype=cb_dtype)
    return w.packed.cuda(), w.codebooks.cuda(), w.scale.cuda()


def check(x, codes, cb, scale, bias=None):
    out = lowbit.ops.codebook_mm(x, codes, cb, scale, bias)
    K = x.shape[1]
    w = ref.codebook_dequant(codes, cb, scale, K).double()
    exact = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    if bias is not None:
        exact += bias.double()
        mag += bias.double().abs()
    bound = (K + 4) * U32 * mag + U_OUT[x.dtype] * exact.abs() + TINY[x.dtype]
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "d{}C{}b{}R{}G{}".format(*v))
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_codebook_mm_and_dequant(layout, M, N, K):
    d, C, bits, R, G = layout
    if K % d or (K // d) % G or N % R:
        pytest.skip("shape not divisible for this layout")
    codes, cb, scale = make(N, K, d, C, bits, R, G, seed=M + N)
    check(torch.randn(M, K, device="cuda"), codes, cb, scale)
    assert torch.equal(lowbit.ops.codebook_dequant(codes, cb, scale, K),
                       ref.codebook_dequant(codes, cb, scale, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 40])
def test_dtypes_and_bias(dtype, cb_dtype, M):
    codes, cb, scale = make(77, 512, 4, 2, 8, 1, 2, cb_dtype)
    x = torch.randn(M, 512, device="cuda").to(dtype)
    check(x, codes, cb, scale, torch.randn(77, device="cuda").to(dtype))


def test_bad_inputs_raise_value_error():
    codes, cb, scale = make(8, 64, 4, 1, 8, 1, 1)
    x = torch.randn(2, 64, device="cuda")
    with pytest.raises(ValueError, match=r"lowbit\.codebook_mm: codebooks\b"):
        lowbit.ops.codebook_mm(x, codes, cb[:, :, :, :255], scale)
    with pytest.raises(ValueError, match=r"lowbit\.codebook_mm: codes\b"):
        lowbit.ops.codebook_mm(x, codes[:, :-1], cb, scale)


@pytest.mark.parametrize("M", [1, 5])
def test_codes_at_an_unaligned_address_take_the_generic_gemv(M):
    codes, cb, scale = make(64, 512, 4, 1, 8, 1, 8, seed=3)
    storage = torch.zeros(codes.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view(codes.shape)  # same values, one byte off a word boundary
    shifted.copy_(codes)
    assert shifted.data_ptr() % 4 != 0
    check(torch.randn(M, 512, device="cuda"), shifted, cb, scale)


# The tensor-core kernel (M > 8, one codebook per sub-vector stored in x's 16-bit dtype).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [(1, 1, 4, 1, 1), (1, 1, 3, 2, 4), (4, 1, 8, 1, 8), (8, 1, 8, 1, 1), (2, 1, 8, 2, 2)],
                         ids=lambda v: "d{}C{}b{}R{}G{}".format(*v))
@pytest.mark.parametrize("M,N,K", [(9, 33, 256), (64, 64, 1024), (300, 129, 1032)])
def test_tensor_core_path(dtype, layout, M, N, K):
    d, C, bits, R, G = layout
    if K % d or (K // d) % G or N % R:
        pytest.skip("shape not divisible for this layout")
    codes, cb, scale = make(N, K, d, C, bits, R, G, cb_dtype=dtype, seed=M + K)
    check(torch.randn(M, K, device="cuda").to(dtype), codes, cb, scale, torch.randn(N, device="cuda").to(dtype))
